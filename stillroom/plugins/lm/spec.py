"""The causal-LM artifact's ``spec``: everything a runtime needs to run the graph, typed.

Written by the exporter from the model's config and tokenizer, read by every loader (the ORT engine
sizes its cache from it, the TensorRT backend too, the server its context length), so an artifact
never needs the model directory it came from::

    {"model_type": "llama", "layers": L, "heads": H, "kv_heads": H_kv, "head_dim": D,
     "hidden_size": H*D, "vocab_size": V, "max_length": N | null,
     "bos_token_id": int | null, "eos_token_ids": [int, ...], "pad_token_id": int | null,
     "cache_layout": "batch, kv_heads, sequence, head_dim"}
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from stillroom.core.artifact import Manifest, typed_spec

CACHE_LAYOUT = "batch, kv_heads, sequence, head_dim"


class LMSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_type: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_length: int | None = None  # max_position_embeddings: the longest prompt + generation
    bos_token_id: int | None = None
    eos_token_ids: list[int] = []
    pad_token_id: int | None = None
    cache_layout: str = CACHE_LAYOUT


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list | tuple) else [value])]


def from_model(config: Any, generation_config: Any, tokenizer: Any) -> LMSpec:
    """The spec of a transformers model (its config, generation config and tokenizer)."""

    def first(*names: str) -> Any:
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    heads = int(first("num_attention_heads", "n_head"))
    hidden = int(first("hidden_size", "n_embd"))
    eos = _ids(getattr(generation_config, "eos_token_id", None)) or _ids(first("eos_token_id"))
    if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = [int(tokenizer.eos_token_id)]
    pad = first("pad_token_id")
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    bos = first("bos_token_id")
    if bos is None and tokenizer is not None:
        bos = tokenizer.bos_token_id
    max_length = first("max_position_embeddings", "n_positions")
    return LMSpec(
        model_type=str(getattr(config, "model_type", "")),
        layers=int(first("num_hidden_layers", "n_layer")),
        heads=heads,
        kv_heads=int(first("num_key_value_heads") or heads),
        head_dim=int(first("head_dim") or hidden // heads),
        hidden_size=hidden,
        vocab_size=int(config.vocab_size),
        max_length=int(max_length) if max_length else None,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos,
        pad_token_id=None if pad is None else int(pad),
    )


def spec_of(manifest: Manifest) -> LMSpec:
    return typed_spec(manifest, LMSpec)
