"""The ``onnxruntime`` runtime: ONNX artifacts (causal LMs with a KV cache, unrolled generators)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core import artifact as artifacts
from stillroom.core.errors import StillroomError
from stillroom.serve.artifact_tokenizer import load_tokenizer
from stillroom.serve.fast_lm import FastLM
from stillroom.serve.loaded import ImageGenerator, LanguageModel
from stillroom.serve.ort_session import GPU_PROVIDERS, SessionOptions, open_session


class OrtGenerator:
    """Calls the unrolled sampler graph; feeds only the inputs the graph declares."""

    def __init__(self, session, active_provider: str, sampler: dict[str, Any], vae_decoder=None) -> None:
        self.session, self.provider, self.sampler, self.vae_decoder = (
            session,
            active_provider,
            sampler,
            vae_decoder,
        )
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.output = session.get_outputs()[0].name
        if "noise" not in self.inputs:
            raise StillroomError("the generator graph has no 'noise' input", "re-export the generator")

    def __call__(
        self, noise: np.ndarray, class_labels=None, encoder_hidden_states=None, guidance_scale=None
    ) -> np.ndarray:
        feeds: dict[str, np.ndarray] = {"noise": np.ascontiguousarray(noise, dtype=np.float32)}
        batch = noise.shape[0]
        if "class_labels" in self.inputs:
            if class_labels is None:
                raise StillroomError("this generator is class-conditional", "give class labels")
            feeds["class_labels"] = np.asarray(class_labels, dtype=np.int64).reshape(batch)
        if "encoder_hidden_states" in self.inputs:
            if encoder_hidden_states is None:
                raise StillroomError("this generator is text-conditional", "give a prompt")
            feeds["encoder_hidden_states"] = np.ascontiguousarray(encoder_hidden_states, dtype=np.float32)
        if "guidance_scale" in self.inputs:
            scale = (
                guidance_scale if guidance_scale is not None else float(self.sampler.get("guidance") or 1.0)
            )
            rank = len(self.inputs["guidance_scale"].shape)
            feeds["guidance_scale"] = np.array(scale, dtype=np.float32).reshape((1,) * rank)
        out = _run(self.session, self.provider, self.output, feeds)
        if self.vae_decoder is not None:  # latent students: the graph returns latents, the VAE decodes them
            vae = self.vae_decoder
            out = _run(vae, self.provider, vae.get_outputs()[0].name, {vae.get_inputs()[0].name: out})
        return out


def _run(session, provider: str, output: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """One call; on a GPU provider through IOBinding (inputs copied once, output bound to host)."""
    if provider not in GPU_PROVIDERS:
        return session.run([output], feeds)[0]
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    binding.bind_output(output, "cpu")
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]


def _prompt_encoder(art: artifacts.Artifact, opts: SessionOptions):
    """Text-conditional artifacts: tokenizer + ``text_encoder`` graph -> encoder_hidden_states."""
    session, active = open_session(art.graph("text_encoder"), opts)
    tokenizer = load_tokenizer(art.path(art.manifest.tokenizer))
    spec = session.get_inputs()[0]
    length = spec.shape[1] if isinstance(spec.shape[1], int) else tokenizer.model_max_length
    output = session.get_outputs()[0].name

    def encode(prompts: list[str]) -> np.ndarray:
        ids = tokenizer(
            list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="np"
        ).input_ids.astype(np.int64)
        return _run(session, active, output, {spec.name: ids})

    return encode


def _context_length(source: dict[str, Any]) -> int | None:
    """max_position_embeddings of the exported model, when its config.json is still where export found it."""
    import json

    for key in ("model_dir", "path"):
        config = Path(str(source.get(key, ""))) / "config.json"
        if source.get(key) and config.is_file():
            try:
                value = json.loads(config.read_text()).get("max_position_embeddings")
            except (OSError, ValueError):
                return None
            return int(value) if value else None
    return None


def _tokenizer(art: artifacts.Artifact):
    if not art.manifest.tokenizer:
        raise StillroomError(f"causal-LM artifact '{art.root}' has no tokenizer", "re-run the export")
    tok = load_tokenizer(art.path(art.manifest.tokenizer))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_onnxruntime(
    target: str | Path,
    provider: str = "auto",
    allow_fallback: bool = False,
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    name: str | None = None,
) -> LanguageModel | ImageGenerator:
    """Opens an ONNX artifact (verified through its manifest) on the requested provider."""
    art = artifacts.load(target)
    if art.manifest.format != "onnx":
        raise StillroomError(
            f"artifact '{target}' is '{art.manifest.format}', not onnx",
            "use --runtime tensorrt for TensorRT engines",
        )
    opts = SessionOptions(
        provider=provider,
        allow_fallback=allow_fallback,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
    )
    session, active = open_session(art.graph("model"), opts)
    label = name or Path(target).name
    info = {"artifact": str(target), "precision": art.manifest.precision, "source": art.manifest.source}
    device = "cuda" if active in GPU_PROVIDERS else "cpu"
    if art.kind == "causal-lm":
        cache = art.manifest.extra.get("cache", {})
        backend = FastLM(session=session, device_id=opts.device_id, kv_heads=cache.get("kv_heads"),
                         head_dim=cache.get("head_dim"))
        info["context_length"] = _context_length(art.manifest.source)
        return LanguageModel(
            label, "onnxruntime", backend, _tokenizer(art), device=device, provider=active, info=info
        )
    sampler = dict(art.manifest.sampler or {})
    sampler.setdefault("conditioning", art.manifest.extra.get("conditioning"))
    vae = open_session(art.graph("vae_decoder"), opts)[0] if "vae_decoder" in art.manifest.graphs else None
    encode = _prompt_encoder(art, opts) if "text_encoder" in art.manifest.graphs else None
    return ImageGenerator(
        label,
        "onnxruntime",
        OrtGenerator(session, active, sampler, vae),
        sampler,
        device=device,
        provider=active,
        encode=encode,
        info=info,
    )
