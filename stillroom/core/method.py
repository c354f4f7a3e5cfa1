"""The Method API: what every distillation method plugin implements.

Infrastructure belongs to the trainer; the objective belongs to the method (FastVideo's split).
A method declares

- its hyper-parameters (``Params``) and the models of the ``teacher``/``student``/``data`` recipe
  sections it understands (pydantic; unknown keys are rejected with their dotted path);
- its *roles* (``build``): the student, a frozen teacher, a critic, ... each with its own optimizer
  settings. Trainable roles get an optimizer; the trainer steps, clips, accumulates, casts, averages
  across processes and checkpoints them;
- its *phases* (``phases``): which role's optimizer steps, how many times, in one training step. A
  critic that updates N times per student update (DMD2's two-time-scale rule) is
  ``[Phase("critic", repeats=N), Phase("student")]`` with no loop in the method;
- ``loss(role, batch, step)``: the loss whose gradient updates ``role`` (with its logged metrics);
- how the student is saved (a directory transformers / diffusers load without stillroom) and, for
  students that sample in steps, how they sample.

The trainer imports nothing method-specific; methods import only core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

    from stillroom.core.recipe import Recipe


class Params(BaseModel):
    """Base of a method's hyper-parameters (and of its teacher/student/data sections)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass
class Role:
    """One model taking part in training.

    ``aux`` holds extra trainable modules stepped with this role's optimizer and checkpointed with
    it but not saved as part of the student (e.g. the projections of hidden-state matching).
    Frozen roles (``trainable=False``) are not checkpointed unless ``checkpoint=True`` (a teacher
    that a method replaces during training, as in progressive distillation).
    """

    module: torch.nn.Module
    trainable: bool = True
    lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    clip_grad: float | None = None
    aux: torch.nn.Module | None = None
    checkpoint: bool | None = None

    @property
    def checkpointed(self) -> bool:
        return self.trainable if self.checkpoint is None else self.checkpoint

    def parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.aux is not None:
            params += [p for p in self.aux.parameters() if p.requires_grad]
        return params


@dataclass
class Phase:
    """A role whose optimizer steps ``repeats`` times within one training step."""

    role: str
    repeats: int = 1


@dataclass
class StepOutput:
    """A differentiable loss for the phase's role and scalar metrics to log."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Context:
    """What the trainer hands a method: where to run and where the run lives."""

    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    rank: int = 0
    world_size: int = 1
    seed: int = 0


class Method:
    """Base class of all methods. Subclasses set ``name`` and override the hooks they need."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = "generic"
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = Params
    Teacher: ClassVar[type[BaseModel]] = Params
    Student: ClassVar[type[BaseModel]] = Params
    Data: ClassVar[type[BaseModel]] = Params

    def __init__(self, recipe: Recipe, ctx: Context) -> None:
        self.recipe = recipe
        self.params = recipe.method
        self.ctx = ctx
        self.roles: dict[str, Role] = {}

    # -- set-up -----------------------------------------------------------------------------
    def build(self) -> dict[str, Role]:
        """Create the roles on ``self.ctx.device``; must include a trainable ``student``."""
        raise NotImplementedError(f"method {self.name!r} must implement build()")

    def dataset(self) -> Any:
        """A map-style dataset (``__len__``/``__getitem__``); the trainer picks the indices."""
        raise NotImplementedError(f"method {self.name!r} must implement dataset()")

    def collate(self, items: list[Any]) -> Any:
        """Turns a list of dataset items into a batch on ``self.ctx.device``."""
        raise NotImplementedError(f"method {self.name!r} must implement collate()")

    # -- training ----------------------------------------------------------------------------
    def phases(self, step: int) -> list[Phase]:
        return [Phase("student")]

    def loss(self, role: str, batch: Any, step: int) -> StepOutput:
        raise NotImplementedError(f"method {self.name!r} must implement loss()")

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        """Called after each full training step (schedules, target networks)."""

    def evaluate(self, student: torch.nn.Module) -> dict[str, float]:
        """Quality of ``student`` (periodic and final evaluation); empty when not defined."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable method state saved in checkpoints (e.g. TAID's t)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()` on resume."""

    # -- results -----------------------------------------------------------------------------
    def save_student(self, student: torch.nn.Module, out_dir: Path) -> None:
        """Writes the student as a standard transformers / diffusers directory."""
        raise NotImplementedError(f"method {self.name!r} must implement save_student()")

    def sampler(self) -> dict[str, Any] | None:
        """How a student that samples in steps does it (steps, timesteps, guidance); None otherwise."""
        return None
