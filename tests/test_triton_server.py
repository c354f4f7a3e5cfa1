"""`stillroom export --to triton` proven on a real Triton server.

A tiny LM run, a class-conditional and a text-conditional generator are exported to Triton model
repositories; the ``tritonserver`` that nvidia-pytriton bundles (``tests/triton_env.py``) loads their
``NAME_generate`` Python-backend models, and their answers over KServe v2 HTTP equal what stillroom's
own onnxruntime runtime computes in this process: the same greedy and seeded text, the same pixels for
the same seed. The raw ``onnxruntime_onnx`` models cannot load there (the bundled server has no
onnxruntime backend); their configs are parsed with Triton's own schema instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stillroom.core import artifact
from tests.test_export_lm import _triton_model_config
from tests.triton_env import TritonServer, TritonUnavailable, triton_venv

PROMPTS = ["To be, or not to be", "the slings and arrows"]
LABELS = [3, 7, 0]
TEXT_PROMPTS = ["a sea of troubles", "a seven"]
SEED = 5


def _export(src: Path, repo: Path, **options) -> Path:
    from stillroom.export.command import run_exporter

    run_exporter(src, repo, to="triton", **options)
    return repo


@pytest.fixture(scope="module")
def lm_repo(tmp_path_factory) -> Path:
    from stillroom.testing import build_tiny_lm

    root = tmp_path_factory.mktemp("triton-lm")
    build_tiny_lm(root / "run" / "student", "llama")
    (root / "run" / "run.json").write_text(json.dumps({"method": "kd", "steps": 1, "student": "student"}))
    return _export(root / "run", root / "repo")


@pytest.fixture(scope="module")
def class_repo(tmp_path_factory) -> Path:
    from stillroom.testing import build_tiny_generator

    root = tmp_path_factory.mktemp("triton-class")
    return _export(build_tiny_generator(root / "student", steps=2, conditioning="class"), root / "repo")


@pytest.fixture(scope="module")
def text_repo(tmp_path_factory) -> Path:
    from stillroom.testing import build_tiny_generator

    root = tmp_path_factory.mktemp("triton-text")
    student = build_tiny_generator(root / "student", steps=2, conditioning="text")
    return _export(student, root / "repo", name="text_gen")


def _stillroom(repo: Path, name: str):
    """The model of ``REPO/NAME/1/artifact`` as stillroom's onnxruntime runtime loads it here."""
    from stillroom.core.host import get_host

    target = str(repo / name / "1" / "artifact")
    return get_host().family_for_target(target).load("onnxruntime", target)


def test_repository_holds_only_model_folders_named_after_the_run(lm_repo, class_repo):
    assert sorted(p.name for p in lm_repo.iterdir()) == ["kd_lm", "kd_lm_generate", "manifest.json"]
    assert sorted(p.name for p in class_repo.iterdir()) == [
        "manifest.json",
        "tiny_diffusion",
        "tiny_diffusion_generate",
    ]
    for repo in (lm_repo, class_repo):
        assert not [p.name for p in repo.parent.iterdir() if p.name.startswith(".")]  # staging removed
    repo = artifact.load(lm_repo)  # every file of both models verified against the root manifest
    assert repo.manifest.format == "triton" and repo.graph().is_file()
    assert set(repo.manifest.extra["triton"]["models"]) == {"kd_lm", "kd_lm_generate"}
    inner = artifact.load(lm_repo / "kd_lm_generate" / "1" / "artifact")
    assert inner.manifest.format == "onnx" and inner.manifest.tokenizer
    model_py = (lm_repo / "kd_lm_generate" / "1" / "model.py").read_text()
    assert "from stillroom.serve.triton_model import TritonPythonModel" in model_py


def test_generator_configs_match_the_graph_and_parse_with_tritons_schema(class_repo):
    import onnx
    from google.protobuf import text_format

    mc = _triton_model_config()

    def parse(name: str):
        return text_format.Parse((class_repo / name / "config.pbtxt").read_text(), mc.ModelConfig())

    raw, generate = parse("tiny_diffusion"), parse("tiny_diffusion_generate")
    graph = onnx.load(str(class_repo / "tiny_diffusion" / "1" / "model.onnx"), load_external_data=False)
    for entry, value in zip(raw.input, graph.graph.input, strict=True):
        shape = [d.dim_value or -1 for d in value.type.tensor_type.shape.dim]
        assert entry.name == value.name and shape[0] == -1  # the batch dim, which Triton owns
        expected = shape[1:] or [1]  # [batch] inputs: one element per row, reshaped to a scalar
        assert list(entry.dims) == expected and entry.HasField("reshape") == (not shape[1:])
    assert raw.max_batch_size == 8 and list(raw.output[0].dims) == [1, 8, 8]
    assert generate.backend == "python" and generate.max_batch_size == 0
    inputs = {i.name: i for i in generate.input}
    assert list(inputs) == ["class_labels", "seed", "steps"]
    assert inputs["class_labels"].data_type == mc.TYPE_INT64 and not inputs["class_labels"].optional
    assert inputs["steps"].optional and inputs["seed"].optional
    assert generate.output[0].name == "images" and list(generate.output[0].dims) == [-1, 8, 8, 1]


@pytest.fixture(scope="module")
def server(lm_repo, class_repo, text_repo, tmp_path_factory):
    try:
        venv = triton_venv()
    except TritonUnavailable as err:
        pytest.skip(f"no Triton test venv: {err}")
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    models = ["kd_lm_generate", "tiny_diffusion_generate", "text_gen_generate"]
    with TritonServer(venv, [lm_repo, class_repo, text_repo], models, log) as running:
        yield running


def _outputs(response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}


def _lm_request(max_tokens: int, temperature: float, seed: int) -> list[dict]:
    return [
        {"name": "text", "shape": [len(PROMPTS)], "datatype": "BYTES", "data": PROMPTS},
        {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [max_tokens]},
        {"name": "temperature", "shape": [1], "datatype": "FP32", "data": [temperature]},
        {"name": "seed", "shape": [1], "datatype": "INT64", "data": [seed]},
    ]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_lm_generate_on_triton_equals_stillroom(server, lm_repo, temperature):
    from stillroom.plugins.lm.sampling import SamplingParams

    model = _stillroom(lm_repo, "kd_lm_generate")
    params = [
        SamplingParams(max_tokens=12, temperature=temperature, stop_token_ids=model.eos_ids, seed=SEED + row)
        for row in range(len(PROMPTS))
    ]
    generation = model.generate([model.encode(p) for p in PROMPTS], params).run()
    expected = [model.decode(ids) for ids in generation.outputs]
    got = _outputs(server.infer("kd_lm_generate", _lm_request(12, temperature, SEED)))["text"]
    assert got.tolist() == expected and any(expected)


def _pixels(images: np.ndarray) -> np.ndarray:
    return (
        np.clip(np.round((images.astype(np.float64) + 1) * 127.5), 0, 255)
        .astype(np.uint8)
        .transpose(0, 2, 3, 1)
    )


def test_class_generator_on_triton_equals_stillroom(server, class_repo):
    model = _stillroom(class_repo, "tiny_diffusion_generate")
    labels = np.array(LABELS, dtype=np.int64)
    expected = _pixels(model.generate(model.noise(len(LABELS), SEED), class_labels=labels))
    request = [
        {"name": "class_labels", "shape": [len(LABELS)], "datatype": "INT64", "data": LABELS},
        {"name": "seed", "shape": [1], "datatype": "INT64", "data": [SEED]},
        {"name": "steps", "shape": [1], "datatype": "INT32", "data": [2]},
    ]
    got = _outputs(server.infer("tiny_diffusion_generate", request))["images"]
    assert got.shape == (3, 8, 8, 1) and expected.std() > 0
    assert np.abs(got.astype(int) - expected.astype(int)).max() == 0


def test_text_generator_on_triton_equals_stillroom(server, text_repo):
    model = _stillroom(text_repo, "text_gen_generate")
    states = model.encode(TEXT_PROMPTS)
    expected = _pixels(model.generate(model.noise(len(TEXT_PROMPTS), SEED), encoder_hidden_states=states))
    request = [
        {"name": "prompt", "shape": [len(TEXT_PROMPTS)], "datatype": "BYTES", "data": TEXT_PROMPTS},
        {"name": "seed", "shape": [1], "datatype": "INT64", "data": [SEED]},
    ]
    got = _outputs(server.infer("text_gen_generate", request))["images"]
    assert got.shape == (2, 8, 8, 1) and np.array_equal(got, expected)


def test_requests_stillroom_refuses_are_one_line_triton_errors(server):
    wrong_steps = [
        {"name": "class_labels", "shape": [1], "datatype": "INT64", "data": [1]},
        {"name": "steps", "shape": [1], "datatype": "INT32", "data": [4]},
    ]
    response = server.infer("tiny_diffusion_generate", wrong_steps)
    assert response.status_code == 400
    assert "graph unrolls 2 sampling steps; got steps=4" in response.json()["error"]
    response = server.infer("kd_lm_generate", _lm_request(0, 0.0, SEED))
    assert response.status_code == 400 and "max_tokens must be >= 1" in response.json()["error"]
