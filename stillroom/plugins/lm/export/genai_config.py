"""``genai_config.json``: what onnxruntime-genai needs to generate from an LM artifact on its own.

``onnxruntime_genai.Model(ARTIFACT)`` reads ``ARTIFACT/genai_config.json`` and ``og.Tokenizer``
reads ``tokenizer.json`` + ``tokenizer_config.json`` beside it, so an artifact carrying these runs in
genai with no stillroom code. The config only describes the graph the exporter already wrote: its
Optimum tensor names (``kv_cache_module.CacheGeometry``), the cache geometry, and search defaults
taken from the model's ``generation_config`` so genai decodes as the model's authors intended.

Which graph variants genai runs was measured against genai 0.18 (``tests/test_export_genai.py``:
greedy tokens equal to stillroom's engine); ``GENAI_VARIANTS`` records the result per variant, and
the exporter writes the config only for variants marked loadable, so no artifact carries a config
that genai would refuse or decode differently.
"""

from __future__ import annotations

from typing import Any

from stillroom.plugins.lm.engine import Variant
from stillroom.plugins.lm.export.kv_cache_module import CacheGeometry

FILENAME = "genai_config.json"

# variant -> None when genai 0.18 generates stillroom's greedy tokens from it, else why it cannot.
# Measured on the embedded teacher: the three variants in fp32, the plain one in fp16 and int8 too.
GENAI_VARIANTS: dict[Variant, str | None] = {
    "kv-cache": None,
    "kv-cache-last-logits": None,
    "fused": None,
}

# transformers model_type values genai 0.18 runs as a decoder-only LLM under their own name; any
# other model (a GPT-2 student was measured) runs as genai's generic "decoder" type, which needs
# nothing but the tensor names and geometry written below
_GENAI_TYPES = {"llama", "mistral", "qwen2", "gemma", "granite", "olmo", "smollm3"}


def genai_status(variant: Variant) -> dict[str, Any]:
    """The manifest's ``extra["genai"]``: whether ``og.Model(artifact)`` can run this variant."""
    why = GENAI_VARIANTS.get(variant, f"graph variant '{variant}' was not tried with onnxruntime-genai")
    return {"loadable": True} if why is None else {"loadable": False, "why": why}


def _ids(value: Any) -> int | list[int] | None:
    if isinstance(value, list | tuple):
        return [int(v) for v in value] if value else None
    return None if value is None else int(value)


def build(config: Any, generation_config: Any | None, graph: str) -> dict[str, Any]:
    """The genai config for the KV-cache graph ``graph`` (a file name in the artifact root) exported
    from a transformers model with ``config`` / ``generation_config`` (``None`` when it has none)."""
    geometry = CacheGeometry.of(config)
    gen = generation_config

    def token(name: str) -> int | list[int] | None:
        value = _ids(getattr(gen, name, None)) if gen is not None else None
        return value if value is not None else _ids(getattr(config, name, None))

    eos = token("eos_token_id")
    pad = token("pad_token_id")
    pad = pad if pad is not None else eos[0] if isinstance(eos, list) else eos
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    model_type = str(getattr(config, "model_type", ""))
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd

    def search(name: str, default: Any) -> Any:
        value = getattr(gen, name, None) if gen is not None else None
        return default if value is None else value

    return {
        "model": {
            "type": model_type if model_type in _GENAI_TYPES else "decoder",
            "bos_token_id": token("bos_token_id"),
            "eos_token_id": eos,
            "pad_token_id": pad,
            "vocab_size": geometry.vocab_size,
            "context_length": int(context) if context else 2048,
            "decoder": {
                "filename": graph,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": geometry.head_dim,
                "hidden_size": int(hidden),
                "num_attention_heads": int(heads),
                "num_hidden_layers": geometry.layers,
                "num_key_value_heads": geometry.kv_heads,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": bool(search("do_sample", False)),
            "num_beams": int(search("num_beams", 1)),
            "num_return_sequences": 1,
            "max_length": int(context) if context else 2048,
            "min_length": 0,
            "temperature": float(search("temperature", 1.0)),
            "top_k": int(search("top_k", 50)),
            "top_p": float(search("top_p", 1.0)),
            "repetition_penalty": float(search("repetition_penalty", 1.0)),
            "length_penalty": float(search("length_penalty", 1.0)),
            "no_repeat_ngram_size": int(search("no_repeat_ngram_size", 0)),
            "diversity_penalty": float(search("diversity_penalty", 0.0)),
            "early_stopping": bool(search("early_stopping", True)),
            # stillroom's graphs concatenate past and new keys into ``present``; a shared, preallocated
            # buffer would need attention that writes in place at every step
            "past_present_share_buffer": False,
        },
    }
