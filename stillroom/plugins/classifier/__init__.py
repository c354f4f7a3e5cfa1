"""Built-in image-classifier family: distils a CNN classifier (default: the shipped MNIST classifier)
into smaller CNNs or MLP-mixers built from config; methods ``classifier_kd`` (Hinton et al. 2015),
``lelp`` (Loo et al. 2024), ``dmae`` (Bai et al. 2023), ``had`` (Yang et al. 2025) and
``prototype_relation`` (Asadi et al. 2023, class-incremental), one file each under ``methods/``; the
``accuracy`` metric (accuracy and ECE)."""

from stillroom.core.hookspecs import hookimpl


@hookimpl
def register_families(register):
    from stillroom.plugins.classifier.family import ClassifierFamily

    register(ClassifierFamily)


@hookimpl
def register_metrics(register):
    def accuracy(model, job, settings, out):
        """Top-1 accuracy and expected calibration error of a loaded classifier on held-out images."""
        from stillroom.plugins.classifier.bench import accuracy as measure

        return measure(model, job, settings, out)

    register("accuracy", accuracy)


@hookimpl
def register_methods(register):
    from stillroom.plugins.classifier.methods.dmae import DMAE
    from stillroom.plugins.classifier.methods.had import HAD
    from stillroom.plugins.classifier.methods.kd import ClassifierKD
    from stillroom.plugins.classifier.methods.lelp import LELP
    from stillroom.plugins.classifier.methods.prototype_relation import PrototypeRelation

    for method in (ClassifierKD, LELP, DMAE, HAD, PrototypeRelation):
        register(method)
