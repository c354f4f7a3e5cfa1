"""Data selection: which examples of a method's training pool a run learns from, and how much each counts.

A recipe's ``data.select: {name: NAME, ...}`` names a selector registered through
``register_data_selectors``; its other keys are the selector's parameters, validated by its own
``Params`` as a method's are. A selector needs no family's code: it reads a ``Pool``, the class
probabilities and embeddings that the teacher and the current student give the pool's examples,
which a method offers by implementing ``Selectable`` (a family does it once, in its methods' base
class). The trainer asks for a ``Selection`` before the first step and, when ``every`` > 0, again every
``every`` steps, and trains on the selected examples only:

    selection = selector.select(pool, step, steps, previous)
    method.use_selection(selection)               # the method's data becomes those examples
    dataset = method.dataset()                    # each repeated in proportion to its weight

A selection may also ask for *mixed* examples (KD3's MixDistribution): a selected example with the
per-channel statistics of its input moved towards another's, which the method makes and the teacher
labels (extra teacher runs on new inputs, reported as ``select/mixed``).

Weights become repetitions (``repetitions``: n w_i / sum_j w_j rounded by largest remainder), so an
epoch's mean loss is the weighted mean sum_i w_i l_i / sum_i w_i without the method's loss knowing
about weights. A selector may also set the weight of the teacher's term against the labels' term
(``Selector.teacher_weight``); the recipe writes it into the parameter the method names
(``Selectable.teacher_weight_param``).

Reading the teacher's outputs is a *query*. The ``Pool`` counts every distinct example whose teacher
outputs a selector read or the run trained on, and a ``Selectable`` method computes the teacher's
targets only for the examples it trains on, so a selector that spends a budget of queries spends no
more (``selection.json`` in the run directory records the count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_json

ROLES = ("teacher", "student")


class SelectorParams(BaseModel):
    """Base of a selector's parameters (the keys of ``data.select`` other than ``name``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    every: int = Field(0, ge=0, description="steps between selections; 0: select once, before the first step")


class Selectable:
    """What a method offers selectors. Indices are positions in the method's training pool (its data
    before any selection); probabilities are float64 [n, classes], embeddings float64 [n, dim]."""

    teacher_weight_param: ClassVar[str | None] = None  # the parameter that weights teacher vs labels

    def pool_size(self) -> int:
        raise NotImplementedError

    def predict(self, role: str, index: np.ndarray) -> np.ndarray:
        """Class probabilities of ``role`` (``teacher`` or the current ``student``) on ``index``."""
        raise NotImplementedError

    def embed(self, role: str, index: np.ndarray) -> np.ndarray:
        """Embeddings (the input of the last layer) of ``role`` on ``index``."""
        raise NotImplementedError

    def pool_labels(self, index: np.ndarray) -> np.ndarray | None:
        """Ground-truth classes of ``index``; None for an unlabelled pool."""
        raise NotImplementedError

    def use_selection(self, selection: Selection) -> None:
        """Train on ``selection.indices`` from now on (``dataset()`` lists them in this order, then one
        example per entry of ``selection.mixes``), with the teacher's targets computed for them alone."""
        raise NotImplementedError


@dataclass
class Selection:
    """Distinct pool indices to train on, optional non-negative per-example weights, and optional
    ``mixes`` (first, second, lam): extra examples, example ``first`` with its per-channel statistics
    mixed towards those of example ``second`` by ``lam`` (KD3's MixDistribution, made by the method)."""

    indices: np.ndarray
    weights: np.ndarray | None = None
    mixes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64).reshape(-1)
        if not len(self.indices) or len(np.unique(self.indices)) != len(self.indices):
            raise ValueError("a selection holds one or more distinct indices")
        if self.weights is not None:
            self.weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)
            if len(self.weights) != len(self.indices) or (self.weights < 0).any() or self.weights.sum() <= 0:
                raise ValueError("selection weights: one non-negative weight per index, not all zero")
        if self.mixes is not None:
            first, second, lam = (np.asarray(a).reshape(-1) for a in self.mixes)
            if not (len(first) == len(second) == len(lam)) or not np.isin(first, self.indices).all():
                raise ValueError("selection mixes: (first, second, lam) of one length, first selected")
            self.mixes = (first.astype(np.int64), second.astype(np.int64), lam.astype(np.float64))

    def example_weights(self) -> np.ndarray | None:
        """The weight of every example the method trains on: the selected, then the mixed (each
        weighing as its ``first``)."""
        if self.weights is None or self.mixes is None:
            return self.weights
        where = {int(i): n for n, i in enumerate(self.indices)}
        return np.concatenate([self.weights, self.weights[[where[int(i)] for i in self.mixes[0]]]])

    def as_json(self) -> dict[str, Any]:
        weights = None if self.weights is None else self.weights.tolist()
        mixes = None if self.mixes is None else [a.tolist() for a in self.mixes]
        return {"indices": self.indices.tolist(), "weights": weights, "mixes": mixes}

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> Selection:
        weights, mixes = state["weights"], state.get("mixes")
        return cls(
            np.array(state["indices"]),
            None if weights is None else np.array(weights),
            None if mixes is None else tuple(np.array(a) for a in mixes),
        )


class Pool:
    """What a selector reads: a ``Selectable`` method's pool, counting the teacher's queries."""

    def __init__(self, method: Selectable) -> None:
        self.method = method
        self.size = method.pool_size()
        self.queried = np.zeros(self.size, dtype=bool)

    @property
    def teacher_queries(self) -> int:
        """Distinct examples whose teacher outputs were read or trained on."""
        return int(self.queried.sum())

    def predict(self, role: str, index: Any) -> np.ndarray:
        return self.method.predict(role, self._read(role, index))

    def embed(self, role: str, index: Any) -> np.ndarray:
        return self.method.embed(role, self._read(role, index))

    def labels(self, index: Any) -> np.ndarray | None:
        return self.method.pool_labels(np.asarray(index, dtype=np.int64))

    def _read(self, role: str, index: Any) -> np.ndarray:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        index = np.asarray(index, dtype=np.int64)
        if role == "teacher":
            self.queried[index] = True
        return index


class Selector:
    """Base of a selector. Subclasses set ``name`` (and ``description``, ``paper``, ``Params``) and
    implement ``select``; ``every`` (from ``SelectorParams``) says how often the trainer calls it."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Params: ClassVar[type[SelectorParams]] = SelectorParams

    def __init__(self, params: SelectorParams, seed: int = 0) -> None:
        self.params, self.seed = params, seed

    @classmethod
    def teacher_weight(cls, params: SelectorParams) -> float | None:
        """The weight of the teacher's term against the labels' term in the method's loss; None: the
        method's own."""
        return None

    def select(self, pool: Pool, step: int, steps: int, previous: Selection | None) -> Selection:
        """The examples to train on from ``step`` of ``steps`` (``previous``: the selection so far)."""
        raise NotImplementedError(f"selector {self.name!r} must implement select()")

    def rng(self, step: int):
        """numpy's random source seeded by (train seed, step): the same selection after a resume."""
        return np.random.default_rng([self.seed, step])


def repetitions(weights: np.ndarray) -> np.ndarray:
    """How often each example appears in an epoch of n = len(weights) items: n w_i / sum_j w_j rounded
    down, the items left over going to the largest remainders (ties: the lower index)."""
    n = len(weights)
    share = n * np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts = np.floor(share).astype(np.int64)
    left = n - int(counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:left]] += 1
    return counts


class Repeated:
    """A map-style dataset whose item i is ``dataset[order[i]]``."""

    def __init__(self, dataset: Any, order: np.ndarray) -> None:
        self.dataset, self.order = dataset, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.order[i])]


class DataSelection:
    """The trainer's side: when to select, what the run trains on, what a checkpoint keeps."""

    def __init__(self, selector: Selector, method: Selectable, every: int) -> None:
        self.selector, self.method, self.every = selector, method, every
        self.pool = Pool(method)
        self.current: Selection | None = None
        self.step = -1  # the step the current selection was made at

    @classmethod
    def of(cls, recipe: Any, method: Any, seed: int) -> DataSelection | None:
        """The selection a recipe's ``data.select`` asks for, or None."""
        if recipe.select_name is None:
            return None
        if not isinstance(method, Selectable):  # the recipe checks this; a method built by hand may not
            raise StillroomError(
                f"method '{method.name}' does not support data selection",
                "remove data.select from the recipe",
            )
        from stillroom.core.host import get_host

        selector = get_host().lookup("data_selectors", recipe.select_name)
        return cls(selector(recipe.select, seed), method, recipe.select.every)

    def due(self, step: int) -> bool:
        return self.current is None or (self.every > 0 and step % self.every == 0 and step != self.step)

    def select(self, step: int, steps: int) -> dict[str, float]:
        """Runs the selector and switches the method to its choice; returns metrics to log."""
        selection = self.selector.select(self.pool, step, steps, self.current)
        if selection.indices.min() < 0 or selection.indices.max() >= self.pool.size:
            raise ValueError(f"selector {self.selector.name!r} chose indices outside the pool")
        self._use(selection, step)
        ctx = getattr(self.method, "ctx", None)
        if ctx is not None and ctx.rank == 0:
            write_json(
                ctx.run_dir / "selection.json",
                {
                    "selector": self.selector.name,
                    "step": step,
                    "pool": self.pool.size,
                    "teacher_queries": self.pool.teacher_queries,
                    **selection.as_json(),
                },
            )
        return {
            "select/examples": float(len(selection.indices)),
            "select/mixed": float(0 if selection.mixes is None else len(selection.mixes[0])),
            "select/teacher_queries": float(self.pool.teacher_queries),
        }

    def _use(self, selection: Selection, step: int) -> None:
        self.pool.queried[selection.indices] = True
        self.method.use_selection(selection)
        self.current, self.step = selection, step

    def dataset(self, dataset: Any) -> Any:
        """The method's dataset after ``use_selection``, each example repeated by its weight."""
        weights = None if self.current is None else self.current.example_weights()
        if weights is None:
            return dataset
        return Repeated(dataset, np.repeat(np.arange(len(dataset)), repetitions(weights)))

    def state_dict(self) -> dict[str, Any]:
        assert self.current is not None
        return {
            "step": self.step,
            "queried": np.flatnonzero(self.pool.queried).tolist(),
            **self.current.as_json(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._use(Selection.from_json(state), state["step"])
        self.pool.queried[np.array(state["queried"], dtype=np.int64)] = True
