"""Built-in data selectors (``data.select`` in a recipe), one file each: ``kd3`` (Tang et al. 2023),
``active`` (Baykal et al. 2023) and ``prune_kd`` (Ben-Baruch et al. 2024).

They read only a ``stillroom.core.selection.Pool`` (class probabilities, embeddings, labels), so they
belong to no family: any method that implements ``Selectable`` can use them. A plugin package of its
own, registered through its entry point like any other plugin."""

from stillroom.core.hookspecs import hookimpl


@hookimpl
def register_data_selectors(register):
    from stillroom.plugins.selectors.active import RobustActive
    from stillroom.plugins.selectors.kd3 import KD3
    from stillroom.plugins.selectors.prune_kd import PruneKD

    for selector in (KD3, RobustActive, PruneKD):
        register(selector)
