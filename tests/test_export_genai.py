"""LM artifacts load outside stillroom: transformers reads the configs and tokenizer at the artifact
root, and onnxruntime-genai (not in the test extra: those tests skip without it) generates from the
artifact alone the same greedy tokens as stillroom's engine, with a tokenizer that encodes alike."""

from __future__ import annotations

import json

import pytest

from stillroom.core import artifact as artifacts
from stillroom.data import heldout_text, resolve
from stillroom.plugins.lm.engine import VARIANTS
from stillroom.plugins.lm.export import genai_config
from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm
from stillroom.testing import build_tiny_lm

NEW = 16
TEACHER = resolve("embedded:lm_teacher")


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory) -> artifacts.Artifact:
    tmp = tmp_path_factory.mktemp("genai")
    return export_causal_lm(build_tiny_lm(tmp / "lm"), tmp / "art")


def _prompts(text: str) -> list[str]:
    """Three lines of the embedded held-out split, which the teacher never trained on."""
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 20]
    return [lines[0], lines[len(lines) // 2], lines[-1]]


def test_transformers_loads_config_and_tokenizer_from_the_artifact_root(tiny_artifact):
    from transformers import AutoConfig, AutoTokenizer

    root = tiny_artifact.root
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (root / name).is_file(), name
    assert AutoConfig.from_pretrained(root).model_type == "llama"
    at_root = AutoTokenizer.from_pretrained(root)
    in_folder = AutoTokenizer.from_pretrained(tiny_artifact.path(tiny_artifact.manifest.tokenizer))
    text = _prompts(heldout_text())[0]
    assert at_root(text)["input_ids"] == in_folder(text)["input_ids"]
    # the new files are part of the artifact: hashed, so tampering with them is refused
    assert {"config.json", "genai_config.json", "tokenizer.json"} <= {
        e.path for e in tiny_artifact.manifest.files
    }


def test_genai_config_describes_the_graph(tiny_artifact):
    m = tiny_artifact.manifest
    assert m.extra["genai"] == {"loadable": True}
    config = json.loads((tiny_artifact.root / genai_config.FILENAME).read_text())
    decoder = config["model"]["decoder"]
    cache = m.spec
    assert decoder["filename"] == m.graphs["model"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (
        cache["layers"],
        cache["kv_heads"],
        cache["head_dim"],
    )
    names = {t.name for t in m.inputs} | {t.name for t in m.outputs}
    for key, name in {**decoder["inputs"], **decoder["outputs"]}.items():
        assert (name % 0 if "%d" in name else name) in names, key


def test_every_variant_has_a_measured_genai_verdict():
    # a new graph variant must be tried with genai (below) before artifacts claim either way
    assert set(genai_config.GENAI_VARIANTS) == set(VARIANTS)


def _genai_greedy(og, model, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    for ids in prompts:
        params = og.GeneratorParams(model)
        # min_length keeps genai going past EOS, as ``ignore_eos`` does for stillroom
        params.set_search_options(max_length=len(ids) + NEW, min_length=len(ids) + NEW, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        out.append(tokens)
    return out


def _stillroom_greedy(art: artifacts.Artifact, prompts: list[list[int]]) -> list[list[int]]:
    from stillroom.plugins.lm.sampling import SamplingParams
    from stillroom.serve.runtimes import onnxruntime_runtime

    model = onnxruntime_runtime(str(art.root), provider="cpu")
    params = [SamplingParams(max_tokens=NEW, ignore_eos=True)] * len(prompts)
    return [list(map(int, row)) for row in model.generate(prompts, params).run().outputs]


def _check_genai_matches_stillroom(art: artifacts.Artifact) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer

    model = og.Model(str(art.root))
    tokenizer = og.Tokenizer(model)
    reference = AutoTokenizer.from_pretrained(art.root)
    texts = _prompts(heldout_text())
    prompts = [reference(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert [list(map(int, tokenizer.encode(t))) for t in texts] == prompts
    assert _genai_greedy(og, model, prompts) == _stillroom_greedy(art, prompts)


def test_genai_generates_stillroom_greedy_tokens(tiny_artifact):
    _check_genai_matches_stillroom(tiny_artifact)


def test_genai_runs_the_fused_last_logits_teacher(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    art = export_causal_lm(TEACHER, tmp_path / "teacher", fused=True, last_logits=True)
    assert art.manifest.variant == "fused" and art.manifest.extra["genai"] == {"loadable": True}
    _check_genai_matches_stillroom(art)
