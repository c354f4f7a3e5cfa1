"""Built-in causal-LM distillation methods (registered through the ``stillroom`` entry point), one file
per method family, and the ``stillroom eval`` command."""

from stillroom.core.hookspecs import hookimpl


@hookimpl
def register_methods(register):
    from stillroom.plugins.lm.gkd import GKD
    from stillroom.plugins.lm.hidden import Hidden
    from stillroom.plugins.lm.kd import KD
    from stillroom.plugins.lm.seqkd import SeqKD
    from stillroom.plugins.lm.sinkhorn import Sinkhorn
    from stillroom.plugins.lm.taid import TAID

    for method in (KD, TAID, Sinkhorn, GKD, SeqKD, Hidden):
        register(method)


@hookimpl
def register_commands(cli):
    from stillroom.plugins.lm.evaluate import eval_command

    cli.add_command(eval_command)
