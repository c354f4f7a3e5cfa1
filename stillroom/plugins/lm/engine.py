"""The LM inference engine: runs a causal-LM ONNX graph with its KV cache on ONNX Runtime.

This module is the one place that steps a KV-cache graph (feeds ``present`` back as
``past_key_values``) and the one place that knows which graphs the exporter builds (``VARIANTS``).
It is an ``LMBackend`` (``new_cache`` / ``forward`` / ``full_logits``): the tokens are chosen by the
one decode loop (``stillroom.plugins.lm.decode_loop.Generation``) that bench, server, export
validation and demo all drive, and sessions come from the one opener
(``stillroom.core.ort_session.open_session``). The loop stays a separate module because it also
drives the torch and TensorRT backends; the engine knows nothing about sampling or stopping.

At batch 1 a decode step reads every weight once; the engine's job is to add nothing on top of that.
What it does, each kept because it was measured to pay (``benchmarks/lm_runtime.py``):

- **The cache stays in ORT memory.** Each step's ``present.*`` outputs stay ORT-owned ``OrtValue``s
  and are fed back as the next step's ``past_key_values.*``; Python never converts the cache to numpy
  and never concatenates it. On GPU providers the cache is bound on the device with IOBinding.
- **Past and present share one buffer** (CPU, graph variants with ``shares_kv``). When the caller
  knows the total length (the decode loop passes it as the capacity hint), the cache is preallocated
  at that capacity and bound with IOBinding as both ``past_key_values.*`` and ``present.*``;
  GroupQueryAttention then appends each new token in place instead of copying the whole past into a
  new present every step. Measured (SmolLM2-135M-shaped model of ``benchmarks/lm_runtime.py``, fp32,
  2 threads): +4% tokens/s after a 16-token prompt, +23% after a 1024-token one. The prefill still
  runs unshared (IOBinding cannot bind the optional ``logits_to_keep`` input) and its cache is copied
  in once.
- **Fused graph.** ``stillroom.plugins.lm.export.fused_graph`` writes Llama-family decoders with ORT's
  fused operators (~6 nodes per layer instead of ~70); the engine runs any graph with Optimum's names.
- **Last-position logits.** Variants with ``last_logits`` (``stillroom.plugins.lm.export.graph_edits``,
  and the fused graph) are asked for the last position only, in prefill and decode, so the vocabulary
  projection runs once per row per step; other graphs compute every position and the last is sliced.
- **Session options chosen by measurement:** ``SessionOptions.decode`` (sequential execution, one
  inter-op thread, intra-op threads = the cores given; idle threads spin only when the cores are free,
  ``stillroom.core.ort_session.spin_waiting``: +13% on a quiet machine, -43% on a loaded one).

What a graph supports is never guessed from the graph itself: the exporter writes the variant's name
into the manifest (``Manifest.variant``) and ``variant_of`` reads it back.

For continuous batching the engine also moves cache rows: ``regroup_cache`` builds the cache of a
new batch from rows of the running batch and of newly prefilled rows, each part shifted to the new
width, and ``place_rows`` writes newcomers over finished rows in place. The loop
(``decode_loop.Scheduler``) explains the padded batch layout these serve.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stillroom.core import artifact as artifacts
from stillroom.core.errors import StillroomError
from stillroom.core.ort_session import GPU_PROVIDERS, PROVIDERS, SessionOptions, open_session
from stillroom.plugins.lm.spec import spec_of

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_KV_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
LOGITS_TO_KEEP = "logits_to_keep"

# -- graph variants ------------------------------------------------------------------------------
Variant = Literal["kv-cache", "kv-cache-last-logits", "fused"]


@dataclass(frozen=True)
class GraphVariant:
    """What one kind of exported graph supports; the engine and export validation act on these."""

    last_logits: bool  # has the optional ``logits_to_keep`` input (ask for the last position only)
    shares_kv: bool  # attention appends in place when past and present share one buffer (GQA, CPU)
    chunked_prefill: bool  # runs a multi-token chunk on top of a cache at batch > 1 (GQA refuses)
    # RoPE rotates each cached key by its cache column, not by ``position_ids`` (GQA's ``do_rotary``):
    # a key moved by s columns must be rotated by s positions
    rope_by_column: bool


VARIANTS: dict[Variant, GraphVariant] = {
    "kv-cache": GraphVariant(last_logits=False, shares_kv=False, chunked_prefill=True, rope_by_column=False),
    "kv-cache-last-logits": GraphVariant(
        last_logits=True, shares_kv=False, chunked_prefill=True, rope_by_column=False
    ),
    "fused": GraphVariant(last_logits=True, shares_kv=True, chunked_prefill=False, rope_by_column=True),
}
# the fused graph's RoPE tables (``export/fused_graph.py``), cos and sin [max_positions, head_dim / 2]
# with the model's attention scaling folded in
ROPE_TABLES = ("rope.cos", "rope.sin")


def exported_variant(fused: bool, last_logits: bool) -> Variant:
    """The variant ``export_causal_lm`` builds for its options."""
    return "fused" if fused else "kv-cache-last-logits" if last_logits else "kv-cache"


def variant_of(manifest: artifacts.Manifest) -> Variant:
    """The manifest's graph variant, checked."""
    name = manifest.variant
    if name not in VARIANTS:
        raise StillroomError(
            f"the manifest names graph variant '{name}', which this stillroom does not know "
            f"(known: {', '.join(VARIANTS)})",
            "upgrade stillroom, or re-export the artifact with this version",
        )
    return name


def cache_names(input_names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(``past_key_values.{i}.key/.value`` inputs, their ``present.*`` outputs), layer by layer."""
    past = sorted((int(m.group(1)), m.group(2) != "key", n) for n in input_names if (m := _PAST.match(n)))
    names = [name for *_, name in past]
    return names, [n.replace("past_key_values.", "present.") for n in names]


# -- opening ---------------------------------------------------------------------------------------
def open_engine(
    target: Any,
    variant: Variant | None = None,
    options: SessionOptions | None = None,
) -> FastLM:
    """The engine on an ONNX causal-LM artifact (an ``Artifact`` or its directory; the manifest names
    the variant and the cache geometry) or on a bare ``.onnx`` graph, for which ``variant`` says what
    it is. ``options`` defaults to ``SessionOptions.decode()`` (CPU)."""
    options = options or SessionOptions.decode()
    kv_heads = head_dim = max_length = None
    path = None if isinstance(target, artifacts.Artifact) else Path(target)
    if path is not None and path.suffix == ".onnx" and path.is_file():
        if variant is None:
            raise StillroomError(
                f"'{path}' is a bare graph: no manifest says which variant it is",
                f"pass variant= ({', '.join(VARIANTS)}), or open its artifact directory",
            )
        graph = path
    else:
        art = target if path is None else artifacts.load(path)
        if art.kind != "causal-lm" or art.manifest.format != "onnx":
            raise StillroomError(
                f"'{art.root}' is a {art.manifest.format} {art.kind} artifact, not an ONNX causal LM",
                "export the LM with `stillroom export` (onnx)",
            )
        variant, graph = variant_of(art.manifest), art.graph("model")
        spec = spec_of(art.manifest)
        kv_heads, head_dim, max_length = spec.kv_heads, spec.head_dim, spec.max_length
    session, _ = open_session(graph, options)
    return FastLM(
        session,
        variant,
        device_id=options.device_id,
        kv_heads=kv_heads,
        head_dim=head_dim,
        graph=Path(graph),
        max_columns=max_length if VARIANTS[variant].rope_by_column else None,
    )


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
    """The engine over an open session of a ``variant`` graph (``open_engine`` opens one)."""

    def __init__(
        self,
        session,
        variant: Variant,
        *,
        device_id: int = 0,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        graph: Path | None = None,
        max_columns: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.session, self.variant, self.graph = session, VARIANTS[variant], graph
        # a batch's widest (``decode_loop.RegroupingBackend``): a graph that rotates keys by cache
        # column has RoPE tables for the context length only
        self.max_columns = max_columns
        self.provider = next(k for k, v in PROVIDERS.items() if v == session.get_providers()[0])
        self.device = "cuda" if self.provider in GPU_PROVIDERS else "cpu"
        self.device_id = device_id
        inputs = {i.name: i for i in session.get_inputs()}
        overridable = {i.name for i in session.get_overridable_initializers()}
        for required in ("input_ids", "attention_mask"):
            if required not in inputs:
                raise StillroomError(f"the LM graph has no '{required}' input", "re-export the causal LM")
        self.has_positions = "position_ids" in inputs
        self.has_keep = self.variant.last_logits
        if self.has_keep and LOGITS_TO_KEEP not in inputs and LOGITS_TO_KEEP not in overridable:
            raise StillroomError(
                f"the manifest says '{variant}' but the graph has no '{LOGITS_TO_KEEP}' input",
                "re-export the causal LM",
            )
        self.past_names, self.present_names = cache_names(inputs)
        missing = {"logits", *self.present_names} - {o.name for o in session.get_outputs()}
        if missing:
            raise StillroomError(f"the LM graph lacks outputs {sorted(missing)}", "re-export with a KV cache")
        first = inputs[self.past_names[0]] if self.past_names else None
        self.kv_dtype = _KV_TYPES.get(first.type, np.float32) if first is not None else np.float32
        self.kv_heads = kv_heads or (first.shape[1] if first is not None else 0)
        self.head_dim = head_dim or (first.shape[3] if first is not None else 0)
        if not all(isinstance(d, int) for d in (self.kv_heads, self.head_dim)):
            raise StillroomError("the LM graph's cache shape has symbolic heads", "re-export the causal LM")
        self._ort = ort
        self._outputs = ["logits", *self.present_names]
        self._keep_last = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.int64))
        self._keep_all = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int64))
        self.shares_kv = self.device == "cpu" and self.variant.shares_kv and self.has_positions
        self._keys = [name.endswith(".key") for name in self.past_names]
        self._rope: tuple[np.ndarray, np.ndarray] | None = None

    def _ortvalue(self, array: np.ndarray):
        """``array`` as an ``OrtValue`` on the engine's device (on CPU it wraps the array's memory)."""
        device = (self.device, self.device_id) if self.device != "cpu" else ("cpu", 0)
        return self._ort.OrtValue.ortvalue_from_numpy(array, *device)

    # -- LMBackend ------------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int | None = None) -> FastCache:
        """An empty cache; with ``capacity`` (total positions) a shared one where the graph allows it."""
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        cache = FastCache([self._ortvalue(empty) for _ in self.past_names])
        if capacity and self.shares_kv and self.past_names:
            shape = (batch, self.kv_heads, int(capacity), self.head_dim)
            cache.arrays = [np.zeros(shape, self.kv_dtype) for _ in self.past_names]
            cache.binding = self.session.io_binding()
            cache.binding.bind_output("logits", "cpu")
            for past, present, array in zip(self.past_names, self.present_names, cache.arrays, strict=True):
                value = self._ortvalue(array)  # wraps the array's memory (a shared cache is on CPU)
                cache.binding.bind_ortvalue_input(past, value)
                cache.binding.bind_ortvalue_output(present, value)
        return cache

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: FastCache
    ) -> tuple[np.ndarray, FastCache]:
        """Last position's logits [B, V] (float32) and the cache after ``input_ids``."""
        logits, cache = self._run(input_ids, attention_mask, position_ids, cache, last_only=True)
        return np.asarray(logits[:, -1], dtype=np.float32), cache

    def chunk_logits(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: FastCache
    ) -> tuple[np.ndarray, FastCache]:
        """Logits [B, S, V] (float32) at every position of ``input_ids`` [B, S] after ``cache``, and the
        cache after them (export validation checks prefill, chunk-on-cache and decode with it)."""
        logits, cache = self._run(input_ids, attention_mask, position_ids, cache, last_only=False)
        return np.asarray(logits, dtype=np.float32), cache

    def full_logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits [B, L, V] at every position of equal-length, unpadded ``input_ids`` (quality metrics)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
        return self.chunk_logits(ids, np.ones_like(ids), positions, self.new_cache(ids.shape[0]))[0]

    # -- continuous batching ----------------------------------------------------------------------
    def regroup_cache(
        self, parts: Sequence[tuple[FastCache, Sequence[int], int]], width: int, capacity: int | None = None
    ) -> FastCache:
        """A new cache of the listed ``rows`` of each part ``(cache, rows, part_width)``, in order,
        right-aligned in ``width`` columns (shared with ``capacity`` where the graph allows it).

        A part's column j becomes column ``j + width - part_width``: a narrower part gains zeroed
        leading columns (masked by the loop), a wider one loses leading columns that only hold
        padding of the rows kept. Copies every row: the loop calls it when the batch grows, widens or
        is compacted, not for every newcomer (``place_rows``).
        """
        batch = sum(len(rows) for _, rows, _ in parts)
        cache = self.new_cache(batch, capacity)
        shape = (batch, self.kv_heads, width, self.head_dim)
        layers = cache.arrays or [np.empty(shape, self.kv_dtype) for _ in self.past_names]
        start = 0
        for part, rows, part_width in parts:
            self._copy_rows(layers, range(start, start + len(rows)), width, part, rows, part_width)
            start += len(rows)
        if cache.arrays:
            cache.length = width
        else:
            cache.values = [self._ortvalue(layer) for layer in layers]
        return cache

    def place_rows(
        self,
        cache: FastCache,
        width: int,
        slots: Sequence[int],
        source: FastCache,
        rows: Sequence[int],
        source_width: int,
        capacity: int | None = None,
    ) -> FastCache:
        """``cache`` (``width`` columns) with ``rows`` of ``source`` written over its rows ``slots``,
        right-aligned as in ``regroup_cache``: a newcomer takes a finished row's place without copying
        the batch. In place on CPU (a shared cache that ``capacity`` outgrows is regrouped first); a
        device cache makes the round trip through host memory."""
        if cache.arrays and capacity and capacity > cache.arrays[0].shape[2]:
            cache = self.regroup_cache([(cache, range(cache.arrays[0].shape[0]), width)], width, capacity)
        layers = cache.arrays or _numpy(cache.values)  # views of the cache on CPU
        self._copy_rows(layers, slots, width, source, rows, source_width)
        if self.device == "cpu":
            return cache
        return FastCache([self._ortvalue(layer) for layer in layers])

    def _copy_rows(self, layers, slots, width: int, source: FastCache, rows, source_width: int) -> None:
        """Row ``rows[i]`` of ``source`` into row ``slots[i]`` of ``layers`` [B, H, >= width, D], the
        source's last columns to the target's last ``width`` ones, the target's leading columns zeroed.
        Keys that move on a ``rope_by_column`` graph are rotated by the shift (``_rotated``)."""
        kept, shift = min(source_width, width), width - source_width
        sources = [a[:, :, :source_width] for a in source.arrays] if source.arrays else _numpy(source.values)
        for layer, src, is_key in zip(layers, sources, self._keys, strict=True):
            rotate = is_key and self.variant.rope_by_column and shift != 0
            for slot, row in zip(slots, rows, strict=True):
                block = src[row, :, source_width - kept : source_width]
                layer[slot, :, width - kept : width] = self._rotated(block, shift) if rotate else block
                layer[slot, :, : width - kept] = 0

    def _rotated(self, keys: np.ndarray, shift: int) -> np.ndarray:
        """``keys`` [..., D] rotated by ``shift`` positions, RoPE's rotate-half layout.

        Rotations compose, R(n + s) = R(s) R(n), so a key rotated for column n becomes the key for
        column n + s. R(s) is the graph's own table row s (row -s: the transposed rotation) divided by
        its scale (row 0's cosine); the result equals a fresh rotation up to float32 rounding.
        """
        if self._rope is None:
            self._rope = _rope_tables(self.graph)
        cos, sin = self._rope
        half = cos.shape[1]
        c = (cos[abs(shift)] / cos[0, 0]).astype(np.float32)
        s = (np.sign(shift) * sin[abs(shift)] / cos[0, 0]).astype(np.float32)
        first, second = keys[..., :half].astype(np.float32), keys[..., half : 2 * half].astype(np.float32)
        turned = [first * c - second * s, second * c + first * s, keys[..., 2 * half :]]
        return np.concatenate(turned, axis=-1).astype(keys.dtype)

    # -- one step ---------------------------------------------------------------------------------
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
        computes every position's logits (the default) and ``forward`` slices the last one.
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


def _numpy(values: list[Any]) -> list[np.ndarray]:
    """``OrtValue``s as arrays (views of ORT's memory on CPU, host copies of device memory)."""
    return [value.numpy() for value in values]


def _rope_tables(graph: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The (cos, sin) tables of a fused graph file (its other weights stay on disk)."""
    import onnx
    from onnx import numpy_helper

    if graph is None:
        raise StillroomError(
            "this engine has no graph file to read the RoPE tables from", "open it with open_engine"
        )
    model = onnx.load(str(graph), load_external_data=False)
    tables = {t.name: t for t in model.graph.initializer if t.name in ROPE_TABLES}
    if len(tables) != len(ROPE_TABLES):
        raise StillroomError(f"the fused graph '{graph}' has no RoPE tables {ROPE_TABLES}", "re-export it")
    return tuple(numpy_helper.to_array(tables[n], base_dir=str(graph.parent)) for n in ROPE_TABLES)
