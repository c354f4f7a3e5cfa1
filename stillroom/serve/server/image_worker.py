"""Image jobs: the noise of every request in a batch concatenated into one sampler call.

Each request draws its own noise from its own seed (``ImageGenerator.noise``), so a seeded request
returns the same images whether it ran alone or inside a batch. Requests with different guidance
scales run as separate calls of the same batch.
"""

from __future__ import annotations

import base64
import io

import numpy as np

from stillroom.plugins.diffusion.runtime import ImageGenerator
from stillroom.serve.server.batcher import Job
from stillroom.serve.server.metrics import Metrics


class ImageJob(Job):
    def __init__(
        self, n: int, seed: int, class_label: int | None, prompt: str | None, guidance_scale: float | None
    ) -> None:
        super().__init__()
        self.size, self.seed, self.class_label, self.prompt = n, seed, class_label, prompt
        self.guidance_scale = guidance_scale


def run_image_batch(model: ImageGenerator, metrics: Metrics, jobs: list[ImageJob]) -> None:
    groups: dict[float | None, list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault(job.guidance_scale, []).append(job)
    for scale, group in groups.items():
        noise = np.concatenate([model.noise(job.size, job.seed) for job in group])
        labels = states = None
        if model.conditioning == "class":
            labels = np.concatenate([np.full(job.size, job.class_label, dtype=np.int64) for job in group])
        elif model.conditioning == "text":
            prompts = [job.prompt or "" for job in group for _ in range(job.size)]
            states = model.encode(prompts)
        images = model.generate(
            noise, class_labels=labels, encoder_hidden_states=states, guidance_scale=scale
        )
        start = 0
        for job in group:
            job.put(images[start : start + job.size])
            start += job.size
    metrics.generated(images=sum(job.size for job in jobs))


def to_png_b64(image: np.ndarray) -> str:
    """One image [C, H, W] in [-1, 1] as a base64 PNG (grayscale for C=1, RGB for C=3)."""
    from PIL import Image

    pixels = np.clip(np.round((np.asarray(image, dtype=np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if pixels.shape[0] == 1:
        pil = Image.fromarray(pixels[0], mode="L")
    else:
        pil = Image.fromarray(np.transpose(pixels[:3], (1, 2, 0)), mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
