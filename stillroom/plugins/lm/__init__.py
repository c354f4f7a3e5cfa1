"""Built-in causal-LM distillation methods (registered through the ``stillroom`` entry point), one file
per method family, and the ``stillroom eval`` command."""

from stillroom.core.hookspecs import hookimpl


@hookimpl
def register_families(register):
    from stillroom.plugins.lm.family import CausalLMFamily

    register(CausalLMFamily)


@hookimpl
def register_metrics(register):
    def perplexity(model, job, settings, out):
        """Held-out perplexity, argmax predictions and continuations of a loaded causal LM."""
        from stillroom.plugins.lm.bench import perplexity as measure

        return measure(model, job, settings, out)

    register("perplexity", perplexity)


@hookimpl
def register_methods(register):
    from stillroom.plugins.lm.methods.gkd import GKD
    from stillroom.plugins.lm.methods.had import HAD
    from stillroom.plugins.lm.methods.hidden import Hidden
    from stillroom.plugins.lm.methods.kd import KD
    from stillroom.plugins.lm.methods.self_distill import SelfDistill
    from stillroom.plugins.lm.methods.seqkd import SeqKD
    from stillroom.plugins.lm.methods.sinkhorn import Sinkhorn
    from stillroom.plugins.lm.methods.taid import TAID

    for method in (KD, TAID, Sinkhorn, GKD, SeqKD, Hidden, SelfDistill, HAD):
        register(method)


@hookimpl
def register_commands(cli):
    from stillroom.plugins.lm.evaluate import eval_command
    from stillroom.plugins.lm.student_search.command import search_student

    cli.add_command(eval_command)
    cli.add_command(search_student)
