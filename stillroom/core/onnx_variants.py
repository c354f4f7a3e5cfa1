"""Graph variants of a validated fp32 ONNX graph: int8, fp16 and ORT-optimised.

- ``int8``: onnxruntime *dynamic* quantization (weights int8 per tensor, activations quantised on the
  fly; MatMul/Gemm/Conv). For CPU; the graph's inputs and outputs stay float32.
- ``fp16``: every float tensor and op converted to float16 by ``onnxruntime.transformers.float16``
  with ``keep_io_types=True`` (inputs/outputs stay float32, Casts at the edges). Meant for GPUs;
  TensorRT's strongly typed networks take their precision from such a graph.
- ``optimize``: ``onnxruntime.transformers.optimizer`` fusions (attention, layer norm, GELU) for the
  optimizer model type the caller names; still fp32, so validated with the fp32 checks.

Each function writes ``dst`` (single file, or ``dst`` + ``dst.data`` for large graphs) and never
touches ``src``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stillroom.core.onnx_export import EXTERNAL_DATA_BYTES

log = logging.getLogger(__name__)


def save_model(model, dst: Path) -> None:
    """Single file, or ``dst`` + ``dst.data`` when the weights exceed ``EXTERNAL_DATA_BYTES``."""
    import onnx

    external = model.ByteSize() > EXTERNAL_DATA_BYTES if hasattr(model, "ByteSize") else False
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=Path(dst).name + ".data",
    )


def _size(src: Path) -> int:
    data = Path(str(src) + ".data")
    return Path(src).stat().st_size + (data.stat().st_size if data.exists() else 0)


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=False,
        use_external_data_format=_size(src) > EXTERNAL_DATA_BYTES,
        op_types_to_quantize=["MatMul", "Gemm"],
    )


def convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    save_model(convert_float_to_float16(model, keep_io_types=True), dst)


def optimize(src: Path, dst: Path, model_type: str, num_heads: int = 0, hidden_size: int = 0) -> str:
    """ORT transformer fusions for ``model_type`` (an ``onnxruntime.transformers`` optimizer type)."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(
        str(src),
        model_type=model_type,
        num_heads=num_heads,
        hidden_size=hidden_size,
        opt_level=1,
        use_gpu=False,
        only_onnxruntime=False,
    )
    save_model(optimized.model, dst)
    log.info("ORT optimizer (%s) fused: %s", model_type, optimized.get_fused_operator_statistics())
    return model_type


def file_bytes(path: Path) -> int:
    return _size(Path(path))
