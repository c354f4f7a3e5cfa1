"""Built-in causal-LM distillation methods (registered through the ``stillroom`` entry point)."""

from stillroom.core.hookspecs import hookimpl


@hookimpl
def register_methods(register):
    from stillroom.plugins.lm.kd import KD

    register(KD)
