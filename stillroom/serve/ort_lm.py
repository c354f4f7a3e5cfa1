"""A causal-LM artifact on ONNX Runtime: one graph for prefill and decode with an explicit KV cache.

The graph follows Optimum's names: inputs ``input_ids`` [B, S], ``attention_mask`` [B, P+S],
``position_ids`` [B, S] and ``past_key_values.{i}.key|value`` [B, kv_heads, P, head_dim]; outputs
``logits`` [B, S, V] and ``present.{i}.key|value`` [B, kv_heads, P+S, head_dim]. Past length 0 is the
prefill. The cache stays where the model wrote it: numpy arrays on CPU; on CUDA / TensorRT it is kept
as device ``OrtValue``s bound with IOBinding (present of step t is bound as past of step t+1), so the
cache never crosses to the host; only the last position's logits are copied back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stillroom.core.errors import StillroomError
from stillroom.serve.ort_session import GPU_PROVIDERS

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}


@dataclass
class OrtKVCache:
    """Per layer (key, value), in graph input order; numpy arrays or device OrtValues."""

    values: list[Any] = field(default_factory=list)


class OrtCausalLM:
    """The ``LMBackend`` of the generation loop for an ONNX KV-cache graph."""

    def __init__(self, session, active_provider: str, extra: dict[str, Any] | None = None) -> None:
        self.session = session
        self.provider = active_provider
        self.device = "cuda" if active_provider in GPU_PROVIDERS else "cpu"
        inputs = {i.name: i for i in session.get_inputs()}
        for required in ("input_ids", "attention_mask"):
            if required not in inputs:
                raise StillroomError(f"the LM graph has no '{required}' input", "re-export the causal LM")
        self.has_positions = "position_ids" in inputs
        past = sorted((int(m.group(1)), m.group(2)) for name in inputs if (m := _PAST.match(name)))
        self.past_names = [
            f"past_key_values.{i}.{kind}" for i, kind in sorted(past, key=lambda p: (p[0], p[1] != "key"))
        ]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        outputs = {o.name for o in session.get_outputs()}
        missing = [n for n in ["logits", *self.present_names] if n not in outputs]
        if missing:
            raise StillroomError(
                f"the LM graph lacks outputs {missing}", "re-export the causal LM with a KV cache"
            )
        extra = {**(extra or {}), **((extra or {}).get("cache") or {})}
        if self.past_names:
            first = inputs[self.past_names[0]]
            self.kv_dtype = _DTYPES.get(first.type, np.float32)
            heads, dim = first.shape[1], first.shape[3]
            self.kv_heads = (
                heads
                if isinstance(heads, int)
                else int(extra.get("kv_heads", extra.get("num_key_value_heads")))
            )
            self.head_dim = dim if isinstance(dim, int) else int(extra["head_dim"])
        vocab = session.get_outputs()[0].shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else None

    # -- cache --------------------------------------------------------------------------------
    def new_cache(self, batch: int) -> OrtKVCache:
        empty = np.zeros(
            (batch, getattr(self, "kv_heads", 0), 0, getattr(self, "head_dim", 0)),
            self.kv_dtype if self.past_names else np.float32,
        )
        if self.device == "cpu":
            return OrtKVCache([empty] * len(self.past_names))
        import onnxruntime as ort

        return OrtKVCache([ort.OrtValue.ortvalue_from_numpy(empty, "cuda", 0) for _ in self.past_names])

    # -- one model call -----------------------------------------------------------------------
    def _feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> dict:
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
        }
        if self.has_positions:
            feeds["position_ids"] = np.ascontiguousarray(position_ids, dtype=np.int64)
        return feeds

    def _run(
        self, input_ids, attention_mask, position_ids, cache: OrtKVCache
    ) -> tuple[np.ndarray, OrtKVCache]:
        feeds = self._feeds(input_ids, attention_mask, position_ids)
        if self.device == "cpu":
            feeds.update(zip(self.past_names, cache.values, strict=True))
            logits, *present = self.session.run(["logits", *self.present_names], feeds)
            return logits, OrtKVCache(present)
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.past_names, cache.values, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), OrtKVCache(present)

    def forward(
        self, input_ids, attention_mask, position_ids, cache: OrtKVCache
    ) -> tuple[np.ndarray, OrtKVCache]:
        logits, cache = self._run(input_ids, attention_mask, position_ids, cache)
        return np.asarray(logits[:, -1], dtype=np.float32), cache

    def full_logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids)
        positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
        logits, _ = self._run(ids, mask, positions, self.new_cache(ids.shape[0]))
        return np.asarray(logits, dtype=np.float32)
