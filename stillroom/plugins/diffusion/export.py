"""Few-step generator -> one validated ONNX graph: the whole K-step sampler unrolled.

``FewStepGenerator.forward`` holds its schedule in buffers and has no random ops, so the dynamo
exporter unrolls its K UNet evaluations (and CFG, boundary scalings, the VAE decode of latent
students) into one graph:

    noise [B, C, H, W]  (+ class_labels [B] int64 | encoder_hidden_states [B, L, D])
                        (+ guidance_scale [B] when the sampler applies guidance at sampling time)
        -> image [B, C', H', W'] in [-1, 1]

with a dynamic batch. A text-conditional student's CLIP text encoder becomes its own graph
(``input_ids [B, L] -> encoder_hidden_states``) and its tokenizer is copied; a latent student's VAE
decoder becomes ``vae_decoder`` (``latents -> image``). Every graph is validated against PyTorch
(``export_validation``) before the manifest is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stillroom.core import artifact, onnx_export, onnx_variants, ort_session, provenance, staging
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import atomic_dir
from stillroom.core.source import detect
from stillroom.plugins.diffusion import export_validation
from stillroom.plugins.diffusion import spec as sampler_spec

log = logging.getLogger(__name__)
BATCH = "batch_size"


class SamplerGraph(nn.Module):
    """The generator with exactly the graph's inputs as positional arguments."""

    def __init__(self, generator: nn.Module, conditioning: str | None, guided: bool) -> None:
        super().__init__()
        self.generator, self.conditioning, self.guided = generator, conditioning, guided

    def forward(
        self, noise: torch.Tensor, second: torch.Tensor | None = None, third: torch.Tensor | None = None
    ) -> torch.Tensor:
        rest_list = [t for t in (second, third) if t is not None]  # the inputs after noise, in order
        kwargs: dict[str, Any] = {}
        if self.conditioning == "class":
            kwargs["class_labels"] = rest_list.pop(0)
        elif self.conditioning == "text":
            kwargs["encoder_hidden_states"] = rest_list.pop(0)
        if self.guided:
            kwargs["guidance_scale"] = rest_list.pop(0)
        return self.generator(noise, **kwargs)


class TextEncoderGraph(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids).last_hidden_state


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module, scaling_factor: float) -> None:
        super().__init__()
        self.vae, self.scaling_factor = vae, scaling_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample.clamp(-1.0, 1.0)


def describe(generator: nn.Module) -> dict[str, Any]:
    """The graph's input geometry, read from the generator and its UNet config."""
    sampler = dict(getattr(generator, "sampler", {}) or {})
    unet_config = generator.unet.config
    size = unet_config.sample_size
    size = int(size[0] if isinstance(size, list | tuple) else size)
    conditioning = getattr(generator, "conditioning", None)
    guided = getattr(generator, "guidance", None) is not None or bool(
        getattr(generator, "guidance_embed", False)
    )
    info = {
        "conditioning": conditioning,
        "guided": guided,
        "channels": int(unet_config.in_channels),
        "size": size,
        "sampler": sampler,
    }
    if conditioning == "class":
        info["num_classes"] = int(sampler.get("num_classes") or (unet_config.num_class_embeds - 1))
    if conditioning == "text":
        info["text_dim"] = int(unet_config.cross_attention_dim)
        emb = getattr(generator, "uncond_embedding", None)
        info["text_length"] = int(emb.shape[1]) if emb is not None else 8
    return info


def input_names(info: dict[str, Any]) -> list[str]:
    names = ["noise"]
    if info["conditioning"] == "class":
        names.append("class_labels")
    elif info["conditioning"] == "text":
        names.append("encoder_hidden_states")
    if info["guided"]:
        names.append("guidance_scale")
    return names


def make_inputs(info: dict[str, Any]) -> Callable[[int, np.random.Generator], dict[str, np.ndarray]]:
    def make(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        feeds = {
            "noise": rng.standard_normal(
                (batch, info["channels"], info["size"], info["size"]), dtype=np.float32
            )
        }
        if info["conditioning"] == "class":
            feeds["class_labels"] = rng.integers(0, info["num_classes"], size=batch).astype(np.int64)
        elif info["conditioning"] == "text":
            feeds["encoder_hidden_states"] = rng.standard_normal(
                (batch, info["text_length"], info["text_dim"]), dtype=np.float32
            )
        if info["guided"]:
            default = float(info["sampler"].get("guidance") or 2.0)
            feeds["guidance_scale"] = (default + rng.uniform(-0.5, 0.5, size=batch)).astype(np.float32)
        return feeds

    return make


def torch_reference(module: nn.Module, names: list[str]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    @torch.no_grad()
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return module(*[torch.from_numpy(feeds[n]) for n in names]).float().numpy()

    return run


def export_and_validate(
    module: nn.Module,
    names: list[str],
    output: str,
    make: Callable[[int, np.random.Generator], dict[str, np.ndarray]],
    path: Path,
    what: str,
    opset: int | None,
    dynamic: dict[str, dict[int, str]] | None = None,
) -> tuple[onnx_export.Exported, dict[str, Any]]:
    example = make(2, np.random.default_rng(0))
    args = tuple(torch.from_numpy(example[n]) for n in names)
    dynamic = dynamic or {n: {0: BATCH} for n in names}
    exported = onnx_export.export_module(
        module, args, path, names, [output], dynamic, opset=opset, optimize=False
    )
    result = export_validation.compare(
        torch_reference(module, names),
        ort_session.open_session(path, ort_session.SessionOptions.checks())[0],
        make,
    )
    result["exporter"] = exported.exporter
    log.debug("%s: %s", what, {k: v for k, v in result.items() if not isinstance(v, list | dict)})
    if not result["passed"]:
        raise staging.validation_failed(what, result)
    return exported, result


def export_generator_module(
    generator: nn.Module,
    out_dir,
    *,
    source: dict[str, Any] | None = None,
    model_dir: Path | None = None,
    text_encoder: nn.Module | None = None,
    tokenizer: Any = None,
    opset: int | None = None,
    fp16: bool = False,
    int8: bool = False,
) -> artifact.Artifact:
    """Exports an in-memory generator (anything with ``FewStepGenerator``'s forward and attributes);
    ``source`` is what export was pointed at and ``model_dir`` the student directory, if any (the
    manifest's provenance comes from its student card)."""
    if int8 and fp16:
        raise StillroomError("--int8 and --fp16 are exclusive", "export one variant per artifact")
    generator = generator.eval().requires_grad_(False)
    info = describe(generator)
    names = input_names(info)
    make = make_inputs(info)
    module = SamplerGraph(generator, info["conditioning"], info["guided"])
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    started = time.perf_counter()
    with atomic_dir(Path(out_dir)) as tmp:
        graph = staging.stage_dir(tmp, "fp32") / staging.GRAPH
        exported, fp32 = export_and_validate(module, names, "image", make, graph, "generator graph", opset)
        validation: dict[str, Any] = {"fp32": fp32}
        extra: dict[str, Any] = {"fp32_bytes": onnx_variants.file_bytes(graph)}
        if precision != "fp32":
            variant = staging.stage_dir(tmp, precision) / staging.GRAPH
            if int8:
                extra.update(_quantize_int8(graph, variant, make))
            else:
                onnx_variants.convert_fp16(graph, variant)
            result = export_validation.compare(
                torch_reference(module, names),
                ort_session.open_session(variant, ort_session.SessionOptions.checks())[0],
                make,
                precision,
            )
            log.debug("%s generator graph: %s", precision, result)
            if not result["passed"]:
                raise staging.validation_failed(f"{precision} generator graph", result)
            validation[precision] = result
            if int8:
                log.info(
                    "int8 generator graph validated (PSNR %.1f dB), but on CPU it measured no faster than "
                    "fp32 at batch 1 (0.86x fp32's time at batch 16, same FID-like, 4-step MNIST student) in "
                    "benchmarks/export_report.py --generator-pair; use it for batched CPU serving",
                    result["psnr_db"],
                )
            graph = variant
        staging.promote(graph.parent, tmp)
        graphs = {"model": staging.GRAPH}
        if text_encoder is not None:
            graphs["text_encoder"] = "text_encoder.onnx"
            validation["text_encoder"] = _export_text_encoder(
                text_encoder, tmp / graphs["text_encoder"], info, opset
            )[1]
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "tokenizer")
        vae = getattr(generator, "vae", None)
        if vae is not None:
            graphs["vae_decoder"] = "vae_decoder.onnx"
            validation["vae_decoder"] = _export_vae_decoder(generator, tmp / graphs["vae_decoder"], opset)[1]
        inputs, outputs = onnx_export.tensor_specs(tmp / staging.GRAPH)
        extra.update(
            {
                "export_seconds": round(time.perf_counter() - started, 3),
                "graph_bytes": onnx_variants.file_bytes(tmp / staging.GRAPH),
            }
        )
        if exported.dynamo_error:
            extra["dynamo_error"] = exported.dynamo_error
        final = validation[precision]
        spec = sampler_spec.from_sampler(info["sampler"], info["conditioning"])
        manifest = artifact.Manifest(
            kind="generator",
            family="diffusion",
            task=spec.task,
            format="onnx",
            exporter=exported.exporter,
            precision=precision,
            graphs=graphs,
            inputs=inputs,
            outputs=outputs,
            spec=spec.model_dump(mode="json"),
            tokenizer="tokenizer" if text_encoder is not None and tokenizer is not None else None,
            provenance=provenance.record(source or {}, model_dir),
            validation={**final, "stages": validation},
            extra=extra,
        )
        artifact.write_manifest(tmp, manifest)
    return artifact.load(out_dir)


CALIBRATION_BATCHES, CALIBRATION_BATCH, CALIBRATION_SEED = 4, 8, 1234


def _quantize_int8(graph: Path, variant: Path, make) -> dict[str, Any]:
    """int8 of the sampler graph's convolutions and matmuls, calibrated on its own kind of inputs.

    The activation ranges of static int8 are fixed at export (``onnx_variants.quantize_int8_static``),
    so they are calibrated on what the graph is fed in use: seeded noise, class labels / text states
    and guidance scales from the same input maker validation uses, on a seed validation does not use
    (validation must judge the ranges on inputs they were not fitted to). Returns the manifest extras:
    the method (``static-qdq`` or ``dynamic``) and per op type how many nodes are int8.
    """
    rng = np.random.default_rng(CALIBRATION_SEED)
    feeds = [make(CALIBRATION_BATCH, rng) for _ in range(CALIBRATION_BATCHES)]
    method = onnx_variants.quantize_int8_static(graph, variant, feeds)
    ops = onnx_variants.int8_op_counts(variant)
    log.info(
        "int8 generator graph (%s): %s", method, {k: f"{v['int8']}/{v['total']}" for k, v in ops.items()}
    )
    return {"int8_method": method, "int8_ops": ops}


def _export_text_encoder(encoder: nn.Module, path: Path, info: dict[str, Any], opset: int | None):
    vocab = int(encoder.config.vocab_size)
    length = info.get("text_length", 8)

    def make(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"input_ids": rng.integers(0, vocab, size=(batch, length)).astype(np.int64)}

    return export_and_validate(
        TextEncoderGraph(encoder.eval()),
        ["input_ids"],
        "encoder_hidden_states",
        make,
        path,
        "text encoder graph",
        opset,
    )


def _export_vae_decoder(generator: nn.Module, path: Path, opset: int | None):
    vae = generator.vae.eval()
    channels, size = int(generator.unet.config.in_channels), describe(generator)["size"]

    def make(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"latents": rng.standard_normal((batch, channels, size, size), dtype=np.float32)}

    return export_and_validate(
        VaeDecoderGraph(vae, generator.scaling_factor),
        ["latents"],
        "image",
        make,
        path,
        "VAE decoder graph",
        opset,
    )


def export_generator(
    student_dir,
    out_dir,
    *,
    steps: int | None = None,
    opset: int | None = None,
    fp16: bool = False,
    int8: bool = False,
) -> artifact.Artifact:
    """Loads a generator student (``stillroom.plugins.diffusion.sampler.load_generator``) and exports it."""
    from stillroom.plugins.diffusion.sampler import load_generator

    source = detect(student_dir)
    if source.kind != "generator":
        raise StillroomError(f"'{student_dir}' is not a generator student", "use export_causal_lm for LMs")
    generator = load_generator(source.model_dir, steps=steps)
    text_encoder = tokenizer = None
    if (source.model_dir / "text_encoder").is_dir():
        from stillroom.plugins.diffusion.models import load_text_encoder

        text_encoder, tokenizer = load_text_encoder(source.model_dir)
    info = {**source.info, "steps_requested": steps}
    info.pop("sampler", None)
    return export_generator_module(
        generator,
        out_dir,
        source=info,
        model_dir=source.model_dir,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        opset=opset,
        fp16=fp16,
        int8=int8,
    )
