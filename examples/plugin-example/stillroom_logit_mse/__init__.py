"""A third-party stillroom method plugin, installable on its own (`pip install examples/plugin-example`).

The plugin module only declares hooks; the method class is imported inside the hook so that
`stillroom --help` never pays for torch.
"""

from stillroom.core.hookspecs import hookimpl


@hookimpl
def register_methods(register):
    from stillroom_logit_mse.method import LogitMSE

    register(LogitMSE)
