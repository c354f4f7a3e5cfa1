"""Generators: the onnxruntime and torch runtimes agree, and `/v1/images/generations` returns PNGs."""

from __future__ import annotations

import base64
import concurrent.futures
import io
from pathlib import Path

import httpx
import numpy as np
import pytest

from stillroom.testing import build_tiny_generator
from tests.test_serve_runtime import once


def build_generator_artifact(student: Path, out: Path) -> Path:
    from stillroom.plugins.diffusion.export import export_generator

    export_generator(student, out)
    return out


@pytest.fixture(scope="session")
def generator_student(tmp_path_factory) -> Path:
    return once(
        "generator_student", lambda: build_tiny_generator(tmp_path_factory.mktemp("gen") / "student", size=28)
    )


@pytest.fixture(scope="session")
def generator_artifact(generator_student, tmp_path_factory) -> Path:
    return once(
        "generator_artifact",
        lambda: build_generator_artifact(generator_student, tmp_path_factory.mktemp("gen_art") / "artifact"),
    )


def test_ort_generator_matches_torch_student(generator_student, generator_artifact):
    from stillroom.serve.runtimes import onnxruntime_runtime as load_onnxruntime
    from stillroom.serve.runtimes import torch_runtime as load_torch

    ort_gen = load_onnxruntime(generator_artifact, provider="cpu")
    torch_gen = load_torch(generator_student)
    assert ort_gen.kind == torch_gen.kind == "generator" and ort_gen.conditioning == "class"
    noise = ort_gen.noise(3, seed=7)
    labels = np.array([0, 3, 9])
    a = ort_gen.generate(noise, class_labels=labels)
    b = torch_gen.generate(noise, class_labels=labels)
    assert a.shape == (3, 1, 28, 28) and np.abs(a).max() <= 1.0
    # the export's own tolerance: half an 8-bit grey level (stillroom/export/generator_validation.py)
    np.testing.assert_allclose(a, b, atol=1 / 255)
    assert not np.allclose(a[0], a[1])  # labels and noise matter


@pytest.fixture(scope="module")
def image_server(generator_artifact):
    from stillroom.serve.runtimes import onnxruntime_runtime as load_onnxruntime
    from stillroom.serve.server.app import ServerSettings, create_app
    from stillroom.serve.server.run import ServerThread

    model = load_onnxruntime(generator_artifact, provider="cpu", name="tiny-gen")
    with ServerThread(create_app(model, ServerSettings(max_batch=16, max_wait_ms=150))) as thread:
        yield model, thread.url


def _decode(item) -> np.ndarray:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    assert image.format == "PNG" and image.mode == "L"
    return np.asarray(image)


def test_images_are_pngs_of_the_seeded_samples(image_server):
    model, url = image_server
    r = httpx.post(
        f"{url}/v1/images/generations",
        json={"n": 2, "class_label": 4, "seed": 11, "response_format": "b64_json"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2
    expected = model.generate(model.noise(2, 11), class_labels=np.array([4, 4]))
    for item, image in zip(data, expected, strict=True):
        pixels = _decode(item)
        assert pixels.shape == (28, 28)
        ref = np.clip(np.round((image[0].astype(np.float64) + 1.0) * 127.5), 0, 255)
        assert np.abs(pixels.astype(np.float64) - ref).max() <= 1.0
    again = httpx.post(f"{url}/v1/images/generations", json={"n": 2, "class_label": 4, "seed": 11}).json()
    assert [d["b64_json"] for d in again["data"]] == [d["b64_json"] for d in data]
    by_prompt = httpx.post(f"{url}/v1/images/generations", json={"n": 2, "prompt": "4", "seed": 11}).json()
    assert [d["b64_json"] for d in by_prompt["data"]] == [d["b64_json"] for d in data]


@pytest.mark.parametrize(
    "body",
    [
        {"n": 0, "class_label": 1},
        {"n": 1000, "class_label": 1},
        {"n": 1},
        {"n": 1, "class_label": 10},
        {"n": 1, "class_label": "3"},
        {"n": 1, "class_label": 1, "response_format": "url"},
        {"n": 1, "prompt": "a cat"},
        {"n": 1, "class_label": 1, "seed": -1},
    ],
)
def test_bad_image_requests_are_4xx(image_server, body):
    _, url = image_server
    r = httpx.post(f"{url}/v1/images/generations", json=body)
    assert 400 <= r.status_code < 500 and r.json()["error"]["message"], r.text


def test_concurrent_image_requests_share_batches(image_server):
    model, url = image_server

    def call(label):
        r = httpx.post(
            f"{url}/v1/images/generations", json={"n": 1, "class_label": label, "seed": label}, timeout=60
        )
        return _decode(r.json()["data"][0])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        images = list(pool.map(call, range(8)))
    for label, pixels in enumerate(images):  # batched == alone
        alone = model.generate(model.noise(1, label), class_labels=np.array([label]))[0, 0]
        assert np.abs(pixels - np.clip(np.round((alone.astype(np.float64) + 1) * 127.5), 0, 255)).max() <= 1
    metrics = httpx.get(f"{url}/metrics").text
    buckets = {
        line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("stillroom_batch_size_bucket")
    }
    assert buckets["1"] < buckets["+Inf"], buckets  # at least one batch held more than one image
