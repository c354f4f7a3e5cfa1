"""The ``tensorrt`` runtime: serialized engines built by the exporter, GPU only.

TensorRT 10's name-based API: each call sets the shape of every input (``set_input_shape``), binds
every tensor by device address (``set_tensor_address``), asks the context for the output shapes that
follow and runs ``execute_async_v3`` on a CUDA stream. Device buffers are torch CUDA tensors, so the
LM cache stays on the GPU between steps. ``tensorrt`` and CUDA are imported lazily; without them the
runtime stops with one clear line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core import artifact as artifacts
from stillroom.core.errors import StillroomError
from stillroom.serve.artifact_tokenizer import load_tokenizer
from stillroom.serve.loaded import ImageGenerator, LanguageModel

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


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


class TrtCausalLM:
    """``LMBackend`` over a KV-cache engine; the cache is a list of CUDA tensors (present -> past)."""

    def __init__(self, runner: EngineRunner, extra: dict[str, Any]) -> None:
        self.runner = runner
        past = sorted(
            (int(m.group(1)), m.group(2) != "key", n) for n in runner.inputs if (m := _PAST.match(n))
        )
        self.past_names = [n for _, _, n in past]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        cache = {**extra, **(extra.get("cache") or {})}
        self.kv_heads, self.head_dim = int(cache["kv_heads"]), int(cache["head_dim"])
        self.has_positions = "position_ids" in runner.inputs

    def new_cache(self, batch: int, capacity: int | None = None) -> list[Any]:
        torch = self.runner.torch
        dtype = self.runner._dtype(self.past_names[0]) if self.past_names else torch.float32
        return [
            torch.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=dtype, device="cuda")
            for _ in self.past_names
        ]

    def _run(self, ids, mask, positions, cache):
        feeds = {"input_ids": ids, "attention_mask": mask, **dict(zip(self.past_names, cache, strict=True))}
        if self.has_positions:
            feeds["position_ids"] = positions
        out = self.runner(feeds)
        return out["logits"], [out[n] for n in self.present_names]

    def forward(self, input_ids, attention_mask, position_ids, cache):
        logits, cache = self._run(input_ids, attention_mask, position_ids, cache)
        return logits[:, -1].float().cpu().numpy(), cache

    def full_logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
        logits, _ = self._run(ids, np.ones_like(ids), positions, self.new_cache(ids.shape[0]))
        return logits.float().cpu().numpy()


def load_tensorrt(target: str | Path, name: str | None = None) -> LanguageModel | ImageGenerator:
    art = artifacts.load(target)
    if art.manifest.format != "tensorrt":
        raise StillroomError(
            f"artifact '{target}' is '{art.manifest.format}', not a TensorRT engine",
            "export with --to tensorrt, or use --runtime onnxruntime",
        )
    runner = EngineRunner(art.graph("model"))
    label = name or Path(target).name
    info = {"artifact": str(target), "precision": art.manifest.precision}
    if art.kind == "causal-lm":
        tok = load_tokenizer(art.path(art.manifest.tokenizer))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return LanguageModel(
            label,
            "tensorrt",
            TrtCausalLM(runner, art.manifest.extra),
            tok,
            device="cuda",
            provider="tensorrt",
            info=info,
        )
    sampler = dict(art.manifest.sampler or {})

    def run(noise, class_labels=None, encoder_hidden_states=None, guidance_scale=None):
        feeds: dict[str, Any] = {"noise": noise}
        if "class_labels" in runner.inputs:
            feeds["class_labels"] = np.asarray(class_labels, dtype=np.int64)
        if "encoder_hidden_states" in runner.inputs:
            feeds["encoder_hidden_states"] = encoder_hidden_states
        if "guidance_scale" in runner.inputs:
            scale = guidance_scale if guidance_scale is not None else float(sampler.get("guidance") or 1.0)
            feeds["guidance_scale"] = np.array([scale], dtype=np.float32)
        return runner(feeds)[runner.outputs[0]].float().cpu().numpy()

    return ImageGenerator(label, "tensorrt", run, sampler, device="cuda", provider="tensorrt", info=info)
