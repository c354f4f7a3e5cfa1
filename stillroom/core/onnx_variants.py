"""Graph variants of a validated fp32 ONNX graph: int8, fp16 and ORT-optimised.

- ``int8`` (``quantize_int8``, for transformer graphs): onnxruntime *dynamic* quantization of MatMul/Gemm
  (weights int8 per tensor, activations quantised on the fly). For CPU; inputs and outputs stay
  float32.
- ``int8`` for convolutional graphs (``quantize_int8_static``): *static* QDQ quantization of
  Conv/MatMul/Gemm calibrated on the caller's own inputs, falling back to dynamic ConvInteger /
  MatMulInteger when static quantization fails; ``int8_op_counts`` says what became int8.
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

import numpy as np

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


INT8_OP_TYPES = ("Conv", "MatMul", "Gemm")
# a dynamic-quantization node that replaces a float op of INT8_OP_TYPES
_INTEGER_OPS = {"ConvInteger": "Conv", "MatMulInteger": "MatMul", "DynamicQuantizeMatMul": "MatMul"}


def quantize_int8_static(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]) -> str:
    """Static int8 of every Conv/MatMul/Gemm, or dynamic int8 if static fails; returns the method used.

    Static QDQ: each quantised tensor x is stored or computed as ``q = clamp(round(x / s) + z)`` and read
    back as ``x ~ s (q - z)`` through a QuantizeLinear/DequantizeLinear pair, which ORT's CPU provider
    fuses with the op into QLinearConv / QLinearMatMul, so the op itself runs on 8-bit integers.

    - weights: int8, symmetric (``z = 0``), per output channel c: ``s_c = max|W_c| / 127``, so a
      channel with small weights keeps its resolution next to a channel with large ones;
    - activations: uint8, asymmetric, fixed at export from the min/max seen while running the fp32
      graph on ``calibration`` (a list of feed dicts): ``s = (max - min) / 255``, ``z = round(-min / s)``.
      These ranges are only as good as the calibration feeds, hence the caller's own input maker.

    Only Conv/MatMul/Gemm get QDQ pairs; additions, normalisations and elementwise scalings
    stay float32. If static quantization raises (an op or shape the quantizer cannot handle), the graph
    is quantised dynamically instead: weights int8 per tensor, each activation's range taken from the
    tensor itself at run time (DynamicQuantizeLinear), Conv -> ConvInteger, MatMul -> MatMulInteger.
    Returns ``"static-qdq"`` or ``"dynamic"``.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    external = _size(src) > EXTERNAL_DATA_BYTES
    try:
        quantize_static(
            str(src),
            str(dst),
            Feeds(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(INT8_OP_TYPES),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=external,
        )
        return "static-qdq"
    except Exception as err:  # noqa: BLE001 - any quantizer failure falls back, and says so
        log.warning("static int8 quantization failed (%s); falling back to dynamic int8", err)
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=False,
        use_external_data_format=external,
        op_types_to_quantize=list(INT8_OP_TYPES),
    )
    return "dynamic"


def int8_op_counts(path: Path) -> dict[str, dict[str, int]]:
    """Per op type of ``INT8_OP_TYPES``: how many of the graph's nodes run in int8, of how many.

    int8 means a Conv/MatMul/Gemm whose weight input (input 1) is produced by a DequantizeLinear (QDQ,
    fused by ORT into a QLinear op), or a dynamic ConvInteger / MatMulInteger / DynamicQuantizeMatMul
    standing in for the float op. Read from the written graph, so the manifest cannot claim more.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts = {op: {"int8": 0, "total": 0} for op in INT8_OP_TYPES}
    for node in graph.node:
        op = _INTEGER_OPS.get(node.op_type, node.op_type)
        if op not in counts:
            continue
        counts[op]["total"] += 1
        if node.op_type in _INTEGER_OPS or (len(node.input) > 1 and node.input[1] in dequantized):
            counts[op]["int8"] += 1
    return counts


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
