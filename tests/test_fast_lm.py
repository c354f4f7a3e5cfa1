"""The LM engine: greedy tokens identical to PyTorch (fp32) across batch sizes, left padding and cache
lengths through the one decode loop; last-position logits; the graph variant from the manifest; the
fast nucleus sampler against float64 references; weight-only variants' agreement; session presets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stillroom.core.ort_session import SessionOptions
from stillroom.plugins.lm.decode_loop import Generation, left_pad, prefill_positions
from stillroom.plugins.lm.export.validation import torch_greedy, torch_logits
from stillroom.plugins.lm.sampling import SamplingParams
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


def _engine(target):
    from stillroom.plugins.lm.engine import open_engine

    return open_engine(target, options=SessionOptions.decode(threads=1))


def _gen(lm, prompts, **kw) -> Generation:
    params = [SamplingParams(max_tokens=NEW, **kw)] * len(prompts)
    return Generation(lm, prompts, params, pad_id=0).run()


def _run(lm, prompts, **kw) -> np.ndarray:
    return np.asarray(_gen(lm, prompts, **kw).outputs)


def test_greedy_identical_to_pytorch_with_left_padding_and_cache_lengths(artifact, model):
    lm = _engine(artifact)
    assert lm.has_keep and artifact.manifest.validation["passed"]
    ids, mask = left_pad(PROMPTS, 0)
    ref = torch_greedy(model, ids, mask, NEW)  # PyTorch recomputing the whole sequence, no cache
    np.testing.assert_array_equal(_run(lm, PROMPTS), ref)  # batch 3, left-padded
    for row, prompt in enumerate(PROMPTS):  # batch 1: each row alone, cache lengths 3..56
        np.testing.assert_array_equal(_run(lm, [prompt])[0], ref[row])


def test_last_position_logits_and_full_logits_match_pytorch(artifact, model):
    lm = _engine(artifact.root)  # the directory: opened through its verified manifest
    ids = np.asarray([PROMPTS[1], PROMPTS[1][::-1]], np.int64)
    ref = torch_logits(model, ids, np.ones_like(ids))
    full = lm.full_logits(ids)
    assert full.shape == ref.shape
    np.testing.assert_allclose(full, ref, atol=1e-4, rtol=0)
    last, _ = lm.forward(ids, np.ones_like(ids), np.broadcast_to(np.arange(7), ids.shape), lm.new_cache(2))
    np.testing.assert_allclose(last, ref[:, -1], atol=1e-4, rtol=0)


def test_shared_kv_cache_matches_the_copying_cache_and_refuses_overflow(artifact):
    from stillroom.core.errors import StillroomError

    lm = _engine(artifact)
    ids, mask = left_pad(PROMPTS, 0)
    width, steps = ids.shape[1], 5
    shared, plain = lm.new_cache(3, width + steps - 1), lm.new_cache(3)  # prefill + 4 decode steps
    assert lm.shares_kv == (artifact.root.name == "fused") == (shared.binding is not None)
    positions = prefill_positions(mask)
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


def test_stop_ids_finish_rows_independently(artifact):
    lm = _engine(artifact)
    free = _run(lm, PROMPTS[:2])
    stop = int(free[0, 3])
    first = int(np.argmax(free[0] == stop))  # first occurrence in row 0
    gen = _gen(lm, PROMPTS[:2], stop_token_ids=frozenset([stop]))
    assert gen.outputs[0] == free[0, :first].tolist() and gen.finish_reasons[0] == "stop"
    row1_stop = int(np.argmax(free[1] == stop)) if (free[1] == stop).any() else NEW
    assert gen.outputs[1] == free[1, :row1_stop].tolist()  # row 1 runs on after row 0 stopped
    assert gen.finish_reasons[1] == ("stop" if row1_stop < NEW else "length")


def test_nucleus_candidates_match_float64_reference():
    from stillroom.plugins.lm.sampling import nucleus_candidates, nucleus_probs

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
            dense = np.zeros_like(p)
            dense[ids] = probs  # the distribution the sampler draws from, as the plain definition writes it
            np.testing.assert_allclose(dense, nucleus_probs(logits, temperature, top_p), rtol=1e-12, atol=0)


def test_sampling_is_seeded_and_stays_in_the_nucleus(artifact):
    lm = _engine(artifact)
    a = _run(lm, PROMPTS[:2], temperature=0.8, top_p=0.9, seed=3)
    b = _run(lm, PROMPTS[:2], temperature=0.8, top_p=0.9, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _run(lm, PROMPTS[:2]))  # not greedy


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_weight_only_variant_agreement_is_measured(tiny, tmp_path, scheme):
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
    assert m.variant == "fused"  # the weight-only graph keeps the fused graph's in-place cache
    lm = _engine(art)
    assert lm.shares_kv
    got = _run(lm, PROMPTS)
    assert got.shape == (3, NEW) and (got >= 0).all()


def test_spin_waiting_follows_the_argument_the_environment_then_the_load(monkeypatch):
    from stillroom.core import ort_session

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


def test_graph_variant_comes_from_the_manifest(artifact, tmp_path):
    from stillroom.core.artifact import Manifest
    from stillroom.core.errors import StillroomError
    from stillroom.plugins.lm.engine import VARIANTS, open_engine, variant_of

    expected = "fused" if artifact.root.name == "fused" else "kv-cache-last-logits"
    assert artifact.manifest.variant == expected == variant_of(artifact.manifest)
    assert VARIANTS[expected].chunked_prefill == (expected != "fused")
    assert artifact.manifest.validation["chunked_prefill_checked"] == (
        "batch 1" if expected == "fused" else "all batch sizes"
    )
    with pytest.raises(StillroomError, match="does not know"):
        variant_of(Manifest(kind="causal-lm", variant="paged"))
    with pytest.raises(StillroomError, match="bare graph"):
        open_engine(artifact.graph())
    # a graph the manifest calls plain runs without last-position logits or a shared cache
    plain = open_engine(artifact.graph(), "kv-cache", SessionOptions.decode(threads=1))
    assert not plain.has_keep and not plain.shares_kv
    np.testing.assert_array_equal(_run(plain, PROMPTS[:2]), _run(_engine(artifact), PROMPTS[:2]))


def test_session_presets(monkeypatch):
    from stillroom.core import ort_session

    monkeypatch.setattr(ort_session, "physical_cores", lambda: 6)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    decode = SessionOptions.decode()
    assert (decode.provider, decode.intra_op_threads, decode.inter_op_threads) == ("cpu", 6, 1)
    assert SessionOptions.decode(threads=3).intra_op_threads == 3
    checks = SessionOptions.checks()
    assert (checks.provider, checks.intra_op_threads, checks.inter_op_threads) == ("cpu", None, None)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert (
        SessionOptions.decode().intra_op_threads == 2
        and SessionOptions.decode(threads=4).intra_op_threads == 4
    )
    assert (SessionOptions.checks().intra_op_threads, SessionOptions.checks().inter_op_threads) == (2, 1)
