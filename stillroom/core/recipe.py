"""Recipes: YAML files that say what to distill, how, and what to do with the result.

A recipe has the sections ``method`` (``name`` plus that method's own hyper-parameters),
``teacher``, ``student``, ``data``, ``train``, ``export`` and ``bench``. ``train`` belongs to the
trainer; ``method``, ``teacher``, ``student`` and ``data`` are validated by the models the chosen
method declares, and ``data.select`` (``name`` plus parameters) by the data selector it names
(``core.selection``), so every key anywhere is checked. A bad key ends in one line naming its dotted path
and the keys that are accepted there. ``KEY=VALUE`` overrides use the same dotted paths.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from stillroom.core.errors import StillroomError

SECTIONS = ("description", "method", "teacher", "student", "data", "train", "export", "bench")
RECIPES_PACKAGE = "stillroom.recipes"


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TrainConfig(Section):
    steps: int = Field(100, gt=0, description="optimizer steps of the student")
    batch_size: int = Field(8, gt=0, description="examples per micro-batch per process")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    clip_grad: float | None = Field(1.0, gt=0)
    ema: float | None = Field(
        None, gt=0, lt=1, description="EMA decay of the student; saved student is the EMA"
    )
    seed: int = 0
    device: str = Field("auto", description="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    tensorboard: bool = True


class ExportConfig(Section):
    """``stillroom run``'s export stage: ``to`` names a registered exporter (checked against the
    registry, not a fixed list, so a plugin's exporter works here too); the other keys are its
    keyword options, as ``stillroom export`` passes them."""

    to: str = Field("onnx", description="a registered exporter (`stillroom plugins` lists them)")
    opset: int | None = Field(None, gt=0)
    int8: bool = Field(False, description="ORT dynamic int8 quantization (CPU)")
    fp16: bool = Field(False, description="float16 graph (GPUs)")
    steps: int | None = Field(None, gt=0, description="models that sample in steps: re-target to K steps")
    optimize: bool = Field(False, description="onnxruntime.transformers fusions")
    fused: bool = Field(False, description="a graph of ORT fused ops (GroupQueryAttention, ...)")
    last_logits: bool = Field(False, description="the vocabulary projection only where it is read")
    weight_only: Literal["int4", "int8"] | None = Field(
        None, description="weight-only quantisation (MatMulNBits)"
    )
    with_teacher: bool = Field(False, description="copy the teacher into the artifact's teacher/ folder")
    options: dict[str, Any] = Field(
        default_factory=dict, description="further options of the chosen exporter (e.g. TensorRT profile)"
    )

    def exporter_options(self) -> dict[str, Any]:
        """The keyword options the exporter is called with: those the recipe sets (the exporter
        has the same defaults) and ``options``."""
        return {**self.model_dump(exclude={"to", "options"}, exclude_defaults=True), **self.options}


class BenchConfig(Section):
    """``stillroom run``'s bench stage: the student artifact against its teacher, as ``stillroom bench``."""

    runtimes: list[str] = Field(["onnxruntime"], min_length=1, description="registered runtimes")
    batch: list[PositiveInt] = Field([1], min_length=1)
    warmup: int = Field(2, ge=0)
    repeats: int = Field(10, gt=0)
    new_tokens: int = Field(32, gt=0, description="token-by-token models: tokens per call")
    prompt_tokens: int = Field(32, gt=0)
    samples: int = Field(200, gt=0, description="image models: samples scored for quality")
    metrics: list[str] = Field([], description="registered quality metrics (default: the family's own)")


class Recipe(BaseModel):
    """A validated recipe. ``method``/``teacher``/``student``/``data`` are the method's models."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    description: str = ""
    method_name: str
    method: Any
    teacher: Any
    student: Any
    data: Any
    train: TrainConfig
    export: ExportConfig
    bench: BenchConfig
    select_name: str | None = None
    select: Any = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"description": self.description}
        out["method"] = {"name": self.method_name, **_dump(self.method)}
        for key in ("teacher", "student", "data", "train", "export", "bench"):
            out[key] = _dump(getattr(self, key))
        if self.select_name is not None:
            out["data"]["select"] = {"name": self.select_name, **_dump(self.select)}
        return out


def _dump(section: Any) -> dict[str, Any]:
    return section.model_dump(mode="json") if isinstance(section, BaseModel) else dict(section or {})


def load_yaml(source: str | Path) -> dict[str, Any]:
    """Reads a recipe file, or a recipe shipped with the package when `source` is a bare name."""
    path = Path(source)
    if not path.exists() and not path.suffix:
        shipped = named_recipes()
        if str(source) in shipped:
            path = shipped[str(source)]
        else:
            raise StillroomError(
                f"no recipe file or named recipe '{source}'",
                f"named recipes: {', '.join(sorted(shipped)) or 'none'} (see `stillroom recipes`)",
            )
    if not path.is_file():
        raise StillroomError(f"recipe file '{path}' does not exist", "check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise StillroomError(f"recipe '{path}' is not valid YAML{where}", "fix the syntax") from err
    except UnicodeDecodeError as err:
        raise StillroomError(f"recipe '{path}' is not UTF-8 text", "save it as UTF-8") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise StillroomError(
            f"recipe '{path}' must be a mapping of sections", f"sections: {', '.join(SECTIONS)}"
        )
    return data


def named_recipes() -> dict[str, Path]:
    """Recipes shipped in `stillroom/recipes/`, by file stem."""
    from importlib import resources

    root = resources.files(RECIPES_PACKAGE)
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``a.b.c=value`` overrides; values are parsed as YAML scalars/lists."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise StillroomError(f"override '{item}' is not KEY=VALUE", "write e.g. train.steps=100")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise StillroomError(f"override key '{key}' is not a dotted path", "write e.g. train.steps=100")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise StillroomError(
                    f"override '{key}': '{where}' is a value, not a section", "use its full path"
                )
            node = child
        node[parts[-1]] = value
    return data


def validate(data: dict[str, Any], method_cls: type | None = None) -> Recipe:
    """Validates every section; `method_cls` defaults to the method named in the recipe."""
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise StillroomError(f"recipe key '{unknown[0]}' is not accepted", f"accepted: {', '.join(SECTIONS)}")
    method_section = data.get("method") or {}
    if not isinstance(method_section, dict):
        raise StillroomError("recipe key 'method' must be a section with a 'name'", "e.g. method: {name: kd}")
    name = method_section.get("name")
    if method_cls is None:
        if not name:
            raise StillroomError("recipe has no 'method.name'", "set method.name, e.g. method.name=kd")
        from stillroom.core.host import get_host

        method_cls = get_host().method(str(name))
    params = {k: v for k, v in method_section.items() if k != "name"}
    data_section = data.get("data")
    select = None
    if isinstance(data_section, dict) and "select" in data_section:
        data_section = {k: v for k, v in data_section.items() if k != "select"}
        select = data["data"]["select"]
    sections: dict[str, Any] = {
        "method": _section("method", method_cls.Params, params),
        "teacher": _section("teacher", method_cls.Teacher, data.get("teacher")),
        "student": _section("student", method_cls.Student, data.get("student")),
        "data": _section("data", method_cls.Data, data_section),
        "train": _section("train", TrainConfig, data.get("train")),
        "export": _section("export", ExportConfig, data.get("export")),
        "bench": _section("bench", BenchConfig, data.get("bench")),
    }
    description = data.get("description", "")
    if not isinstance(description, str):
        raise StillroomError("recipe key 'description' must be text", "quote it")
    _check_registered("export.to", "exporters", [sections["export"].to])
    _check_registered("bench.runtimes", "runtimes", sections["bench"].runtimes)
    _check_registered("bench.metrics", "metrics", sections["bench"].metrics)
    select_name, select_params = _selection(select, method_cls, sections)
    return Recipe(
        description=description,
        method_name=method_cls.name,
        select_name=select_name,
        select=select_params,
        **sections,
    )


def _selection(value: Any, method_cls: type, sections: dict[str, Any]) -> tuple[str | None, Any]:
    """``data.select``: the selector's name and its validated parameters (None, None without one).

    A selector that sets the weight of the teacher's term writes it into the method's parameter
    named by ``Selectable.teacher_weight_param`` (in ``sections``)."""
    from stillroom.core.host import get_host
    from stillroom.core.selection import Selectable

    if value is None:
        return None, None
    if not isinstance(value, dict) or not value.get("name"):
        raise StillroomError(
            "recipe key 'data.select' must be a section with a 'name'",
            "e.g. data.select: {name: prune_kd, keep: 0.5}; `stillroom plugins` lists data selectors",
        )
    if not issubclass(method_cls, Selectable):
        raise StillroomError(
            f"recipe key 'data.select': method '{method_cls.name}' (family '{method_cls.family}') does "
            "not support data selection",
            "remove data.select, or use a method of a family that supports it",
        )
    name = str(value["name"])
    _check_registered("data.select.name", "data_selectors", [name])
    selector = get_host().lookup("data_selectors", name)
    params = _section("data.select", selector.Params, {k: v for k, v in value.items() if k != "name"})
    weight = selector.teacher_weight(params)
    if weight is not None:
        field = method_cls.teacher_weight_param
        if field is None or field not in type(sections["method"]).model_fields:
            raise StillroomError(
                f"recipe key 'data.select': {name} sets the weight of the teacher's term, which method "
                f"'{method_cls.name}' does not have",
                "turn the selector's weighting off or choose a method that mixes teacher and labels",
            )
        sections["method"] = sections["method"].model_copy(update={field: weight})
    return name, params


def _check_registered(dotted: str, kind: str, names: list[str]) -> None:
    """Names that must be in a registry of the host, so a plugin's exporter or runtime is accepted."""
    from stillroom.core.host import get_host

    for name in names:
        try:
            get_host().lookup(kind, name)
        except StillroomError as err:
            raise StillroomError(f"recipe key '{dotted}': {err.message}", err.hint) from None


def _section(prefix: str, model: type[BaseModel], value: Any) -> BaseModel:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise StillroomError(f"recipe key '{prefix}' must be a section (a mapping)", _accepted(model))
    try:
        return model.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first["loc"]]
        dotted = ".".join([prefix, *loc])
        if first["type"] == "extra_forbidden":
            raise StillroomError(
                f"recipe key '{dotted}' is not accepted", _accepted(_model_at(model, loc[:-1]))
            ) from None
        raise StillroomError(
            f"recipe key '{dotted}': {first['msg']}", f"got {first.get('input')!r}"
        ) from None


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel]:
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return model


def _accepted(model: type[BaseModel]) -> str:
    keys = ", ".join(model.model_fields) or "none"
    return f"accepted: {keys}"


def load(source: str | Path, overrides: list[str] | None = None, method_cls: type | None = None) -> Recipe:
    """Load, override and validate a recipe in one call (what `stillroom distill` does)."""
    return validate(apply_overrides(load_yaml(source), overrides or []), method_cls)
