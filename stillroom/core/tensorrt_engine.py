"""TensorRT engines at run time: one deserialized engine and its execution context, GPU only.

TensorRT 10's name-based API: each call sets the shape of every input (``set_input_shape``), binds
every tensor by device address (``set_tensor_address``), asks the context for the output shapes that
follow and runs ``execute_async_v3`` on a CUDA stream. Device buffers are torch CUDA tensors, so a
cache can stay on the GPU between calls. ``tensorrt`` and CUDA are imported lazily; without them the
runtime stops with one clear line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core.errors import StillroomError


def _require_gpu():
    try:
        import tensorrt as trt
    except ImportError:
        raise StillroomError(
            "the tensorrt runtime needs the 'tensorrt' package",
            "pip install 'stillroom[tensorrt]' on a machine with an NVIDIA GPU",
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise StillroomError(
            "the tensorrt runtime needs an NVIDIA GPU with CUDA, and none is visible",
            "run on a GPU machine, or use --runtime onnxruntime",
        )
    return trt, torch


class EngineRunner:
    """One engine + execution context; ``__call__(feeds)`` -> outputs as torch CUDA tensors."""

    def __init__(self, path: Path) -> None:
        trt, torch = _require_gpu()
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise StillroomError(
                f"TensorRT could not deserialize '{path}'",
                "engines are tied to the TensorRT version and GPU that built them; re-export",
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()

    def _dtype(self, name: str):
        return {
            self.trt.float32: self.torch.float32,
            self.trt.float16: self.torch.float16,
            self.trt.int64: self.torch.int64,
            self.trt.int32: self.torch.int32,
            self.trt.bfloat16: self.torch.bfloat16,
        }[self.engine.get_tensor_dtype(name)]

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        torch = self.torch
        keep = []
        for name in self.inputs:
            value = feeds[name]
            tensor = value if torch.is_tensor(value) else torch.from_numpy(np.ascontiguousarray(value))
            tensor = tensor.to("cuda", self._dtype(name)).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._dtype(name), device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return outputs
