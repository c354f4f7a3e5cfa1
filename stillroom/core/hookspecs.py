"""The extension points of stillroom (pluggy project "stillroom").

Plugins receive a `register` callback rather than returning lists, so one plugin can register zero,
one or many things. Built-in plugins use these hooks exactly like installed ones.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("stillroom")
hookimpl = pluggy.HookimplMarker("stillroom")


@hookspec
def register_families(register):
    """Register families of students: `register(FamilyClass)` (a `stillroom.core.family.Family`)."""


@hookspec
def register_methods(register):
    """Register distillation methods: `register(MethodClass)` (a `stillroom.core.method.Method`)."""


@hookspec
def register_exporters(register):
    """Register exporters: `register(name, export_fn)` for `stillroom export --to name`."""


@hookspec
def register_runtimes(register):
    """Register runtimes: `register(name, runtime_factory)` used by bench and serve."""


@hookspec
def register_metrics(register):
    """Register quality metrics: `register(name, fn)`, `fn(model, job, settings, out) -> dict`.

    Bench calls it in the target's process on the model a runtime loaded; it returns
    `{"quality": {...}, ...}` merged into the target's result (arrays it saves in `out` as NAME.npy go
    to the family's `compare` and the report). A family's `metric` names the one bench runs by default.
    """


@hookspec
def register_data_selectors(register):
    """Register data selectors: `register(SelectorClass)` (a `stillroom.core.selection.Selector`),
    used by a recipe's `data.select` to choose the training examples of a method that supports it."""


@hookspec
def register_commands(cli):
    """Add subcommands to the `stillroom` click group."""


@hookspec
def on_train_start(run):
    """Called once before the first step, with the `stillroom.core.trainer.Run`."""


@hookspec
def on_step_end(run, step, metrics):
    """Called after every optimizer step with the step number and its logged metrics."""


@hookspec
def on_checkpoint(run, step, path):
    """Called after a checkpoint directory has been written and renamed into place."""


@hookspec
def on_train_end(run, student_dir):
    """Called after the final student has been saved."""
