"""The search space of a recipe, read from its method's schema rather than kept by hand.

Distiller (He et al. 2021, "Distiller: A Systematic Study of Model Distillation Methods in Natural
Language Processing") searches the distillation objective, the temperature and the data
augmentation together. Here each of those is a recipe key:

- every ``Literal`` field of the method's ``Params`` (the objective's choices: ``kd``'s
  ``divergence``, ``hidden``'s ``hidden_loss``, ...) is a categorical dimension ``method.NAME``
  over the values the schema accepts, so a new value (a new divergence) is searched as soon as the
  method accepts it;
- every ``Literal`` field of the method's ``Data`` section (``data.augment``) likewise;
- the method's ``temperature``, where it has one, is log-uniform over a range, clipped to the
  field's own bounds.

Keys the user fixes with ``KEY=VALUE`` overrides are left out of the space.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from stillroom.core.errors import StillroomError


@dataclass(frozen=True)
class Dimension:
    """One searched recipe key: ``choices`` (categorical) or ``low``/``high`` (log-uniform float)."""

    key: str
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        return trial.suggest_float(self.key, self.low, self.high, log=True)


def literal_fields(model: type[BaseModel]) -> dict[str, tuple[Any, ...]]:
    """``{field: allowed values}`` for the fields of ``model`` typed ``Literal[...]``."""
    return {
        name: typing.get_args(field.annotation)
        for name, field in model.model_fields.items()
        if typing.get_origin(field.annotation) is typing.Literal
    }


def _bounds(field) -> tuple[float | None, float | None]:
    """The field's (lower, upper) numeric bounds from its ``gt``/``ge``/``lt``/``le`` constraints."""

    def first(*names: str) -> float | None:
        found = [getattr(m, n) for m in field.metadata for n in names if getattr(m, n, None) is not None]
        return found[0] if found else None

    return first("gt", "ge"), first("lt", "le")


def space_of(method_cls: type, temperature: tuple[float, float], fixed: set[str]) -> list[Dimension]:
    """The dimensions searched for ``method_cls`` (keys in ``fixed`` are left out)."""
    dims = [
        Dimension(f"{section}.{name}", choices)
        for section, model in (("method", method_cls.Params), ("data", method_cls.Data))
        for name, choices in literal_fields(model).items()
        if len(choices) > 1
    ]
    field = method_cls.Params.model_fields.get("temperature")
    if field is not None:
        low, high = temperature
        floor, ceiling = _bounds(field)
        low = max(low, floor) if floor is not None else low
        high = min(high, ceiling) if ceiling is not None else high
        if not 0 < low < high:
            raise StillroomError(
                f"temperature range {temperature[0]}..{temperature[1]} is empty for '{method_cls.name}'",
                "give --temperature LOW HIGH with 0 < LOW < HIGH",
            )
        dims.append(Dimension("method.temperature", low=low, high=high))
    dims = [d for d in dims if d.key not in fixed]
    if not dims:
        raise StillroomError(
            f"method '{method_cls.name}' leaves nothing to search once the overrides are fixed",
            "drop an override of method.* or data.*",
        )
    return dims
