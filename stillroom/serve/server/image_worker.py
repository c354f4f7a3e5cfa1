"""Image jobs: one sampler call per batch on the model thread, encoding on the finishing thread.

The model stage (``ImageBatch.__call__``) concatenates the noise of every request in the batch into
one contiguous buffer and calls the sampler once (once per guidance scale when requests differ).
Each request draws its noise from its own seed (``ImageGenerator.noise``), so a seeded request
returns the same images whether it ran alone or inside a batch. The finishing stage it returns runs
on the batcher's finishing thread while the model thread starts the next batch: the whole batch is
turned into uint8 pixels in one vectorised step, each image is encoded (PNG, lossless WebP or raw
pixels), and each request's complete JSON body is built, so the event loop only sends bytes.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from collections.abc import Callable

import numpy as np

from stillroom.plugins.diffusion.runtime import ImageGenerator
from stillroom.serve.pixels import to_pixels
from stillroom.serve.server.batcher import Job
from stillroom.serve.server.metrics import Metrics

PNG_LEVEL = 1  # zlib level: a 512x512 RGB image in 8 ms, not Pillow's 110 ms at level 6; 20% larger
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPE = {1: 0, 3: 2}  # channels -> PNG colour type (grey, RGB)


class ImageJob(Job):
    """One request: ``n`` images from ``seed``; its answer is the JSON body, as bytes, in ``future``."""

    def __init__(
        self,
        n: int,
        seed: int,
        class_label: int | None,
        prompt: str | None,
        guidance_scale: float | None,
        output_format: str = "png",
    ) -> None:
        super().__init__()
        self.size, self.seed, self.class_label, self.prompt = n, seed, class_label, prompt
        self.guidance_scale, self.output_format = guidance_scale, output_format
        self.future = self.loop.create_future()
        self.timing: dict[str, float] = {}  # stage -> seconds, for the Server-Timing header
        self.generated = self.body_ready = 0.0  # instants (time.perf_counter()) between stages

    def put(self, item: bytes | Exception) -> None:
        """Thread-safe: the JSON body, or the error that ended the request."""
        self.loop.call_soon_threadsafe(_settle, [(self, item)])


def _settle(results: list[tuple[ImageJob, bytes | Exception]]) -> None:
    """On the event loop: answer each job whose handler is still waiting."""
    for job, item in results:
        if job.future.done():  # the handler timed out and went away
            continue
        if isinstance(item, Exception):
            job.future.set_exception(item)
        else:
            job.future.set_result(item)


class ImageBatch:
    """The image service's ``run_batch`` for the micro-batcher: model stage here, encoding returned."""

    def __init__(self, model: ImageGenerator, metrics: Metrics) -> None:
        self.model, self.metrics = model, metrics

    def __call__(self, jobs: list[ImageJob]) -> Callable[[], None]:
        """Runs the sampler over ``jobs`` (model thread); returns their encoding (finishing thread)."""
        groups: dict[float | None, list[ImageJob]] = {}
        for job in jobs:
            groups.setdefault(job.guidance_scale, []).append(job)
        outputs = [(group, self._generate(scale, group)) for scale, group in groups.items()]
        self.metrics.generated(images=sum(job.size for job in jobs))
        return lambda: finish(outputs)

    def _generate(self, scale: float | None, jobs: list[ImageJob]) -> np.ndarray:
        """One sampler call for ``jobs`` (same guidance scale); records assembly and graph times."""
        model = self.model
        noise = np.concatenate([model.noise(job.size, job.seed) for job in jobs])
        labels = states = None
        if model.conditioning == "class":
            labels = np.repeat([job.class_label for job in jobs], [job.size for job in jobs])
        elif model.conditioning == "text":
            states = model.encode([job.prompt or "" for job in jobs for _ in range(job.size)])
        ready = time.perf_counter()
        images = model.generate(
            noise, class_labels=labels, encoder_hidden_states=states, guidance_scale=scale
        )
        done = time.perf_counter()
        for job in jobs:
            job.timing["assembly"] = ready - job.taken
            job.timing["graph"] = done - ready
            job.generated = done
        return images


def finish(outputs: list[tuple[list[ImageJob], np.ndarray]]) -> None:
    """Pixels, encoding and JSON bodies for every job of a batch; one hand-over to the event loop."""
    began = time.perf_counter()
    results: list[tuple[ImageJob, bytes | Exception]] = []
    for jobs, images in outputs:
        pixels = to_pixels(images)
        start = 0
        for job in jobs:
            start += job.size
            if job.cancelled:  # the handler timed out: nobody to answer
                continue
            texts = encode_images(job.output_format, pixels[start - job.size : start])
            encoded = time.perf_counter()
            results.append((job, response_body(job, texts, pixels.shape[1:])))
            job.body_ready = time.perf_counter()
            job.timing["handoff"] = began - job.generated
            job.timing["encode"] = encoded - began
            job.timing["serialise"] = job.body_ready - encoded
    if results:
        results[0][0].loop.call_soon_threadsafe(_settle, results)


def encode_images(output_format: str, pixels: np.ndarray) -> list[str]:
    """Each [H, W, C] uint8 image of ``pixels`` in ``output_format``, base64 text."""
    encode = ENCODERS[output_format]
    return [base64.b64encode(encode(image)).decode("ascii") for image in pixels]


def response_body(job: ImageJob, images: list[str], shape: tuple[int, int, int]) -> bytes:
    """The OpenAI-shaped JSON body for ``job``: ``created``, ``data[i].b64_json`` and ``seed``.

    ``output_format: "raw"`` (a stillroom extension) also says how to read the bytes back:
    ``size`` ("WxH", as OpenAI writes it) and ``channels`` (``shape`` is [H, W, C]).
    """
    body = {"created": int(time.time()), "data": [{"b64_json": image} for image in images], "seed": job.seed}
    if job.output_format == "raw":
        height, width, channels = shape
        body.update(output_format="raw", size=f"{width}x{height}", channels=channels)
    return json.dumps(body, separators=(",", ":")).encode()


def encode_png(pixels: np.ndarray) -> bytes:
    """One [H, W, C] uint8 image as an 8-bit PNG: every row 'Up'-filtered, zlib at ``PNG_LEVEL``.

    The Up filter (each row minus the row above, mod 256) is one vectorised subtraction and shrinks
    smooth images by a third against no filter; PNG decoders all read it.
    """
    height, width, channels = pixels.shape
    flat = pixels.reshape(height, width * channels)
    rows = np.empty((height, 1 + width * channels), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up (for the first row, the row above is zeros)
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])
    header = struct.pack(">IIBBBBB", width, height, 8, PNG_COLOUR_TYPE[channels], 0, 0, 0)
    idat = zlib.compress(rows.tobytes(), PNG_LEVEL)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_webp(pixels: np.ndarray) -> bytes:
    """One [H, W, C] uint8 image as lossless WebP (the same pixels as the PNG), fastest method."""
    from PIL import Image

    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    buf = io.BytesIO()
    image.save(buf, format="WEBP", lossless=True, quality=0, method=0)
    return buf.getvalue()


def encode_raw(pixels: np.ndarray) -> bytes:
    """One [H, W, C] uint8 image as its bytes, row-major (the ``raw`` extension)."""
    return pixels.tobytes()


ENCODERS: dict[str, Callable[[np.ndarray], bytes]] = {
    "png": encode_png,
    "webp": encode_webp,
    "raw": encode_raw,
}
