"""A causal LM as a pure tensor function with an explicit KV cache (what the ONNX graph computes).

transformers 5.x passes the cache as a ``Cache`` object (``DynamicCache``), which cannot cross the
``torch.export`` boundary, so ``KVCacheLM`` takes and returns plain tensors in Optimum's layout:

    (input_ids [B, S], attention_mask [B, P + S], position_ids [B, S],
     [past.0.key, past.0.value, ..., past.{L-1}.value]  each [B, H_kv, P, D])
        -> (logits [B, S, V], present.0.key, present.0.value, ...)   each [B, H_kv, P + S, D]

P = 0 is a prefill; S = 1 with P > 0 is a decode step; one graph serves both. Left padding is
expressed by zeros in ``attention_mask`` and ``position_ids = max(cumsum(mask) - 1, 0)``.

``logits_to_keep`` (0 = all positions) is there for fast runtimes that only need the last position's
logits; the validated default export keeps all positions so perplexity can be measured on it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class CacheGeometry:
    """Shapes of one layer's cache: [batch, kv_heads, length, head_dim]."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, config: Any) -> CacheGeometry:
        layers = getattr(config, "num_hidden_layers", None) or config.n_layer
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(int(layers), int(kv_heads), int(head_dim), int(config.vocab_size))

    def input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "position_ids",
            *[f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")],
        ]

    def output_names(self) -> list[str]:
        return ["logits", *[f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]]

    def dynamic_dims(self) -> dict[str, dict[int, str]]:
        dims = {
            "input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
        }
        for name in self.input_names()[3:]:
            dims[name] = {0: "batch_size", 2: "past_sequence_length"}
        return dims

    def empty_past(self, batch: int, length: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
        return [
            torch.zeros(batch, self.kv_heads, length, self.head_dim, dtype=dtype)
            for _ in range(2 * self.layers)
        ]


def position_ids_from_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Positions of the last ``length`` tokens: pads count for nothing (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


class KVCacheLM(nn.Module):
    """Wraps a transformers causal LM; see the module docstring for the signature."""

    def __init__(self, model: nn.Module, logits_to_keep: int = 0) -> None:
        super().__init__()
        self.model = model
        self.geometry = CacheGeometry.of(model.config)
        self.logits_to_keep = logits_to_keep
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"  # transformers 5.x vs 4.x

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.geometry.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=self.logits_to_keep,
            **{self.cache_kwarg: cache},
        )
        cache = out[self.cache_kwarg]
        present: list[torch.Tensor] = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)
