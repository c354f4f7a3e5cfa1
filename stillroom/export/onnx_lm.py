"""Causal LM -> one validated ONNX graph serving prefill and decode with an explicit KV cache.

The graph is ``KVCacheLM`` (Optimum's names: ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key/.value`` -> ``logits``, ``present.{i}.key/.value``), exported with the
dynamo exporter from batch-2 examples (dynamo specialises sizes 0 and 1; the past length is then
declared with minimum 0 so a prefill feeds an empty cache). The fp32 graph must pass
``lm_validation`` before anything else happens; ``optimize`` / ``int8`` / ``fp16`` variants are
derived from it and validated again. The tokenizer is saved into ``tokenizer/``.

``fused=True`` (Llama / Mistral / Qwen2) writes the graph with ORT's fused decoder operators instead
(``lm_fused``; same names, validated with the same fp32 checks); ``last_logits=True`` adds the
optional ``logits_to_keep`` input to the dynamo graph (``lm_fast_graph``; the fused graph has it).
``weight_only="int4" | "int8"`` then stores the MatMul weights for ``MatMulNBits`` (``quantize_lm``)
and validates the result with the task-level thresholds of ``lm_validation``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stillroom.core import artifact
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import atomic_dir
from stillroom.export import lm_fast_graph, lm_fused, lm_validation, onnx_graph, ort_util, staging, variants
from stillroom.export.kv_cache_lm import CacheGeometry, KVCacheLM
from stillroom.export.source import detect

log = logging.getLogger(__name__)


def load_lm(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    except (OSError, ValueError) as err:
        raise StillroomError(
            f"cannot load a causal LM from '{model_dir}': {' '.join(str(err).split())[:200]}",
            "give a transformers causal-LM directory",
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model.eval().requires_grad_(False), tokenizer


def export_lm_graph(model, path: Path, opset: int | None = None) -> onnx_graph.Exported:
    import torch

    geometry = CacheGeometry.of(model.config)
    batch, seq, past_len = 2, 3, 3
    ids = torch.randint(0, geometry.vocab_size, (batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    past = [t.normal_() for t in geometry.empty_past(batch, past_len)]
    return onnx_graph.export_module(
        KVCacheLM(model),
        (ids, mask, pos, past),
        path,
        geometry.input_names(),
        geometry.output_names(),
        geometry.dynamic_dims(),
        opset=opset,
        mins={"past_sequence_length": 0},
    )


def _check(model, tokenizer, graph: Path, precision: str, what: str, chunked: bool = True) -> dict:
    result = lm_validation.validate(model, ort_util.session(graph), tokenizer, precision, chunked=chunked)
    log.info("%s: %s", what, {k: v for k, v in result.items() if not isinstance(v, list | dict)})
    if not result["passed"]:
        raise staging.validation_failed(what, result)
    return result


def export_causal_lm(
    model_dir,
    out_dir,
    *,
    opset: int | None = None,
    int8: bool = False,
    fp16: bool = False,
    optimize: bool = False,
    fused: bool = False,
    last_logits: bool = False,
    weight_only: str | None = None,
) -> artifact.Artifact:
    """Exports and validates; the artifact at ``out_dir`` exists (with its manifest) only on success."""
    if sum(map(bool, (int8, fp16, weight_only))) > 1:
        raise StillroomError(
            "--int8, --fp16 and weight-only are exclusive", "export one variant per artifact"
        )
    if weight_only not in (None, "int4", "int8"):
        raise StillroomError(f"unknown weight-only scheme '{weight_only}'", "use int4 or int8")
    if fused and optimize:
        raise StillroomError("--fused and --optimize are exclusive", "the fused graph is already fused")
    source = detect(model_dir)
    if source.kind != "causal-lm":
        raise StillroomError(
            f"'{model_dir}' is not a causal LM", "use export_generator for generator students"
        )
    model, tokenizer = load_lm(source.model_dir)
    geometry = CacheGeometry.of(model.config)
    family = str(getattr(model.config, "model_type", ""))
    started = time.perf_counter()
    with atomic_dir(Path(out_dir)) as tmp:
        graph = staging.stage_dir(tmp, "fp32") / staging.GRAPH
        if fused:
            lm_fused.export_fused(model, graph)
            exported = onnx_graph.Exported(graph, "stillroom-fused")
        else:
            exported = export_lm_graph(model, graph, opset)
            if last_logits:
                lm_fast_graph.edit_file(graph, graph)
        chunked = not fused
        validation = {"fp32": _check(model, tokenizer, graph, "fp32", "fp32 ONNX graph", chunked)}
        fp32_bytes = variants.file_bytes(graph)
        extra: dict = {"fp32_bytes": fp32_bytes}
        if optimize:
            opt = staging.stage_dir(tmp, "optimized") / staging.GRAPH
            extra["optimizer_model_type"] = variants.optimize(
                graph,
                opt,
                family,
                getattr(model.config, "num_attention_heads", 0),
                getattr(model.config, "hidden_size", 0),
            )
            validation["optimized"] = _check(model, tokenizer, opt, "fp32", "ORT-optimised graph")
            graph = opt
        precision = "int8" if int8 else "fp16" if fp16 else f"{weight_only}-wo" if weight_only else "fp32"
        if precision != "fp32":
            variant = staging.stage_dir(tmp, precision) / staging.GRAPH
            if weight_only:
                variants.quantize_weight_only(graph, variant, weight_only)
            else:
                (variants.quantize_int8 if int8 else variants.convert_fp16)(graph, variant)
            validation[precision] = _check(
                model, tokenizer, variant, precision, f"{precision} graph", chunked
            )
            graph = variant
        staging.promote(graph.parent, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        inputs, outputs = onnx_graph.tensor_specs(tmp / staging.GRAPH)
        final = validation[precision if precision != "fp32" else ("optimized" if optimize else "fp32")]
        extra.update(
            {
                "cache": {
                    "layers": geometry.layers,
                    "kv_heads": geometry.kv_heads,
                    "head_dim": geometry.head_dim,
                    "vocab_size": geometry.vocab_size,
                    "layout": "batch, kv_heads, sequence, head_dim",
                },
                "model_type": family,
                "optimized": optimize,
                "fused": fused,
                "chunked_prefill": chunked,
                "logits": "all positions; optional input logits_to_keep=k keeps the last k"
                if fused or last_logits
                else "all positions",
                "export_seconds": round(time.perf_counter() - started, 3),
                "graph_bytes": variants.file_bytes(tmp / staging.GRAPH),
            }
        )
        if exported.dynamo_error:
            extra["dynamo_error"] = exported.dynamo_error
        manifest = artifact.Manifest(
            kind="causal-lm",
            format="onnx",
            exporter=exported.exporter,
            precision=precision,
            graphs={"model": staging.GRAPH},
            inputs=inputs,
            outputs=outputs,
            tokenizer="tokenizer" if tokenizer is not None else None,
            source=source.info,
            versions=onnx_graph.versions(),
            validation={**final, "stages": validation},
            extra=extra,
        )
        artifact.write_manifest(tmp, manifest)
    return artifact.load(out_dir)
