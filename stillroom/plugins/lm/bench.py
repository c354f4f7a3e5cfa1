"""What ``stillroom bench`` measures for a causal LM, in the benchmark's fresh process.

Latency of a whole generation (prompt of ``prompt_tokens``, exactly ``new_tokens`` new tokens, stop
tokens ignored so runtimes do equal work) with time to first token and per-token decode latency,
(total - TTFT) / (new_tokens - 1); quality as held-out perplexity from full-sequence logits, argmax
predictions (the parent process compares them with the teacher's) and greedy continuations.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core.bench_plan import BenchSettings
from stillroom.core.errors import StillroomError
from stillroom.core.measure import percentiles
from stillroom.plugins.lm.runtime import LanguageModel
from stillroom.plugins.lm.sampling import SamplingParams


def _lm_prompts(model: LanguageModel, settings: BenchSettings, batch: int) -> list[list[int]]:
    text = " ".join(settings.prompts) * 8
    ids = model.encode(text)
    while len(ids) < settings.prompt_tokens:
        ids = ids + ids
    return [ids[: settings.prompt_tokens] for _ in range(batch)]


def time_lm(model: LanguageModel, settings: BenchSettings, batch: int) -> dict[str, Any]:
    prompts = _lm_prompts(model, settings, batch)
    params = [SamplingParams(max_tokens=settings.new_tokens, ignore_eos=True)] * batch
    for _ in range(settings.warmup):
        model.generate(prompts, params).run()
    totals, ttfts = [], []
    for _ in range(settings.repeats):
        gen = model.generate(prompts, params).run()
        if any(len(o) != settings.new_tokens for o in gen.outputs):
            raise RuntimeError("a benchmark generation stopped early; timings would not be comparable")
        totals.append(gen.total_s)
        ttfts.append(gen.ttft_s)
    per_token = [(t - f) / max(settings.new_tokens - 1, 1) for t, f in zip(totals, ttfts, strict=True)]
    median_total = float(np.median(totals))
    return {
        "batch": batch,
        "latency_ms": percentiles(totals),
        "ttft_ms": percentiles(ttfts),
        "per_token_ms": percentiles(per_token),
        "throughput": batch * settings.new_tokens / median_total,
        "throughput_unit": "tokens/s",
        "prompt_tokens": settings.prompt_tokens,
        "new_tokens": settings.new_tokens,
    }


def lm_quality_inputs(model: LanguageModel, blocks: np.ndarray, settings: BenchSettings) -> dict[str, Any]:
    """Per-block NLL sums and argmax predictions on held-out ``blocks`` [N, L], and greedy continuations."""
    nll, count, argmax = 0.0, 0, []
    for start in range(0, blocks.shape[0], 8):
        ids = blocks[start : start + 8]
        logits = model.full_logits(ids)[:, :-1].astype(np.float64)
        target = ids[:, 1:]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(shifted).sum(axis=-1))
        picked = np.take_along_axis(shifted, target[..., None], axis=-1)[..., 0]
        nll += float((logz - picked).sum())
        count += target.size
        argmax.append(logits.argmax(-1))
    prompts = [model.encode(p) for p in settings.prompts]
    params = [SamplingParams(max_tokens=settings.continuation_tokens, stop_token_ids=model.eos_ids)] * len(
        prompts
    )
    gen = model.generate(prompts, params).run()
    continuations = [
        {"prompt": p, "text": model.decode(o)} for p, o in zip(settings.prompts, gen.outputs, strict=True)
    ]
    return {
        "perplexity": float(np.exp(nll / max(count, 1))),
        "nll_tokens": count,
        "argmax": np.concatenate(argmax).astype(np.int32),
        "continuations": continuations,
    }


def _heldout_blocks(model, text: str, settings: BenchSettings) -> np.ndarray:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(settings.eval_blocks, len(ids) // settings.eval_seq_len)
    if n < 1:
        raise StillroomError(
            f"the held-out text has {len(ids)} tokens, fewer than one block of {settings.eval_seq_len}",
            "give more evaluation text or lower eval_seq_len",
        )
    return np.asarray(ids[: n * settings.eval_seq_len], dtype=np.int64).reshape(n, settings.eval_seq_len)


def _fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def bench(model, job: dict[str, Any], settings: BenchSettings, out: Path) -> dict[str, Any]:
    """``Family.bench``: one timing row per batch size."""
    return {"timing": [time_lm(model, settings, b) for b in settings.batches]}


def perplexity(model, job: dict[str, Any], settings: BenchSettings, out: Path) -> dict[str, Any]:
    """The ``perplexity`` metric: held-out perplexity, argmax predictions (``argmax.npy``, for top-1
    agreement with the teacher) and greedy continuations of the bench prompts."""
    blocks = _heldout_blocks(model, Path(job["heldout"]).read_text(encoding="utf-8"), settings)
    quality = lm_quality_inputs(model, blocks, settings)
    np.save(out / "argmax.npy", quality.pop("argmax"))
    continuations = quality.pop("continuations")
    return {"quality": quality, "continuations": continuations, "tokenizer": _fingerprint(model.tokenizer)}
