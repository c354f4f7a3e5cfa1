"""Training checkpoints: everything needed to continue bit-for-bit.

A checkpoint is a directory ``checkpoints/step-NNNNNNN/`` holding one safetensors file per
checkpointed role (and its aux modules and EMA), ``optim.pt`` (optimizer and LR-scheduler states),
``rng.pt`` (torch/CUDA/numpy/python RNG states) and ``state.json`` (step, data position, method
state). It is written into a temporary directory and renamed, so a crash mid-write leaves the
previous checkpoint as the latest one. ``.pt`` files are read with ``weights_only=True``: a
checkpoint cannot run code.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from stillroom.core.errors import StillroomError
from stillroom.core.fsio import atomic_dir, remove_stale_temps

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(obj: Any) -> Any:
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, list | tuple) else obj


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (state.json is written last), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for entry in ckpt_root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / "state.json").is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def save(
    ckpt_root: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optim_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Writes checkpoint ``step`` atomically, then keeps only the newest ``keep``."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(ckpt_root)
    final = ckpt_root / f"step-{step:07d}"
    with atomic_dir(final) as tmp:
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"))
        torch.save(optim_state, tmp / "optim.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, modules: dict[str, torch.nn.Module]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads weights into ``modules`` in place; returns (optimizer state, state.json)."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("not a stillroom checkpoint state")
    except (OSError, ValueError) as err:
        raise StillroomError(
            f"checkpoint file '{path / 'state.json'}' is unreadable or corrupt",
            "delete that checkpoint directory to resume from the one before",
        ) from err
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise StillroomError(f"checkpoint file '{file}' is missing", "delete that checkpoint directory")
        try:
            missing, unexpected = load_model(module, str(file), strict=False)
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise StillroomError(
                f"checkpoint file '{file}' is corrupt or does not match the model",
                "delete that checkpoint directory to resume from the one before",
            ) from err
        if missing or unexpected:
            raise StillroomError(
                f"checkpoint file '{file}' does not match the model "
                f"({len(missing)} missing, {len(unexpected)} unexpected tensors)",
                "resume with the same recipe that wrote it",
            )
    optim = _torch_load(path / "optim.pt")
    set_rng_state(_torch_load(path / "rng.pt"))
    return optim, state


def _torch_load(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise StillroomError(
            f"checkpoint file '{file}' holds objects that are not plain tensors; refused",
            "only checkpoints written by stillroom can be resumed",
        ) from err
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise StillroomError(
            f"checkpoint file '{file}' is unreadable or corrupt",
            "delete that checkpoint directory to resume from the one before",
        ) from err
