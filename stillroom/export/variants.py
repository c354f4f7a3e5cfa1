"""Graph variants of a validated fp32 ONNX graph: int8, fp16 and ORT-optimised.

- ``int8``: onnxruntime *dynamic* quantization (weights int8 per tensor, activations quantised on the
  fly; MatMul/Gemm/Conv). For CPU; the graph's inputs and outputs stay float32.
- ``fp16``: every float tensor and op converted to float16 by ``onnxruntime.transformers.float16``
  with ``keep_io_types=True`` (inputs/outputs stay float32, Casts at the edges). Meant for GPUs;
  TensorRT's strongly typed networks take their precision from such a graph.
- ``optimize``: ``onnxruntime.transformers.optimizer`` fusions (attention, layer norm, GELU) with the
  model type that matches the family; still fp32, so validated with the fp32 checks.
- ``weight_only`` (``int4`` / ``int8``): MatMul weights stored in blocks of 4 or 8 bits for ORT's
  ``MatMulNBits`` (see ``quantize_lm``); activations stay float32. The CPU decode path for LMs.

Each function writes ``dst`` (single file, or ``dst`` + ``dst.data`` for large graphs) and never
touches ``src``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from stillroom.export.onnx_graph import EXTERNAL_DATA_BYTES

log = logging.getLogger(__name__)

OPTIMIZER_TYPES = {
    "gpt2": "gpt2",
    "llama": "gpt2",
    "mistral": "gpt2",
    "qwen2": "gpt2",
    "qwen3": "qwen3",
    "gpt_neox": "gpt_neox",
    "phi": "phi",
    "unet": "unet",
    "vae": "vae",
    "clip": "clip",
}


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


def optimize(src: Path, dst: Path, family: str, num_heads: int = 0, hidden_size: int = 0) -> str:
    """ORT transformer fusions; returns the optimizer model type used."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = OPTIMIZER_TYPES.get(family, "gpt2")
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


def quantize_weight_only(src: Path, dst: Path, scheme: str = "int4", block_size: int = 32) -> None:
    """MatMulNBits weights; a tied vocabulary projection is untied first so it is quantised too."""
    import onnx

    from stillroom.core.errors import StillroomError
    from stillroom.export.lm_fast_graph import untie_vocab_projection
    from stillroom.export.quantize_lm import quantize_matmul_nbits

    model = onnx.load(str(src))
    with contextlib.suppress(StillroomError):  # not an LM graph with a 'logits' MatMul: quantise the rest
        untie_vocab_projection(model)
    save_model(quantize_matmul_nbits(model, scheme, block_size), dst)


def file_bytes(path: Path) -> int:
    return _size(Path(path))
