"""How each runtime loads a few-step generator: torch (the student or a DDIM teacher), onnxruntime
(the unrolled sampler graph), tensorrt (its engine).

Every loader returns an ``ImageGenerator``: ``generate(noise, class_labels, ...)`` -> images in
[-1, 1], with the sampler's image shape and conditioning (an artifact's typed ``spec``), so bench and
serve see the same object whichever runtime produced it. Torch targets (an artifact is refused: it
holds graphs, and its student directory is not read behind its back):

- a generator student directory (``stillroom.json`` + ``unet/``): its few-step sampler;
- a diffusers teacher directory / ``embedded:NAME`` with ``unet/`` + ``scheduler/``: the teacher with
  DDIM, or Euler for a flow-matching teacher (``steps``, default 50, and optional classifier-free
  ``guidance``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core import artifact as artifacts
from stillroom.core import runtime
from stillroom.core.errors import StillroomError
from stillroom.core.ort_session import GPU_PROVIDERS, SessionOptions, open_session
from stillroom.core.tokenizer import load_tokenizer
from stillroom.data import resolve
from stillroom.plugins.diffusion.spec import spec_of

TEACHER_STEPS = 50
RUNTIMES = ("torch", "onnxruntime", "tensorrt")


@dataclass
class ImageGenerator:
    """A K-step sampler: ``generate(noise, class_labels, ...)`` -> images [B, C, H, W] in [-1, 1]."""

    name: str
    runtime: str
    run: Any  # callable(noise, class_labels=None, encoder_hidden_states=None, guidance_scale=None) -> ndarray
    sampler: dict[str, Any]
    device: str = "cpu"
    provider: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    encode: Any = None  # text-conditional: callable(list[str]) -> encoder_hidden_states [B, L, D]
    kind: str = "generator"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.sampler.get("image_size", 28)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(self.sampler.get("channels", 1)), int(h), int(w)

    @property
    def num_classes(self) -> int | None:
        n = self.sampler.get("num_classes")
        return int(n) if n else None

    @property
    def conditioning(self) -> str:
        return str(self.sampler.get("conditioning") or ("class" if self.num_classes else "none"))

    def noise(self, batch: int, seed: int | None) -> np.ndarray:
        """Standard normal noise, float32; the same seed gives the same noise on every runtime."""
        return np.random.default_rng(seed).standard_normal((batch, *self.image_shape)).astype(np.float32)

    def generate(
        self,
        noise: np.ndarray,
        class_labels: np.ndarray | None = None,
        encoder_hidden_states: np.ndarray | None = None,
        guidance_scale: float | None = None,
    ) -> np.ndarray:
        out = self.run(
            noise,
            class_labels=class_labels,
            encoder_hidden_states=encoder_hidden_states,
            guidance_scale=guidance_scale,
        )
        return np.asarray(out, dtype=np.float32)


# -- torch ----------------------------------------------------------------------------------------
def _torch_call(module, device: str):
    import torch

    def run(noise, class_labels=None, encoder_hidden_states=None, guidance_scale=None):
        with torch.inference_mode():
            kwargs = {}
            if class_labels is not None:
                kwargs["class_labels"] = torch.as_tensor(
                    np.asarray(class_labels), dtype=torch.long, device=device
                )
            if encoder_hidden_states is not None:
                kwargs["encoder_hidden_states"] = torch.as_tensor(encoder_hidden_states, device=device)
            if guidance_scale is not None:
                kwargs["guidance_scale"] = float(guidance_scale)
            out = module(torch.as_tensor(noise, device=device), **kwargs)
        return out.float().cpu().numpy()

    return run


def _student_generator(
    path: Path, device: str, compile: bool, steps: int | None, name: str
) -> ImageGenerator:
    import torch

    from stillroom.plugins.diffusion.sampler import load_generator

    gen = load_generator(path, steps=steps).to(device)
    if compile:
        gen.forward = torch.compile(gen.forward)
    encode = None
    if (path / "text_encoder").is_dir():
        encode = _prompt_encoder(path, device)
    return ImageGenerator(
        name,
        "torch",
        _torch_call(gen, device),
        dict(gen.sampler),
        device=device,
        provider=device,
        encode=encode,
        info={"model": str(path), "steps": gen.steps},
    )


def _prompt_encoder(root: Path | str, device: str, loaded=None):
    from stillroom.plugins.diffusion import models as diffusion_models

    encoder, tokenizer = loaded or diffusion_models.load_text_encoder(root)
    encoder = encoder.to(device)

    def encode(prompts: list[str]) -> np.ndarray:
        return diffusion_models.encode_prompts(encoder, tokenizer, list(prompts)).float().cpu().numpy()

    return encode


def _teacher_generator(
    spec: str, device: str, steps: int | None, guidance: float | None, name: str
) -> ImageGenerator:
    import torch

    from stillroom.plugins.diffusion import models as dm

    teacher = dm.load_teacher(spec)
    teacher.unet.to(device)
    if teacher.vae is not None:
        teacher.vae.to(device)
    k = steps or TEACHER_STEPS

    def run(noise, class_labels=None, encoder_hidden_states=None, guidance_scale=None):
        x = torch.as_tensor(noise, device=device)
        w = guidance_scale if guidance_scale is not None else guidance
        if teacher.conditioning == "class":
            cond, uncond = dm.class_cond(
                torch.as_tensor(np.asarray(class_labels), dtype=torch.long, device=device), teacher.null_class
            )
        elif teacher.conditioning == "text":
            states = torch.as_tensor(encoder_hidden_states, device=device)
            empty = dm.encode_prompts(teacher.text_encoder, teacher.tokenizer, [""]).to(device)
            cond = {"encoder_hidden_states": states}
            uncond = {"encoder_hidden_states": empty.expand(states.shape[0], -1, -1)}
        else:
            cond, uncond = {}, {}
        return dm.teacher_sample(teacher, x, cond, uncond, k, guidance=w).float().cpu().numpy()

    sampler = {
        "steps": k,
        "guidance": guidance,
        "conditioning": teacher.conditioning,
        "num_classes": teacher.num_classes,
        "image_size": teacher.image_size,
        "channels": teacher.channels,
    }
    encode = None
    if teacher.conditioning == "text":
        encode = _prompt_encoder(spec, device, loaded=(teacher.text_encoder, teacher.tokenizer))
    return ImageGenerator(
        name,
        "torch",
        run,
        sampler,
        device=device,
        provider=device,
        encode=encode,
        info={"model": spec, "steps": k, "sampler": "ddim"},
    )


def load_torch(
    target: str | Path,
    device: str = "cpu",
    compile: bool = False,
    steps: int | None = None,
    guidance: float | None = None,
    name: str | None = None,
) -> ImageGenerator:
    """Loads ``target`` (see the module docstring) for eager / compiled PyTorch inference."""
    device = runtime.torch_device(device)
    spec = str(target)
    label = name or Path(spec).name or spec
    path = Path(resolve(spec)).expanduser()
    runtime.refuse_artifact(path)
    if (path / "stillroom.json").is_file() and (path / "unet").is_dir():
        card = json.loads((path / "stillroom.json").read_text())
        if card.get("sampler"):
            return _student_generator(path, device, compile, steps, label)
    if (path / "unet").is_dir() and (path / "scheduler").is_dir():
        return _teacher_generator(spec, device, steps, guidance, label)
    raise StillroomError(
        f"'{target}' is neither a generator student nor a diffusers teacher",
        "give a student directory (stillroom.json + unet/) or a teacher with unet/ and scheduler/",
    )


# -- onnxruntime ----------------------------------------------------------------------------------
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


def _ort_prompt_encoder(art: artifacts.Artifact, opts: SessionOptions):
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


def load_onnxruntime(
    target: str | Path,
    provider: str = "auto",
    allow_fallback: bool = False,
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    name: str | None = None,
) -> ImageGenerator:
    """Opens an ONNX generator artifact (verified through its manifest) on ``provider``."""
    art = runtime.open_artifact(target, "onnx")
    opts = SessionOptions(
        provider=provider,
        allow_fallback=allow_fallback,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
    )
    session, active = open_session(art.graph("model"), opts)
    label = name or Path(target).name
    info = {
        "artifact": str(target),
        "precision": art.manifest.precision,
        "provenance": art.manifest.provenance.model_dump(),
    }
    device = "cuda" if active in GPU_PROVIDERS else "cpu"
    sampler = spec_of(art.manifest).model_dump()
    vae = open_session(art.graph("vae_decoder"), opts)[0] if "vae_decoder" in art.manifest.graphs else None
    encode = _ort_prompt_encoder(art, opts) if "text_encoder" in art.manifest.graphs else None
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


# -- tensorrt -------------------------------------------------------------------------------------
def load_tensorrt(target: str | Path, name: str | None = None) -> ImageGenerator:
    from stillroom.core.tensorrt_engine import EngineRunner

    art = runtime.open_artifact(target, "tensorrt")
    runner = EngineRunner(art.graph("model"))
    label = name or Path(target).name
    info = {"artifact": str(target), "precision": art.manifest.precision}
    sampler = spec_of(art.manifest).model_dump()

    def run(noise, class_labels=None, encoder_hidden_states=None, guidance_scale=None):
        feeds: dict[str, Any] = {"noise": noise}
        if "class_labels" in runner.inputs:
            feeds["class_labels"] = np.asarray(class_labels, dtype=np.int64)
        if "encoder_hidden_states" in runner.inputs:
            feeds["encoder_hidden_states"] = encoder_hidden_states
        if "guidance_scale" in runner.inputs:
            scale = guidance_scale if guidance_scale is not None else float(sampler.get("guidance") or 1.0)
            feeds["guidance_scale"] = np.array([scale], dtype=np.float32)
        return runner(feeds)[runner.outputs[0]].float().cpu().numpy()

    return ImageGenerator(label, "tensorrt", run, sampler, device="cuda", provider="tensorrt", info=info)


def load(runtime_name: str, target: str, **options: Any) -> ImageGenerator:
    """``Family.load`` for generators."""
    loaders = {"torch": load_torch, "onnxruntime": load_onnxruntime, "tensorrt": load_tensorrt}
    if runtime_name not in loaders:
        raise StillroomError(
            f"generators have no '{runtime_name}' runtime", f"use one of: {', '.join(loaders)}"
        )
    return loaders[runtime_name](target, **options)
