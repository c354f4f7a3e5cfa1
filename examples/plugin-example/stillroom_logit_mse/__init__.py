"""A third-party stillroom method plugin, installable on its own (`pip install examples/plugin-example`).

The plugin module only declares hooks; the method class is imported inside the hook so that
`stillroom --help` never pays for torch. It uses nothing but the public API (`from stillroom import ...`),
so stillroom can reorganise its internals without breaking it.
"""

from stillroom import hookimpl


@hookimpl
def register_methods(register):
    from stillroom_logit_mse.method import LogitMSE

    register(LogitMSE)
