"""Built-in dataset family: dataset distillation. Its output is a distilled dataset (images, labels, a
card), not a model; ``stillroom bench DATASET`` trains fresh ConvNet-3s on it. Methods, one
file each under ``methods/``: ``mtt`` (Cazenavette et al. 2022, the trajectory-matching base) and its
variants ``ftd`` (flat SAM experts, EMA of the images), ``shq`` (clipped experts, k-means init,
balanced inner loop), ``datm`` (difficulty-aligned window, learned soft labels); ``rethink_pca``
(prune-combine-augment of real images), ``cvdd`` (committee-voted soft labels) and ``ssl_dd``
(KRR-ST: kernel ridge regression on self-supervised targets)."""

from stillroom.core.hookspecs import hookimpl


@hookimpl
def register_families(register):
    from stillroom.plugins.dataset.family import DatasetFamily

    register(DatasetFamily)


@hookimpl
def register_methods(register):
    from stillroom.plugins.dataset.methods.cvdd import CVDD
    from stillroom.plugins.dataset.methods.datm import DATM
    from stillroom.plugins.dataset.methods.ftd import FTD
    from stillroom.plugins.dataset.methods.mtt import MTT
    from stillroom.plugins.dataset.methods.rethink_pca import RethinkPCA
    from stillroom.plugins.dataset.methods.shq import SHQ
    from stillroom.plugins.dataset.methods.ssl_dd import KRRST

    for method in (MTT, RethinkPCA, FTD, DATM, SHQ, CVDD, KRRST):
        register(method)
