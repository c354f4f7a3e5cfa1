"""Loading causal-LM teachers and building students with transformers.

A model spec is a local directory, ``embedded:NAME`` (shipped with the package) or a hub id. A spec
that looks like a path but does not exist is an error naming the path, never a hub lookup.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from stillroom.core.errors import StillroomError
from stillroom.data import locate

log = logging.getLogger(__name__)


def _hub_error(spec: str, role: str, err: Exception) -> StillroomError:
    return StillroomError(
        f"could not load {role} '{spec}': {' '.join(str(err).split())[:200]}",
        "check the directory holds a transformers model, or that the hub id is reachable",
    )


def load_causal_lm(spec: str, role: str = "teacher", dtype: Any = None):
    """A transformers causal LM and its tokenizer from a directory, embedded name or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = locate(spec, role)
    try:
        model = (
            AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
            if dtype
            else AutoModelForCausalLM.from_pretrained(where)
        )
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise _hub_error(spec, role, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def student_from_teacher_config(teacher, overrides: dict[str, Any]):
    """A fresh causal LM of the teacher's architecture with ``overrides`` applied to its config."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise StillroomError(
                f"recipe key 'student.config.{key}' is not a field of {type(config).__name__}",
                "use a field of the teacher's config.json",
            )
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config)


def decoder_layers(model) -> Any:
    """The ModuleList of transformer blocks of a GPT-2- or Llama-family causal LM."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        node = model
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        return node
    raise StillroomError(
        f"cannot find the decoder blocks of {type(model).__name__}", "use student.init=random or student.path"
    )


def init_from_teacher_layers(student, teacher, stride: int | None = None) -> list[int]:
    """Copies embeddings, final norm, head and every k-th teacher block into the student.

    "Well-Read Students Learn Better" (Turc et al. 2019) and DistilBERT initialise students from the
    teacher; with fewer layers we take teacher blocks 0, k, 2k, ... (k = teacher/student depth).
    Returns the teacher block indices used.
    """
    t_layers, s_layers = decoder_layers(teacher), decoder_layers(student)
    k = stride or max(1, len(t_layers) // len(s_layers))
    picked = [min(i * k, len(t_layers) - 1) for i in range(len(s_layers))]
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    prefix = _layers_prefix(teacher, t_layers)
    copied = {}
    for name, tensor in s_state.items():
        if name.startswith(prefix):
            idx, rest = name[len(prefix) :].split(".", 1)
            source = f"{prefix}{picked[int(idx)]}.{rest}"
        else:
            source = name
        if source in t_state and t_state[source].shape == tensor.shape:
            copied[name] = t_state[source].clone()
        else:
            raise StillroomError(
                f"student tensor '{name}' has no same-shaped teacher tensor to copy",
                "teacher-layers init needs the teacher's widths; use init=random to change them",
            )
    student.load_state_dict(copied, strict=True)
    return picked


def _layers_prefix(model, layers) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise StillroomError("decoder blocks are not reachable by name", "use student.init=random")
