"""FastLM: greedy tokens identical to PyTorch (fp32) across batch sizes, left padding and cache lengths;
last-position logits; nucleus sampling against a float64 reference; weight-only variants' agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stillroom.plugins.lm.export.validation import left_pad, torch_greedy, torch_logits
from stillroom.testing import build_tiny_lm

PROMPTS = [[5, 17, 33], [9, 2, 41, 7, 19, 23, 4], list(range(40, 80))]  # 3, 7 and 40 tokens
NEW = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    # head_dim 16: ORT's GroupQueryAttention needs a multiple of 16
    return build_tiny_lm(tmp_path_factory.mktemp("llama64"), "llama", hidden=64)


@pytest.fixture(scope="module")
def model(tiny):
    from stillroom.plugins.lm.export.onnx_artifact import load_lm

    return load_lm(tiny)[0]


@pytest.fixture(scope="module", params=["fused", "dynamo"])
def artifact(request, tiny, tmp_path_factory):
    from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm

    kwargs = {"fused": True} if request.param == "fused" else {"last_logits": True}
    return export_causal_lm(tiny, tmp_path_factory.mktemp("art") / request.param, **kwargs)


def _run(lm, prompts, **kw) -> np.ndarray:
    return np.stack(list(lm.generate(prompts, NEW, **kw)), axis=1)


def test_greedy_identical_to_pytorch_with_left_padding_and_cache_lengths(artifact, model):
    from stillroom.plugins.lm.engine import FastLM

    lm = FastLM(artifact, threads=1)
    assert lm.has_keep and artifact.manifest.validation["passed"]
    ids, mask = left_pad(PROMPTS, 0)
    ref = torch_greedy(model, ids, mask, NEW)  # PyTorch recomputing the whole sequence, no cache
    np.testing.assert_array_equal(_run(lm, PROMPTS), ref)  # batch 3, left-padded
    for row, prompt in enumerate(PROMPTS):  # batch 1: each row alone, cache lengths 3..56
        np.testing.assert_array_equal(_run(lm, [prompt])[0], ref[row])


def test_last_position_logits_and_full_logits_match_pytorch(artifact, model):
    from stillroom.plugins.lm.engine import FastLM

    lm = FastLM(artifact, threads=1)
    ids = np.asarray([PROMPTS[1], PROMPTS[1][::-1]], np.int64)
    ref = torch_logits(model, ids, np.ones_like(ids))
    full = lm.logits(ids)
    assert full.shape == ref.shape
    np.testing.assert_allclose(full, ref, atol=1e-4, rtol=0)
    last, _ = lm.forward(ids, np.ones_like(ids), np.broadcast_to(np.arange(7), ids.shape), lm.new_cache(2))
    np.testing.assert_allclose(last, ref[:, -1], atol=1e-4, rtol=0)


def test_shared_kv_cache_matches_the_copying_cache_and_refuses_overflow(artifact):
    from stillroom.core.errors import StillroomError
    from stillroom.plugins.lm.engine import FastLM

    lm = FastLM(artifact, threads=1)
    ids, mask = left_pad(PROMPTS, 0)
    width, steps = ids.shape[1], 5
    shared, plain = lm.new_cache(3, width + steps - 1), lm.new_cache(3)  # prefill + 4 decode steps
    assert lm.shares_kv == (artifact.root.name == "fused") == (shared.binding is not None)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    feed, full_mask = ids, mask
    for _ in range(steps):
        a, shared = lm.forward(feed, full_mask, positions, shared)
        b, plain = lm.forward(feed, full_mask, positions, plain)
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        feed = a.argmax(-1)[:, None]
        full_mask = np.concatenate([full_mask, np.ones((3, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    if shared.binding is not None:  # a fifth decode step no longer fits
        with pytest.raises(StillroomError, match="holds"):
            lm.forward(feed, full_mask, positions, shared)


def test_stop_ids_finish_rows_and_serve_loop_drives_the_engine(artifact):
    from stillroom.plugins.lm.decode_loop import Generation
    from stillroom.plugins.lm.engine import FINISHED, FastLM
    from stillroom.plugins.lm.sampling import SamplingParams

    lm = FastLM(artifact, threads=1)
    free = _run(lm, PROMPTS[:2])
    stop = int(free[0, 3])
    first = int(np.argmax(free[0] == stop))  # first occurrence in row 0
    got = _run(lm, PROMPTS[:2], stop_ids=[stop])
    assert got[0, first] == stop and (got[0, first + 1 :] == FINISHED).all()
    row1_stop = np.argmax(free[1] == stop) if (free[1] == stop).any() else NEW
    np.testing.assert_array_equal(got[1, : row1_stop + 1], free[1, : row1_stop + 1])
    gen = Generation(lm, PROMPTS[:2], [SamplingParams(max_tokens=NEW)] * 2, pad_id=0).run()
    np.testing.assert_array_equal(np.asarray(gen.outputs), free)


def test_nucleus_candidates_match_float64_reference():
    from stillroom.plugins.lm.engine import nucleus_candidates

    rng = np.random.default_rng(0)
    for scale in (0.1, 3.0):  # 0.1: flat, the nucleus is far wider than the first 64 candidates
        logits = (rng.standard_normal(5000) * scale).astype(np.float32)
        for temperature, top_p in ((1.0, 0.9), (0.7, 0.5), (1.3, 0.99), (1.0, 1.0)):
            z = logits.astype(np.float64) / temperature
            p = np.exp(z - z.max())
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            keep = int(np.argmax(np.cumsum(p[order]) >= top_p)) + 1 if top_p < 1 else p.size
            ids, probs = nucleus_candidates(logits, temperature, top_p)
            assert sorted(ids.tolist()) == sorted(order[:keep].tolist())
            np.testing.assert_allclose(probs, p[ids] / p[order[:keep]].sum(), rtol=1e-12)


def test_sampling_is_seeded_and_stays_in_the_nucleus(artifact):
    from stillroom.plugins.lm.engine import FastLM

    lm = FastLM(artifact, threads=1)
    a = _run(lm, PROMPTS[:2], temperature=0.8, top_p=0.9, seed=3)
    b = _run(lm, PROMPTS[:2], temperature=0.8, top_p=0.9, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _run(lm, PROMPTS[:2]))  # not greedy


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_weight_only_variant_agreement_is_measured(tiny, tmp_path, scheme):
    from stillroom.plugins.lm.engine import FastLM
    from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm

    art = export_causal_lm(tiny, tmp_path / scheme, fused=True, weight_only=scheme)
    m = art.manifest
    assert m.precision == f"{scheme}-wo" and m.validation["passed"]
    assert "MatMulNBits" in Path(art.graph()).read_bytes().decode("latin-1")
    v = m.validation
    assert v["greedy_agreement"] >= v["thresholds"]["min_greedy_agreement"]
    assert abs(v["perplexity_rel_delta"]) <= v["thresholds"]["max_ppl_rel_increase"]
    fp32 = v["stages"]["fp32"]
    assert fp32["greedy_agreement"] == 1.0
    got = _run(FastLM(art, threads=1), PROMPTS)
    assert got.shape == (3, NEW) and (got >= 0).all()


def test_spin_waiting_follows_the_argument_the_environment_then_the_load(monkeypatch):
    from stillroom.serve import ort_session

    monkeypatch.setattr(ort_session, "physical_cores", lambda: 2)
    monkeypatch.delenv("STILLROOM_ORT_SPIN", raising=False)
    monkeypatch.setattr(ort_session.os, "getloadavg", lambda: (0.3, 0.0, 0.0))
    assert ort_session.spin_waiting(None, 2) is True  # quiet: both cores free
    monkeypatch.setattr(ort_session.os, "getloadavg", lambda: (1.7, 0.0, 0.0))
    assert ort_session.spin_waiting(None, 2) is False  # another job holds a core
    assert ort_session.spin_waiting(None, 1) is True  # one thread still has a free core
    assert ort_session.spin_waiting(True, 2) is True and ort_session.spin_waiting(False, 1) is False
    monkeypatch.setenv("STILLROOM_ORT_SPIN", "1")
    assert ort_session.spin_waiting(None, 2) is True
