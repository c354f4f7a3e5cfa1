"""torch -> ONNX for one module: the dynamo exporter first, TorchScript only where dynamo fails.

Every exporter in this package goes through ``export_module`` so the choice of exporter, the dynamic
dimension names and the external-data rule are made in one place and recorded in the manifest.

Dynamic dimensions are given once, by input name: ``{"noise": {0: "batch_size"}}``. They become
``torch.export.Dim`` objects for dynamo (one ``Dim`` per name, so two inputs sharing ``batch_size``
share one symbol) and ``dynamic_axes`` for the TorchScript fallback. Dynamo needs an example size of
at least 2 on a dynamic axis (sizes 0 and 1 are specialised), so callers build examples that way.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to ``<graph>.onnx.data`` (protobuf's 2 GiB limit)


@dataclass
class Exported:
    path: Path
    exporter: str  # "dynamo" or "torchscript"
    dynamo_error: str | None = None


def _flat_names(args: Sequence[Any]) -> int:
    return sum(len(a) if isinstance(a, list | tuple) else 1 for a in args)


def _dynamo_shapes(
    args: Sequence[Any], names: Sequence[str], dynamic: dict[str, dict[int, str]], mins: dict[str, int]
) -> tuple[Any, ...]:
    """``dynamic_shapes`` mirroring the structure of ``args`` (a list argument gets a list of specs)."""
    import torch

    dims: dict[str, Any] = {}

    def spec(name: str) -> dict[int, Any] | None:
        axes = dynamic.get(name)
        if not axes:
            return None
        out = {}
        for axis, dim_name in axes.items():
            if dim_name not in dims:
                dims[dim_name] = torch.export.Dim(dim_name, min=mins.get(dim_name, 1))
            out[axis] = dims[dim_name]
        return out

    it = iter(names)
    shapes: list[Any] = []
    for arg in args:
        if isinstance(arg, list | tuple):
            shapes.append([spec(next(it)) for _ in arg])
        else:
            shapes.append(spec(next(it)))
    return tuple(shapes)


def param_bytes(module: Any) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def export_module(
    module: Any,
    args: tuple[Any, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic: dict[str, dict[int, str]],
    *,
    opset: int | None = None,
    mins: dict[str, int] | None = None,
    allow_torchscript: bool = True,
    optimize: bool = True,
) -> Exported:
    """Writes ``module(*args)`` to ``path`` as ONNX; weights go external above ``EXTERNAL_DATA_BYTES``.

    ``optimize`` runs onnxscript's graph optimiser after the dynamo export. It pays for small graphs
    and costs minutes on unrolled samplers (8 minutes for a 4-step sampler of a small image model here), whose
    constant folding ONNX Runtime repeats anyway when it opens the session.
    """
    import torch

    if _flat_names(args) != len(input_names):
        raise ValueError(f"{len(input_names)} input names for {_flat_names(args)} input tensors")
    path = Path(path)
    external = param_bytes(module) > EXTERNAL_DATA_BYTES
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=_dynamo_shapes(args, input_names, dynamic, mins or {}),
                opset_version=opset,
                optimize=optimize,
                verbose=False,
                report=False,
            )
            program.save(str(path), external_data=external)
        return Exported(path, "dynamo")
    except Exception as err:  # noqa: BLE001 - any dynamo failure is a reason to try the fallback
        root = err
        while root.__cause__ is not None:
            root = root.__cause__
        reason = f"{type(root).__name__}: {' '.join(str(root).split())[:300]}"
        if not allow_torchscript:
            raise
        log.warning("dynamo export failed (%s); falling back to the TorchScript exporter", reason)
    for leftover in (path, path.with_name(path.name + ".data")):
        leftover.unlink(missing_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic,
            opset_version=opset or 17,
            do_constant_folding=True,
        )
    if external:
        import onnx

        model = onnx.load(str(path))
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
        )
    return Exported(path, "torchscript", reason)


def tensor_specs(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The graph's inputs and outputs as manifest ``TensorSpec`` dicts (dim names kept as strings)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(value) -> dict[str, Any]:
        t = value.type.tensor_type
        shape: list[int | str] = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            else:
                shape.append(d.dim_param or "?")
        return {
            "name": value.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": shape,
        }

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]
