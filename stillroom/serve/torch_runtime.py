"""The ``torch`` runtime: teachers and students in eager PyTorch (``compile=True``: torch.compile).

Targets:
- an artifact directory: the model it was exported from (``source["model_dir"]`` / ``["student_dir"]``),
  so the same student can be timed in PyTorch and in ONNX Runtime;
- a transformers causal-LM directory, ``embedded:NAME`` or hub id: an LM (the generation loop with a
  transformers KV cache);
- a generator student directory (``stillroom.json`` + ``unet/``): its few-step sampler;
- a diffusers teacher directory / ``embedded:NAME`` with ``unet/`` + ``scheduler/``: the teacher with
  DDIM (``steps``, default 50, and optional classifier-free ``guidance``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core import artifact as artifacts
from stillroom.core.errors import StillroomError
from stillroom.data import resolve
from stillroom.serve.loaded import ImageGenerator, LanguageModel

TEACHER_STEPS = 50


class TorchCausalLM:
    """The ``LMBackend`` of a transformers causal LM; the cache is the model's own ``Cache`` object."""

    def __init__(self, model, device: str) -> None:
        import inspect

        self.model, self.device = model, device
        params = inspect.signature(model.forward).parameters  # transformers 5 renamed past_key_values
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def new_cache(self, batch: int, capacity: int | None = None) -> Any:
        from transformers import DynamicCache

        return DynamicCache()

    def _tensor(self, a: np.ndarray):
        import torch

        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long, device=self.device)

    def forward(self, input_ids, attention_mask, position_ids, cache) -> tuple[np.ndarray, Any]:
        import torch

        with torch.inference_mode():
            out = self.model(
                input_ids=self._tensor(input_ids),
                attention_mask=self._tensor(attention_mask),
                position_ids=self._tensor(position_ids),
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_arg: cache},
            )
        return out.logits[:, -1].float().cpu().numpy(), out.past_key_values

    def full_logits(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(input_ids=self._tensor(input_ids), use_cache=False).logits.float().cpu().numpy()


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StillroomError("the torch runtime was asked for CUDA but no GPU is visible", "use --device cpu")
    return name


def _source_of_artifact(root: Path) -> tuple[str, str]:
    manifest = artifacts.read_manifest(root)
    source = manifest.source
    for key in ("model_dir", "student_dir", "path"):
        if source.get(key):
            return manifest.kind, str(source[key])
    for key in ("run_dir", "run"):
        if source.get(key):
            return manifest.kind, str(Path(source[key]) / "student")
    raise StillroomError(
        f"artifact '{root}' does not record the model it was exported from",
        "give the torch runtime the model directory itself",
    )


def _torch_lm(spec: str, device: str, compile: bool, name: str) -> LanguageModel:
    import torch

    from stillroom.core.models import load_causal_lm

    model, tokenizer = load_causal_lm(spec, role="model")
    model = model.to(device).eval()
    if compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    return LanguageModel(
        name,
        "torch",
        TorchCausalLM(model, device),
        tokenizer,
        device=device,
        provider=device,
        info={"model": spec, "compile": compile},
    )


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

    from stillroom.core.generator import load_generator

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
    from stillroom.core import diffusion_models

    encoder, tokenizer = loaded or diffusion_models.load_text_encoder(root)
    encoder = encoder.to(device)

    def encode(prompts: list[str]) -> np.ndarray:
        return diffusion_models.encode_prompts(encoder, tokenizer, list(prompts)).float().cpu().numpy()

    return encode


def _teacher_generator(
    spec: str, device: str, steps: int | None, guidance: float | None, name: str
) -> ImageGenerator:
    import torch

    from stillroom.core import diffusion_models as dm

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
) -> LanguageModel | ImageGenerator:
    """Loads ``target`` (see the module docstring) for eager / compiled PyTorch inference."""
    device = _device(device)
    spec = str(target)
    label = name or Path(spec).name or spec
    path = Path(resolve(spec)).expanduser()
    if (path / artifacts.MANIFEST).is_file():
        kind, spec = _source_of_artifact(path)
        path = Path(resolve(spec)).expanduser()
        if kind == "causal-lm":
            return _torch_lm(spec, device, compile, label)
    if (path / "stillroom.json").is_file() and (path / "unet").is_dir():
        card = json.loads((path / "stillroom.json").read_text())
        if card.get("sampler"):
            return _student_generator(path, device, compile, steps, label)
    if (path / "unet").is_dir() and (path / "scheduler").is_dir():
        return _teacher_generator(spec, device, steps, guidance, label)
    return _torch_lm(spec, device, compile, label)
