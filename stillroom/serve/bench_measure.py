"""Measuring one loaded model in the current process: latency, throughput, memory, quality inputs.

Latency is wall-clock around one full call (a whole generation for LMs, one sampler call for
generators) after ``warmup`` untimed calls, repeated ``repeats`` times; we report the median (p50),
p90 and p99 by linear interpolation between order statistics (numpy's default percentile). LM calls
also record time to first token (the prefill plus the first sampling) and the per-token latency of
the decode phase, (total - TTFT) / (new_tokens - 1). Every row is forced to produce exactly
``new_tokens`` tokens (stop tokens ignored) so that runtimes are compared on equal work.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import numpy as np

from stillroom.serve.bench_plan import BenchSettings
from stillroom.serve.loaded import ImageGenerator, LanguageModel
from stillroom.serve.sampling import SamplingParams


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s, dtype=np.float64) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
    }


def peak_memory() -> dict[str, float | None]:
    """Peak resident set size of this process (and peak CUDA memory when torch used a GPU), in MiB."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    gpu_mb = None
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu_mb = torch.cuda.max_memory_allocated() / 2**20
    return {"peak_rss_mb": rss_mb, "gpu_peak_mb": gpu_mb}


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


def time_generator(model: ImageGenerator, settings: BenchSettings, batch: int) -> dict[str, Any]:
    noise = model.noise(batch, settings.seed)
    labels = (np.arange(batch) % model.num_classes) if model.conditioning == "class" else None
    states = model.encode(["a photo"] * batch) if model.conditioning == "text" and model.encode else None
    for _ in range(settings.warmup):
        model.generate(noise, class_labels=labels, encoder_hidden_states=states)
    times = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        model.generate(noise, class_labels=labels, encoder_hidden_states=states)
        times.append(time.perf_counter() - start)
    return {
        "batch": batch,
        "latency_ms": percentiles(times),
        "throughput": batch / float(np.median(times)),
        "throughput_unit": "images/s",
    }


def generate_quality_images(
    model: ImageGenerator, noise: np.ndarray, labels: np.ndarray | None, chunk: int
) -> np.ndarray:
    """The images scored for quality: the same noise and labels for every model, in chunks."""
    out = []
    for start in range(0, noise.shape[0], chunk):
        lab = labels[start : start + chunk] if labels is not None else None
        out.append(model.generate(noise[start : start + chunk], class_labels=lab))
    return np.concatenate(out)
