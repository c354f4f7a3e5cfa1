"""A fast generation engine for causal-LM ONNX artifacts on ONNX Runtime (batch 1 to a few rows).

At batch 1 a decode step reads every weight once; the runtime's job is to add nothing on top of that.
What this engine does, each kept because it was measured to pay (``benchmarks/lm_runtime.py``):

- **The cache stays in ORT memory.** Each step's ``present.*`` outputs stay ORT-owned ``OrtValue``s
  and are fed back as the next step's ``past_key_values.*``; Python never converts the cache to numpy
  and never concatenates it. On GPU providers the cache is bound on the device with IOBinding.
- **Past and present share one buffer** (CPU, fused graphs). When the caller knows the total length
  (``generate``, the serve loop), the cache is preallocated at that capacity and bound with IOBinding
  as both ``past_key_values.*`` and ``present.*``; GroupQueryAttention then appends each new token in
  place instead of copying the whole past into a new present every step. Measured
  (SmolLM2-135M-shaped model of ``benchmarks/lm_runtime.py``, fp32, 2 threads): +4% tokens/s after a 16-token
  prompt, +23% after a 1024-token one. The prefill still runs unshared (IOBinding cannot bind the
  optional ``logits_to_keep`` input) and its cache is copied in once.
- **Fused graph.** ``stillroom.plugins.lm.export.fused_graph`` writes Llama-family decoders with ORT's fused
  operators (~6 nodes per layer instead of ~70); the engine runs any graph with Optimum's names.
- **Last-position logits.** Graphs exported with ``logits_to_keep`` (``stillroom.plugins.lm.export.graph_edits``)
  are asked for the last position only, in prefill and decode, so the vocabulary projection runs once
  per row per step; graphs without that input still work (the last row is sliced afterwards).
- **Sampling on one row of logits.** Greedy is an argmax over [B, V]. Top-p needs only the nucleus:
  candidates come from ``argpartition`` (O(V)), and only if their mass falls short of p is the
  candidate set widened, so the full vocabulary is sorted at most once and usually never. The
  distribution is the nucleus of "The Curious Case of Neural Text Degeneration" (Holtzman et al.
  2020), exactly as ``stillroom.plugins.lm.sampling.nucleus_probs`` defines it::

      V_p = argmin |V'|  s.t.  sum_{x in V'} softmax(z / T)_x >= p,     sample from P restricted to V_p

- **Session options chosen by measurement:** all graph optimisations, sequential execution, one
  inter-op thread, intra-op threads = the cores given (``threads``); idle intra-op threads spin only
  when the cores are free (``stillroom.core.ort.spin_waiting``: +13% on a quiet machine,
  -43% on a loaded one).

Batches are left-padded: padding has ``attention_mask`` 0 and every row's newest token sits in the
last column, so one decode step serves all rows; position ids count real tokens only.

The engine also is an ``LMBackend`` (``new_cache`` / ``forward`` / ``full_logits``) so the serve
generation loop (``stillroom.plugins.lm.decode_loop.Generation``) can drive it unchanged.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core.errors import StillroomError
from stillroom.core.ort_session import physical_cores, spin_waiting

log = logging.getLogger(__name__)

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_KV_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_GPU = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# graphs whose attention op (GroupQueryAttention) appends in place when past and present share memory
SHARED_KV_PRODUCERS = ("stillroom.lm_fused",)
LOGITS_TO_KEEP = "logits_to_keep"
FINISHED = -1  # token id reported for rows that have already stopped


# -- sampling on the last position's logits ------------------------------------------------------
def nucleus_candidates(logits: np.ndarray, temperature: float, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) of the top-p nucleus of softmax(logits / T), probabilities renormalised.

    Candidates are the k largest logits (``argpartition``); the nucleus is inside them once their
    softmax mass (computed over the whole row) reaches p; otherwise k grows fourfold.
    """
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p >= 1.0:
        return np.arange(p.shape[0]), p
    vocab, k = p.shape[0], 64
    while True:
        k = min(k, vocab)
        top = np.argpartition(-p, k - 1)[:k] if k < vocab else np.arange(vocab)
        order = top[np.argsort(-p[top], kind="stable")]
        cumulative = np.cumsum(p[order])
        if cumulative[-1] >= top_p or k == vocab:
            keep = int(np.searchsorted(cumulative, top_p, side="left")) + 1
            ids = order[: min(keep, k)]
            probs = p[ids]
            return ids, probs / probs.sum()
        k *= 4


def sample_rows(
    logits: np.ndarray, temperature: float, top_p: float, rngs: Sequence[np.random.Generator]
) -> np.ndarray:
    """Next token per row of ``logits`` [B, V]: argmax when T = 0, else a nucleus draw."""
    if temperature == 0.0:
        return logits.argmax(-1).astype(np.int64)
    out = np.empty(logits.shape[0], np.int64)
    for row in range(logits.shape[0]):
        ids, probs = nucleus_candidates(logits[row], temperature, top_p)
        cdf = np.cumsum(probs)
        out[row] = ids[
            min(int(np.searchsorted(cdf, rngs[row].random() * cdf[-1], side="right")), len(ids) - 1)
        ]
    return out


# -- session ------------------------------------------------------------------------------------
def open_fast_session(
    graph: Path,
    threads: int | None = None,
    provider: str = "cpu",
    device_id: int = 0,
    spin: bool | None = None,
):
    """An InferenceSession with the options the benchmark chose for decode (see module docstring)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(
        threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or physical_cores()
    )
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    spinning = spin_waiting(spin, so.intra_op_num_threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if provider == "cpu":
        providers: list[Any] = ["CPUExecutionProvider"]
    elif provider in _GPU:
        providers = [(_GPU[provider], {"device_id": str(device_id)}), "CPUExecutionProvider"]
    else:
        raise StillroomError(f"unknown provider '{provider}' for FastLM", "use cpu, cuda or tensorrt")
    try:
        session = ort.InferenceSession(str(graph), sess_options=so, providers=providers)
    except Exception as err:  # ORT's own exception types for unsupported or corrupt graphs
        raise StillroomError(
            f"onnxruntime cannot load '{graph}': {' '.join(str(err).split())[:300]}",
            "re-run the export, or check the onnxruntime version",
        ) from err
    if provider in _GPU and session.get_providers()[0] != _GPU[provider]:
        raise StillroomError(
            f"onnxruntime could not start '{provider}' for '{graph}'", "check the GPU installation or use cpu"
        )
    return session


def _graph_path(artifact_or_path: Any) -> Path:
    from stillroom.core import artifact as artifacts

    if isinstance(artifact_or_path, artifacts.Artifact):
        art = artifact_or_path
    else:
        path = Path(artifact_or_path)
        if path.suffix == ".onnx" and path.is_file():
            return path
        art = artifacts.load(path)
    if art.kind != "causal-lm" or art.manifest.format != "onnx":
        raise StillroomError(
            f"'{art.root}' is a {art.manifest.format} {art.kind} artifact, not an ONNX causal LM",
            "export the LM with `stillroom export` (onnx)",
        )
    return art.graph("model")


# -- the engine ---------------------------------------------------------------------------------
@dataclass
class FastCache:
    """Per layer (key, value) ``OrtValue``s in graph input order (CPU or device memory).

    A *shared* cache (``arrays`` set) preallocates ``capacity`` positions per layer; its ``OrtValue``s
    wrap those arrays and are bound with IOBinding as both past input and present output, so the
    attention op appends the new token in place (``length`` positions are filled).
    """

    values: list[Any] = field(default_factory=list)
    arrays: list[np.ndarray] | None = None
    binding: Any = None
    length: int = 0


class FastLM:
    """``FastLM(artifact_or_path, threads=None, provider="cpu", spin=None)``: see the module docstring."""

    def __init__(
        self,
        artifact_or_path: Any = None,
        threads: int | None = None,
        provider: str = "cpu",
        *,
        session=None,
        device_id: int = 0,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        spin: bool | None = None,
    ) -> None:
        if session is None:
            session = open_fast_session(_graph_path(artifact_or_path), threads, provider, device_id, spin)
        self.session = session
        active = session.get_providers()[0]
        self.device = "cuda" if active in _GPU.values() else "cpu"
        self.device_id = device_id
        inputs = {i.name: i for i in session.get_inputs()}
        overridable = {i.name for i in session.get_overridable_initializers()}
        for required in ("input_ids", "attention_mask"):
            if required not in inputs:
                raise StillroomError(f"the LM graph has no '{required}' input", "re-export the causal LM")
        self.has_positions = "position_ids" in inputs
        self.has_keep = LOGITS_TO_KEEP in inputs or LOGITS_TO_KEEP in overridable
        past = sorted((int(m.group(1)), m.group(2) != "key", n) for n in inputs if (m := _PAST.match(n)))
        self.past_names = [name for *_, name in past]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        missing = {"logits", *self.present_names} - {o.name for o in session.get_outputs()}
        if missing:
            raise StillroomError(f"the LM graph lacks outputs {sorted(missing)}", "re-export with a KV cache")
        first = inputs[self.past_names[0]] if self.past_names else None
        self.kv_dtype = _KV_TYPES.get(first.type, np.float32) if first is not None else np.float32
        self.kv_heads = kv_heads or (first.shape[1] if first is not None else 0)
        self.head_dim = head_dim or (first.shape[3] if first is not None else 0)
        if not all(isinstance(d, int) for d in (self.kv_heads, self.head_dim)):
            raise StillroomError("the LM graph's cache shape has symbolic heads", "re-export the causal LM")
        import onnxruntime as ort

        self._ort = ort
        self._outputs = ["logits", *self.present_names]
        self._keep_last = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.int64))
        self._keep_all = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int64))
        self.shares_kv = (
            self.device == "cpu"
            and self.has_positions
            and session.get_modelmeta().producer_name in SHARED_KV_PRODUCERS
        )

    # -- LMBackend ------------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int | None = None) -> FastCache:
        """An empty cache; with ``capacity`` (total positions) a shared one where the graph allows it."""
        import onnxruntime as ort

        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        device = (self.device, self.device_id) if self.device != "cpu" else ("cpu", 0)
        cache = FastCache([ort.OrtValue.ortvalue_from_numpy(empty, *device) for _ in self.past_names])
        if capacity and self.shares_kv and self.past_names:
            shape = (batch, self.kv_heads, int(capacity), self.head_dim)
            cache.arrays = [np.zeros(shape, self.kv_dtype) for _ in self.past_names]
            cache.binding = self.session.io_binding()
            cache.binding.bind_output("logits", "cpu")
            for past, present, array in zip(self.past_names, self.present_names, cache.arrays, strict=True):
                value = ort.OrtValue.ortvalue_from_numpy(array)  # wraps the array's memory on CPU
                cache.binding.bind_ortvalue_input(past, value)
                cache.binding.bind_ortvalue_output(present, value)
        return cache

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: FastCache, last_only: bool
    ) -> tuple[np.ndarray, FastCache]:
        if self.device != "cpu":
            return self._run_device(ids, mask, positions, cache)
        if cache.binding is not None and cache.length:
            return self._run_shared(ids, mask, positions, cache)
        ort = self._ort
        feeds = {
            "input_ids": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(ids, dtype=np.int64)),
            "attention_mask": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(mask, dtype=np.int64)),
        }
        if self.has_positions:
            feeds["position_ids"] = ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(positions, dtype=np.int64)
            )
        if self.has_keep:
            feeds[LOGITS_TO_KEEP] = self._keep_last if last_only else self._keep_all
        feeds.update(zip(self.past_names, cache.values, strict=True))
        logits, *present = self.session.run_with_ort_values(self._outputs, feeds)
        if cache.binding is None:
            return logits.numpy(), FastCache(present)
        # the prefill of a shared cache runs unshared (IOBinding cannot bind the optional
        # ``logits_to_keep``, and the prompt's logits are the expensive ones); its cache is copied in
        for array, value in zip(cache.arrays, present, strict=True):
            array[:, :, : value.shape()[2]] = value.numpy()
        cache.length = mask.shape[1]
        return logits.numpy(), cache

    def _run_shared(self, ids, mask, positions, cache: FastCache) -> tuple[np.ndarray, FastCache]:
        """A decode step on a shared cache: the attention op appends in place, nothing is copied."""
        total = mask.shape[1]
        if total > cache.arrays[0].shape[2]:
            raise StillroomError(
                f"the KV cache holds {cache.arrays[0].shape[2]} positions, the step needs {total}",
                "create the cache with a larger capacity",
            )
        binding = cache.binding
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        self.session.run_with_iobinding(binding)
        cache.length = total
        return binding.get_outputs()[0].numpy(), cache

    def _run_device(self, ids, mask, positions, cache: FastCache) -> tuple[np.ndarray, FastCache]:
        """GPU providers: IOBinding, cache bound on the device, logits bound to host memory.

        IOBinding cannot bind the overridable ``logits_to_keep`` initializer, so on a GPU the graph
        computes every position's logits (the default) and the loop slices the last one.
        """
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        if self.has_positions:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        for name, value in zip(self.past_names, cache.values, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), FastCache(present)

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: FastCache
    ) -> tuple[np.ndarray, FastCache]:
        """Last position's logits [B, V] (float32) and the cache after ``input_ids``."""
        logits, cache = self._run(input_ids, attention_mask, position_ids, cache, last_only=True)
        return np.asarray(logits[:, -1], dtype=np.float32), cache

    def full_logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids)
        positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
        logits, _ = self._run(ids, mask, positions, self.new_cache(ids.shape[0]), last_only=False)
        return np.asarray(logits, dtype=np.float32)

    def logits(self, input_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Logits [B, L, V] at every position of equal-length, unpadded ``input_ids`` (quality metrics)."""
        return self.full_logits(np.asarray(input_ids, dtype=np.int64))

    # -- generation -----------------------------------------------------------------------------
    def generate(
        self,
        prompts_token_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_ids: Sequence[int] = (),
        seed: int | None = None,
        pad_id: int = 0,
    ) -> Iterator[np.ndarray]:
        """Yields one int64 array [B] per step: each row's new token, or ``FINISHED`` (-1) once stopped.

        A row stops after a token in ``stop_ids`` (which is yielded) or after ``max_new_tokens``.
        """
        if not prompts_token_ids or any(len(p) == 0 for p in prompts_token_ids):
            raise StillroomError("every prompt needs at least one token", "give non-empty prompts")
        if temperature < 0 or not 0 < top_p <= 1:
            raise StillroomError("temperature must be >= 0 and top_p in (0, 1]", "fix the sampling params")
        batch, width = len(prompts_token_ids), max(len(p) for p in prompts_token_ids)
        total = width + max_new_tokens
        ids = np.full((batch, width), pad_id, np.int64)
        mask = np.zeros((batch, total), np.int64)  # grows by one column per step, without reallocating
        for row, prompt in enumerate(prompts_token_ids):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) : width] = 1
        positions = np.clip(np.cumsum(mask[:, :width], axis=1) - 1, 0, None)
        seeds = np.random.SeedSequence(seed).spawn(batch)
        rngs = [np.random.default_rng(s) for s in seeds]
        stops = np.asarray(sorted(set(stop_ids)), np.int64)
        done = np.zeros(batch, bool)
        logits, cache = self.forward(ids, mask[:, :width], positions, self.new_cache(batch, total))
        next_pos = positions[:, -1:] + 1
        for step in range(max_new_tokens):
            tokens = sample_rows(logits, temperature, top_p, rngs)
            tokens[done] = FINISHED
            yield tokens
            done |= np.isin(tokens, stops)
            if done.all() or step == max_new_tokens - 1:
                return
            length = width + step + 1
            mask[:, length - 1] = 1
            feed = np.where(done, pad_id, tokens)[:, None]
            logits, cache = self.forward(feed, mask[:, :length], next_pos, cache)
            next_pos = next_pos + 1
