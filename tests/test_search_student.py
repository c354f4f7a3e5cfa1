"""``stillroom search-student``: DisWOT against an independent computation, AutoDistil's weight sharing
and relation loss, latency measured through a real ONNX Runtime export (cached), the latency filter,
the candidate grid and the command end to end with both strategies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stillroom.cli import main
from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.plugins.lm import models
from stillroom.plugins.lm.student_search import autodistil, diswot, latency, search
from stillroom.plugins.lm.student_search.candidates import Candidate, grid
from tests.conftest import lm_recipe


def _gram_reference(x: np.ndarray) -> np.ndarray:
    """Row-normalised X X^T with explicit sums (float64)."""
    m = x.shape[0]
    g = np.array([[sum(x[i, k] * x[j, k] for k in range(x.shape[1])) for j in range(m)] for i in range(m)])
    return g / np.sqrt((g**2).sum(axis=1, keepdims=True))


def _grad_cam(features: torch.Tensor, head: torch.Tensor, c: int) -> np.ndarray:
    """Grad-CAM of class c over positions: alpha_k = mean_n d y_c,n / d F_n,k by autograd, ReLU(F alpha)."""
    f = features.clone().requires_grad_(True)
    (f @ head.T)[:, c].sum().backward()
    alpha = f.grad.mean(0)
    return torch.relu(features @ alpha).double().numpy()


def test_diswot_matches_an_independent_computation():
    gen = torch.Generator().manual_seed(0)
    n, classes = 12, 5
    t_feat, s_feat = torch.randn(n, 6, generator=gen), torch.randn(n, 3, generator=gen)
    t_head, s_head = torch.randn(classes, 6, generator=gen), torch.randn(classes, 3, generator=gen)
    teacher = diswot.Features(t_feat, t_feat @ t_head.T)
    student = diswot.Features(s_feat, s_feat @ s_head.T)
    got = diswot.score(teacher, student)

    a_t = np.stack([_grad_cam(t_feat, t_head, c) for c in range(classes)])  # [C, N]
    a_s = np.stack([_grad_cam(s_feat, s_head, c) for c in range(classes)])
    d_sem = np.sqrt(((_gram_reference(a_t) - _gram_reference(a_s)) ** 2).sum())
    d_rel = np.sqrt(
        ((_gram_reference(t_feat.double().numpy()) - _gram_reference(s_feat.double().numpy())) ** 2).sum()
    )
    assert got["semantic"] == pytest.approx(d_sem, rel=1e-6)  # float32 logits on both sides
    assert got["relation"] == pytest.approx(d_rel, rel=1e-6)
    assert got["score"] == pytest.approx(-(d_sem + d_rel), rel=1e-6)
    assert diswot.score(teacher, teacher) == {"score": 0.0, "semantic": 0.0, "relation": 0.0}


def test_diswot_reads_final_norm_features_and_class_logits(tiny_teacher):
    model, _ = models.load_causal_lm(str(tiny_teacher))
    ids = torch.tensor([[5, 9, 9, 7, 5, 9], [1, 2, 9, 5, 5, 3]])
    classes = diswot.probe_classes(ids, 3)
    assert classes.tolist() == [
        9,
        5,
        2,
    ]  # next-token targets (columns 1:) by frequency: 9 x4, 5 x3, then ties by id
    got = diswot.features(model, ids, classes)
    assert got.features.shape == (10, model.config.hidden_size) and got.class_logits.shape == (10, 3)
    head = model.get_output_embeddings().weight[classes]
    torch.testing.assert_close(got.class_logits, got.features @ head.T, atol=1e-5, rtol=1e-5)


def test_latency_is_measured_through_a_real_ort_export_and_cached(tmp_path, tiny_teacher, monkeypatch):
    from stillroom.plugins.lm.export import onnx_artifact

    model, tokenizer = models.load_causal_lm(str(tiny_teacher))
    exported = []
    real = onnx_artifact.export_causal_lm

    def spy(src, out, **options):
        art = real(src, out, **options)
        exported.append((art.manifest.format, art.manifest.variant, art.manifest.validation["passed"]))
        return art

    monkeypatch.setattr(onnx_artifact, "export_causal_lm", spy)
    timing = latency.Timing(prompt_tokens=4, new_tokens=4, warmup=1, repeats=3, threads=1)
    model = models.student_from_teacher_config(
        model, {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    )
    first = latency.measure(model, tokenizer, {"fused": True}, timing, tmp_path)
    assert exported == [("onnx", "fused", True)]
    assert first["latency_ms"] > 0 and first["per_token_ms"] > 0 and not first["cached"]
    again = latency.measure(model, tokenizer, {"fused": True}, timing, tmp_path)
    assert again["cached"] and again["latency_ms"] == first["latency_ms"] and len(exported) == 1
    wider = models.student_from_teacher_config(model, {"intermediate_size": 128})
    assert latency.measure(wider, tokenizer, {"fused": True}, timing, tmp_path)["hash"] != first["hash"]


def test_the_latency_filter_drops_candidates_over_the_limit():
    fast, slow, mid = Candidate(1, 16, 2, 1, 32), Candidate(2, 32, 4, 2, 64), Candidate(1, 32, 4, 2, 64)
    timed = {
        c: {"latency_ms": ms, "per_token_ms": ms / 8, "params": 1}
        for c, ms in ((fast, 1.0), (slow, 9.0), (mid, 4.0))
    }
    scores = {fast: {"score": -2.0}, slow: {"score": -0.1}, mid: {"score": -1.0}}
    rows = search.rank([fast, slow, mid], timed, scores, limit_ms=5.0, default=mid)
    assert [(r["name"], r["kept"], r.get("rank")) for r in rows] == [
        (mid.name, True, 1),
        (fast.name, True, 2),
        (slow.name, False, None),  # the best score, but over the limit
    ]
    assert rows[0]["default"] and not rows[1]["default"]


def test_the_grid_is_built_around_the_recipes_student():
    student, teacher = Candidate(2, 256, 4, 2, 688), Candidate(4, 256, 4, 2, 688)
    shapes = grid(student, teacher)
    assert student in shapes and len(shapes) == 4 * 3 * 2 * 2
    assert {c.layers for c in shapes} == {1, 2, 3, 4} and {c.hidden for c in shapes} == {128, 192, 256}
    assert all(
        c.hidden % c.heads == 0 and (c.hidden // c.heads) % 2 == 0 and c.heads == 2 * c.kv_heads
        for c in shapes
    )
    with pytest.raises(StillroomError, match="grid is empty"):
        grid(student, teacher, hidden=[6], heads=[4], layers=[1])


def test_search_student_end_to_end(tmp_path, tiny_teacher, corpus_dir, write_recipe):
    d = lm_recipe(tiny_teacher, corpus_dir, checkpoint_every=0, steps=3)
    d["student"] = {
        "config": {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    }
    d["export"] = {"to": "onnx", "fused": True}  # ORT's fused attention: head width a multiple of 16
    recipe = write_recipe(d)
    out, again = tmp_path / "diswot", tmp_path / "autodistil"
    args = [
        "search-student",
        str(recipe),
        "--latency-ms",
        "1e6",
        "--layers",
        "1",
        "--hidden",
        "16,32",
        "--heads",
        "2",
    ]
    args += ["--prompt-tokens", "4", "--new-tokens", "4", "--threads", "1"]
    main([*args, "--out", str(out)])
    board = json.loads((out / "leaderboard.json").read_text())
    names = [r["name"] for r in board["candidates"]]
    assert sorted(names) == ["L1-H32-A2-I32", "L1-H32-A2-I64"] and board["default"] == "L1-H32-A2-I64"
    assert sorted(board["not_exportable"]) == ["L1-H16-A2-I16", "L1-H16-A2-I32"]  # head width 8: dropped
    best = next(r for r in board["candidates"] if r["name"] == board["best"])
    assert best["rank"] == 1 and best["score"] == max(r["score"] for r in board["candidates"])
    picked = recipes.load(out / "best.yaml")
    assert picked.student.config["intermediate_size"] == best["intermediate"]
    run = json.loads((out / "best" / "run.json").read_text())
    assert board["distilled"][best["name"]] == run["final_eval"] and run["steps"] == 3
    assert (out / "latency_score.png").read_bytes()[:4] == b"\x89PNG"
    assert "| rank |" in (out / "leaderboard.md").read_text()
    assert len(list((out / "latency").glob("*.json"))) == 2

    (again / "latency").mkdir(parents=True)  # measured latencies carry over: nothing is exported again
    for cached in (out / "latency").glob("*.json"):
        (again / "latency" / cached.name).write_bytes(cached.read_bytes())
    main([*args, "--out", str(again), "--strategy", "autodistil", "--super-steps", "2"])
    board = json.loads((again / "leaderboard.json").read_text())
    assert board["strategy"] == "autodistil" and len(list((again / "latency").glob("*.json"))) == 2
    assert all(r["score"] == -r["relation_loss"] for r in board["candidates"])
    picked = recipes.load(again / "best.yaml")
    assert picked.student.path == str(again / "best_init")  # distilled from the extracted sub-network
    init = json.loads((again / "best_init" / "config.json").read_text())
    assert init["intermediate_size"] == next(
        r["intermediate"] for r in board["candidates"] if r["name"] == board["best"]
    )
    assert json.loads((again / "best" / "run.json").read_text())["steps"] == 3


def test_autodistil_sub_networks_share_the_super_students_weights(tiny_teacher):
    teacher, _ = models.load_causal_lm(str(tiny_teacher))
    big, small = Candidate(2, 32, 4, 2, 64), Candidate(1, 16, 4, 2, 16)  # head width 8 -> 4
    sup = autodistil.SuperStudent(teacher, [big, small])
    super_q = sup.model.model.layers[0].self_attn.q_proj.weight
    sliced = autodistil.sub_weights(sup.model, small)
    assert not any(".layers.1." in name for name in sliced)  # one block
    q = sliced["model.layers.0.self_attn.q_proj.weight"]
    gate = sliced["model.layers.0.mlp.gate_proj.weight"]
    super_gate = sup.model.model.layers[0].mlp.gate_proj.weight
    assert gate.untyped_storage().data_ptr() == super_gate.untyped_storage().data_ptr()  # a view
    assert q.shape == (16, 16) and q.grad_fn is not None  # a differentiable gather of the shared weight
    torch.testing.assert_close(q, super_q.view(4, 8, 32)[:, :4, :16].reshape(16, 16))

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits, qkv = sup.forward(small, ids)
    extracted = sup.extract(small).eval()
    torch.testing.assert_close(extracted(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)
    assert [t.shape[-1] for t in qkv] == [16, 8, 8]

    logits.square().mean().backward()  # the sub-network's gradient lands in its slice, nowhere else
    grad = super_q.grad.view(4, 8, 32)
    assert grad[:, :4, :16].abs().sum() > 0
    assert grad[:, 4:].abs().sum() == 0 and grad[:, :, 16:].abs().sum() == 0
    assert sup.model.model.layers[1].self_attn.q_proj.weight.grad is None


def test_relation_loss_matches_an_independent_computation():
    gen = torch.Generator().manual_seed(1)
    t = [torch.randn(2, 5, 6, generator=gen) for _ in range(3)]
    s = [torch.randn(2, 5, 4, generator=gen) for _ in range(3)]
    expected = 0.0
    for x_t, x_s in zip(t, s, strict=True):
        kl = []
        for b in range(2):
            for i in range(5):  # causal rows: keys 0..i
                p = torch.softmax(x_t[b, : i + 1].double() @ x_t[b, i].double() / 6**0.5, 0)
                q = torch.softmax(x_s[b, : i + 1].double() @ x_s[b, i].double() / 4**0.5, 0)
                kl.append(float((p * (p / q).log()).sum()))
        expected += np.mean(kl) / 3
    assert float(autodistil.relation_loss(t, s)) == pytest.approx(expected, rel=1e-5)
    assert float(autodistil.relation_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
