"""Causal LM -> one validated ONNX graph serving prefill and decode with an explicit KV cache.

The graph is ``KVCacheLM`` (Optimum's names: ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key/.value`` -> ``logits``, ``present.{i}.key/.value``), exported with the
dynamo exporter from batch-2 examples (dynamo specialises sizes 0 and 1; the past length is then
declared with minimum 0 so a prefill feeds an empty cache). The fp32 graph must pass
``validation`` before anything else happens; ``optimize`` / ``int8`` / ``fp16`` variants are
derived from it and validated again. The tokenizer is saved into ``tokenizer/``.

``fused=True`` (Llama / Mistral / Qwen2) writes the graph with ORT's fused decoder operators instead
(``fused_graph``; same names, validated with the same fp32 checks); ``last_logits=True`` adds the
optional ``logits_to_keep`` input to the dynamo graph (``graph_edits``; the fused graph has it).
Which of these graphs was built is the manifest's ``variant`` (``engine.VARIANTS``); validation runs
every graph through the engine opened with that variant, as bench and serve will.
``weight_only="int4" | "int8"`` then stores the MatMul weights for ``MatMulNBits`` (``weight_only``)
and validates the result with the task-level thresholds of ``validation``.

The artifact also loads outside stillroom, in the Optimum / transformers layout: ``config.json`` and
``generation_config.json`` of the exported model and the tokenizer files sit beside ``model.onnx``
(so ``AutoConfig`` / ``AutoTokenizer.from_pretrained(artifact)`` and onnxruntime-genai's tokenizer
find them), and ``genai_config.json`` (``genai_config``) lets ``onnxruntime_genai.Model(artifact)``
generate from the graph; ``extra["genai"]`` says whether it can. The manifest's ``spec`` is
``spec.LMSpec`` (geometry, special ids, context length): loaders need nothing outside the artifact.
The tokenizer is saved into ``tokenizer/`` as well, the folder the manifest names: the TensorRT and
Triton exporters copy that folder whole, which the artifact root (graphs included) could not be.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stillroom.core import artifact, onnx_export, onnx_variants, provenance, staging
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import atomic_dir, write_json
from stillroom.core.ort_session import SessionOptions
from stillroom.core.source import detect
from stillroom.plugins.lm import spec as lm_spec
from stillroom.plugins.lm.engine import Variant, exported_variant, open_engine
from stillroom.plugins.lm.export import fused_graph, genai_config, graph_edits, validation
from stillroom.plugins.lm.export.kv_cache_module import CacheGeometry, KVCacheLM
from stillroom.plugins.lm.export.weight_only import quantize_weight_only

log = logging.getLogger(__name__)

# transformers model_type -> onnxruntime.transformers optimizer model type (gpt2 fusions fit Llama too)
OPTIMIZER_TYPES = {
    "gpt2": "gpt2",
    "llama": "gpt2",
    "mistral": "gpt2",
    "qwen2": "gpt2",
    "qwen3": "qwen3",
    "gpt_neox": "gpt_neox",
    "phi": "phi",
}


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


def export_lm_graph(model, path: Path, opset: int | None = None) -> onnx_export.Exported:
    import torch

    geometry = CacheGeometry.of(model.config)
    batch, seq, past_len = 2, 3, 3
    ids = torch.randint(0, geometry.vocab_size, (batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    past = [t.normal_() for t in geometry.empty_past(batch, past_len)]
    return onnx_export.export_module(
        KVCacheLM(model),
        (ids, mask, pos, past),
        path,
        geometry.input_names(),
        geometry.output_names(),
        geometry.dynamic_dims(),
        opset=opset,
        mins={"past_sequence_length": 0},
    )


def _check(model, tokenizer, graph: Path, variant: Variant, precision: str, what: str) -> dict:
    lm = open_engine(graph, variant, SessionOptions.checks())
    result = validation.validate(model, lm, tokenizer, precision)
    log.debug("%s: %s", what, {k: v for k, v in result.items() if not isinstance(v, list | dict)})
    if not result["passed"]:
        raise staging.validation_failed(what, result)
    return result


def _save_loadable_files(model, tokenizer, root: Path, variant: Variant) -> None:
    """What a consumer other than stillroom reads: the transformers configs and the tokenizer at the
    root (Optimum's layout), ``genai_config.json`` when genai runs this variant, and the tokenizer in
    ``tokenizer/`` for stillroom's readers."""
    model.config.save_pretrained(root)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(root)
    if tokenizer is not None:
        tokenizer.save_pretrained(root)
        tokenizer.save_pretrained(root / "tokenizer")
    if genai_config.genai_status(variant)["loadable"]:
        config = genai_config.build(model.config, model.generation_config, staging.GRAPH)
        write_json(root / genai_config.FILENAME, config)


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
    model_type = str(getattr(model.config, "model_type", ""))
    started = time.perf_counter()
    with atomic_dir(Path(out_dir)) as tmp:
        graph = staging.stage_dir(tmp, "fp32") / staging.GRAPH
        if fused:
            fused_graph.export_fused(model, graph)
            exported = onnx_export.Exported(graph, "stillroom-fused")
        else:
            exported = export_lm_graph(model, graph, opset)
            if last_logits:
                graph_edits.edit_file(graph, graph)
        variant = exported_variant(fused, last_logits)
        validation = {"fp32": _check(model, tokenizer, graph, variant, "fp32", "fp32 ONNX graph")}
        fp32_bytes = onnx_variants.file_bytes(graph)
        extra: dict = {"fp32_bytes": fp32_bytes}
        if optimize:
            opt = staging.stage_dir(tmp, "optimized") / staging.GRAPH
            extra["optimizer_model_type"] = onnx_variants.optimize(
                graph,
                opt,
                OPTIMIZER_TYPES.get(model_type, "gpt2"),
                getattr(model.config, "num_attention_heads", 0),
                getattr(model.config, "hidden_size", 0),
            )
            validation["optimized"] = _check(model, tokenizer, opt, variant, "fp32", "ORT-optimised graph")
            graph = opt
        precision = "int8" if int8 else "fp16" if fp16 else f"{weight_only}-wo" if weight_only else "fp32"
        if precision != "fp32":
            reduced = staging.stage_dir(tmp, precision) / staging.GRAPH
            if weight_only:
                quantize_weight_only(graph, reduced, weight_only)
            else:
                (onnx_variants.quantize_int8 if int8 else onnx_variants.convert_fp16)(graph, reduced)
            validation[precision] = _check(
                model, tokenizer, reduced, variant, precision, f"{precision} graph"
            )
            graph = reduced
        staging.promote(graph.parent, tmp)
        _save_loadable_files(model, tokenizer, tmp, variant)
        inputs, outputs = onnx_export.tensor_specs(tmp / staging.GRAPH)
        final = validation[precision if precision != "fp32" else ("optimized" if optimize else "fp32")]
        extra.update(
            {
                "optimized": optimize,
                "export_seconds": round(time.perf_counter() - started, 3),
                "graph_bytes": onnx_variants.file_bytes(tmp / staging.GRAPH),
                "genai": genai_config.genai_status(variant),
            }
        )
        if exported.dynamo_error:
            extra["dynamo_error"] = exported.dynamo_error
        manifest = artifact.Manifest(
            kind="causal-lm",
            family="lm",
            task="text-generation",
            format="onnx",
            exporter=exported.exporter,
            variant=variant,
            precision=precision,
            graphs={"model": staging.GRAPH},
            inputs=inputs,
            outputs=outputs,
            spec=lm_spec.from_model(model.config, model.generation_config, tokenizer).model_dump(),
            tokenizer="tokenizer" if tokenizer is not None else None,
            provenance=provenance.record(source.info, source.model_dir),
            validation={**final, "stages": validation},
            extra=extra,
        )
        artifact.write_manifest(tmp, manifest)
    return artifact.load(out_dir)
