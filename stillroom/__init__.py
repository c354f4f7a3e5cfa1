"""stillroom's public API: everything a user script or a plugin needs, importable from ``stillroom``.

Using stillroom from Python::

    import stillroom

    recipe = stillroom.load_recipe("lm-kd", ["train.steps=200"])
    student = stillroom.train(recipe, "runs/lm")
    art = stillroom.export_model("runs/lm", "runs/lm/artifact", to="onnx", int8=True)
    report = stillroom.bench(art.root, "runs/lm/bench", batches=(1, 8))

Writing a method plugin: ``hookimpl`` marks the hook that registers it; ``Method`` with ``Params``,
``Role``, ``Phase``, ``StepOutput`` and ``Context`` is the Method API (``stillroom.core.method``); a
method of a built-in family subclasses that family's base, ``LMMethod`` or ``DiffusionMethod``, which
build the teacher and student, the data and the saving, leaving the method its ``loss``. ``Family``
and ``Source`` are the API of a family plugin; ``StillroomError(message, hint)`` is the one-line
error users see. ``stillroom.testing`` builds tiny models from configs for a plugin's tests.

Why the families' bases are here rather than imported from ``stillroom.plugins.lm.base``: a plugin
should depend on names, not on where they live. The restructure that moved every family into
``plugins/`` would have broken each plugin importing module paths; these names stay put. A family
that is not built in publishes its own base from its own package, the same way.

``export_model`` is not called ``export`` because ``stillroom.export`` is the exporters' package: once
it is imported (the host loads it as a plugin) the import system sets ``stillroom.export`` to that
package, so a function of that name would be there only until then.

Everything is resolved on first use (PEP 562), so ``import stillroom`` and ``stillroom --help`` do not
import torch, and core modules can ``from stillroom import __version__`` without an import circle.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    # running: recipe -> student -> artifact -> report
    "load_recipe": "stillroom.pipeline",
    "train": "stillroom.pipeline",
    "export_model": "stillroom.pipeline",
    "bench": "stillroom.pipeline",
    "Recipe": "stillroom.core.recipe",
    "Artifact": "stillroom.core.artifact",
    "StillroomError": "stillroom.core.errors",
    # writing plugins
    "hookimpl": "stillroom.core.hookspecs",
    "Method": "stillroom.core.method",
    "Params": "stillroom.core.method",
    "Role": "stillroom.core.method",
    "Phase": "stillroom.core.method",
    "StepOutput": "stillroom.core.method",
    "Context": "stillroom.core.method",
    "LMMethod": "stillroom.plugins.lm.base",
    "DiffusionMethod": "stillroom.plugins.diffusion.base",
    "Family": "stillroom.core.family",
    "Source": "stillroom.core.family",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'stillroom' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # resolved once; later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
