"""How each runtime loads a causal LM: torch (transformers), onnxruntime (the engine), tensorrt.

Every loader returns a ``LanguageModel``: the tokenizer and a backend (``new_cache`` / ``forward`` /
``full_logits``) that the one decode loop (``stillroom.plugins.lm.decode_loop``) drives, so bench
and serve see the same object whichever runtime produced it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stillroom.core import artifact as artifacts
from stillroom.core import runtime
from stillroom.core.errors import StillroomError
from stillroom.core.tokenizer import load_tokenizer
from stillroom.plugins.lm.decode_loop import Generation, LMBackend
from stillroom.plugins.lm.sampling import SamplingParams
from stillroom.plugins.lm.spec import LMSpec, spec_of

if TYPE_CHECKING:
    from stillroom.core.tensorrt_engine import EngineRunner

RUNTIMES = ("torch", "onnxruntime", "tensorrt")


@dataclass
class LanguageModel:
    """A causal LM behind the shared generation loop."""

    name: str
    runtime: str
    backend: LMBackend
    tokenizer: Any
    device: str = "cpu"
    provider: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    kind: str = "causal-lm"

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    @property
    def eos_ids(self) -> frozenset[int]:
        eos = self.tokenizer.eos_token_id
        return frozenset() if eos is None else frozenset([int(eos)])

    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:  # an empty prompt starts from BOS/EOS, the document separator of the training data
            bos = self.tokenizer.bos_token_id
            ids = [int(bos if bos is not None else self.pad_id)]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Generation:
        """A not-yet-started generation (iterate it to stream, or run it to the end)."""
        return Generation(self.backend, prompts, params, self.pad_id)

    def full_logits(self, input_ids: np.ndarray) -> np.ndarray:
        return self.backend.full_logits(input_ids)


# -- torch ----------------------------------------------------------------------------------------
class TorchCausalLM:
    """The ``LMBackend`` of a transformers causal LM; the cache is the model's own ``Cache`` object."""

    def __init__(self, model, device: str) -> None:
        import inspect

        self.model, self.device = model, device
        params = inspect.signature(model.forward).parameters  # transformers 5 renamed past_key_values
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def new_cache(self, batch: int, capacity: int | None = None) -> Any:
        from transformers import DynamicCache

        return DynamicCache()

    def _tensor(self, a: np.ndarray):
        import torch

        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long, device=self.device)

    def forward(self, input_ids, attention_mask, position_ids, cache) -> tuple[np.ndarray, Any]:
        import torch

        with torch.inference_mode():
            out = self.model(
                input_ids=self._tensor(input_ids),
                attention_mask=self._tensor(attention_mask),
                position_ids=self._tensor(position_ids),
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_arg: cache},
            )
        return out.logits[:, -1].float().cpu().numpy(), out.past_key_values

    def full_logits(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(input_ids=self._tensor(input_ids), use_cache=False).logits.float().cpu().numpy()


def load_torch_lm(spec: str, device: str, compile: bool, name: str) -> LanguageModel:
    import torch

    from stillroom.plugins.lm.models import load_causal_lm

    model, tokenizer = load_causal_lm(spec, role="model")
    model = model.to(device).eval()
    if compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    return LanguageModel(
        name,
        "torch",
        TorchCausalLM(model, device),
        tokenizer,
        device=device,
        provider=device,
        info={"model": spec, "compile": compile},
    )


def load_torch(target: str, device: str = "cpu", compile: bool = False, name: str | None = None, **_: Any):
    """A transformers model spec (a directory, ``embedded:NAME`` or a hub id) in eager PyTorch."""
    device = runtime.torch_device(device)
    label = name or Path(str(target)).name or str(target)
    runtime.refuse_artifact(Path(str(target)))
    return load_torch_lm(str(target), device, compile, label)


# -- onnxruntime ----------------------------------------------------------------------------------
def _tokenizer(art: artifacts.Artifact):
    if not art.manifest.tokenizer:
        raise StillroomError(f"causal-LM artifact '{art.root}' has no tokenizer", "re-run the export")
    tok = load_tokenizer(art.path(art.manifest.tokenizer))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_onnxruntime(
    target: str | Path,
    provider: str = "auto",
    allow_fallback: bool = False,
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    name: str | None = None,
) -> LanguageModel:
    """Opens an ONNX LM artifact (verified through its manifest) in the engine, on ``provider``."""
    from stillroom.core.ort_session import SessionOptions
    from stillroom.plugins.lm.engine import open_engine, variant_of

    art = runtime.open_artifact(target, "onnx")
    opts = SessionOptions.decode(
        provider, threads=intra_op_threads, inter_op_threads=inter_op_threads, allow_fallback=allow_fallback
    )
    backend = open_engine(art, options=opts)
    info = {
        "artifact": str(target),
        "precision": art.manifest.precision,
        "variant": variant_of(art.manifest),
        "provenance": art.manifest.provenance.model_dump(),
        "context_length": spec_of(art.manifest).max_length,
    }
    return LanguageModel(
        name or Path(target).name,
        "onnxruntime",
        backend,
        _tokenizer(art),
        device=backend.device,
        provider=backend.provider,
        info=info,
    )


# -- tensorrt -------------------------------------------------------------------------------------
class TrtCausalLM:
    """``LMBackend`` over a KV-cache engine; the cache is a list of CUDA tensors (present -> past)."""

    def __init__(self, runner: EngineRunner, spec: LMSpec) -> None:
        from stillroom.plugins.lm.engine import cache_names

        self.runner = runner
        self.past_names, self.present_names = cache_names(runner.inputs)
        self.kv_heads, self.head_dim = spec.kv_heads, spec.head_dim
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


def load_tensorrt(target: str | Path, name: str | None = None) -> LanguageModel:
    from stillroom.core.tensorrt_engine import EngineRunner

    art = runtime.open_artifact(target, "tensorrt")
    runner = EngineRunner(art.graph("model"))
    info = {"artifact": str(target), "precision": art.manifest.precision}
    return LanguageModel(
        name or Path(target).name,
        "tensorrt",
        TrtCausalLM(runner, spec_of(art.manifest)),
        _tokenizer(art),
        device="cuda",
        provider="tensorrt",
        info=info,
    )


def load(runtime_name: str, target: str, **options: Any) -> LanguageModel:
    """``Family.load`` for LMs."""
    loaders = {"torch": load_torch, "onnxruntime": load_onnxruntime, "tensorrt": load_tensorrt}
    if runtime_name not in loaders:
        raise StillroomError(
            f"causal LMs have no '{runtime_name}' runtime", f"use one of: {', '.join(loaders)}"
        )
    return loaders[runtime_name](target, **options)
