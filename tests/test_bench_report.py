"""`stillroom bench` on tiny artifacts: each runtime in its own process, report files and schema."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess

import numpy as np
import pytest
import torch

from tests.conftest import STILLROOM, cli_env
from tests.test_serve_images import generator_artifact, generator_student  # noqa: F401 - fixtures
from tests.test_serve_runtime import lm_artifact, lm_pair  # noqa: F401 - fixtures


def _bench(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [STILLROOM, "bench", *args], env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _check_entry(entry: dict, kind: str) -> None:
    assert {
        "name",
        "runtime",
        "batch",
        "latency_ms",
        "throughput",
        "quality",
        "load_s",
        "peak_rss_mb",
    } <= set(entry)
    lat = entry["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
    assert entry["throughput"] > 0 and entry["load_s"] > 0 and entry["peak_rss_mb"] > 10
    if kind == "causal-lm":
        assert entry["throughput_unit"] == "tokens/s"
        assert 0 < entry["ttft_ms"]["p50"] < lat["p50"] and entry["per_token_ms"]["p50"] > 0
        # throughput is batch * new_tokens / median latency
        assert entry["throughput"] == pytest.approx(entry["batch"] * 4 / (lat["p50"] / 1000), rel=1e-6)
    else:
        assert entry["throughput_unit"] == "images/s"


def test_bench_lm_against_teacher(lm_pair, lm_artifact, tmp_path):  # noqa: F811
    teacher, student = lm_pair
    out = tmp_path / "report"
    _bench(
        str(lm_artifact),
        "--teacher",
        str(teacher),
        "--runtime",
        "onnxruntime,tensorrt",
        "--batch",
        "1,2",
        "--warmup",
        "1",
        "--repeats",
        "3",
        "--new-tokens",
        "4",
        "--prompt-tokens",
        "8",
        "--out",
        str(out),
    )
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "causal-lm" and report["machine"]["cpu_count"] >= 1
    assert report["teacher"]["name"] == "teacher" and [e["batch"] for e in report["teacher"]["by_batch"]] == [
        1,
        2,
    ]
    trt = [
        s for s in report["students"] if s["runtime"] == "tensorrt"
    ]  # no GPU / tensorrt here: an error row
    if "error" in trt[0]:
        assert len(trt) == 1 and "tensorrt" in trt[0]["error"].lower()
    students = [s for s in report["students"] if s["runtime"] == "onnxruntime"]
    assert [s["batch"] for s in students] == [1, 2]
    for entry in [*students, *report["teacher"]["by_batch"]]:
        _check_entry(entry, "causal-lm")
    for s in students:
        t = next(e for e in report["teacher"]["by_batch"] if e["batch"] == s["batch"])
        assert s["speedup_p50"] == pytest.approx(t["latency_ms"]["p50"] / s["latency_ms"]["p50"])
    at_one = [s["speedup_p50"] for s in students if s["batch"] == 1]
    assert report["speedup_p50"] == pytest.approx(max(at_one))

    # quality against an independent float64 computation on the same held-out tokens
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = (out / "work" / "heldout.txt").read_text()
    tok = AutoTokenizer.from_pretrained(student)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = min(report["settings"]["eval_blocks"], len(ids) // 64)
    blocks = torch.tensor(ids[: n * 64]).view(n, 64)
    with torch.no_grad():
        s_logits = AutoModelForCausalLM.from_pretrained(student)(blocks).logits[:, :-1].double()
        t_logits = AutoModelForCausalLM.from_pretrained(teacher)(blocks).logits[:, :-1].double()
    target = blocks[:, 1:]
    nll = -(s_logits.log_softmax(-1).gather(-1, target[..., None])).mean().item()
    agreement = (s_logits.argmax(-1) == t_logits.argmax(-1)).double().mean().item()
    for s in students:
        assert s["quality"]["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
        assert s["quality"]["top1_agreement"] == pytest.approx(agreement, abs=1.0 / target.numel())
        assert len(s["continuations"]) == 3 and all("text" in c for c in s["continuations"])

    md = (out / "report.md").read_text()
    assert "| model | runtime | batch | p50 ms" in md and "onnxruntime" in md and "Continuations" in md
    html = (out / "report.html").read_text()
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(pngs) >= 2 and all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert 'src="http' not in html and "<script" not in html  # self-contained


def _diffusion_teacher(root):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(3)
    UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=11,
    ).save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return root


def test_bench_generator_against_ddim_teacher(generator_artifact, tmp_path):  # noqa: F811
    teacher = _diffusion_teacher(tmp_path / "teacher")
    out = tmp_path / "report"
    _bench(
        str(generator_artifact),
        "--teacher",
        str(teacher),
        "--teacher-steps",
        "2",
        "--batch",
        "1,4",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--samples",
        "50",
        "--out",
        str(out),
    )
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "generator"
    for entry in [*report["students"], *report["teacher"]["by_batch"]]:
        _check_entry(entry, "generator")
        q = entry["quality"]
        assert {"fid_like", "class_accuracy", "diversity", "recall"} <= set(q) and 0 <= q[
            "class_accuracy"
        ] <= 1
        assert (out / entry["samples"]).is_file()
    student = report["students"][0]
    assert report["teacher"]["quality"]["fid_like"] != student["quality"]["fid_like"]  # different models
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # latency, quality, two sample grids


def test_bench_cli_errors_are_one_line(lm_artifact, tmp_path):  # noqa: F811
    proc = subprocess.run(
        [STILLROOM, "bench", str(lm_artifact), "--runtime", "nope", "--out", str(tmp_path)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error: unknown runtime 'nope'")
    proc = subprocess.run(
        [STILLROOM, "bench", str(tmp_path / "missing"), "--out", str(tmp_path)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        proc.returncode == 1
        and "does not exist" in proc.stderr
        and len(proc.stderr.strip().splitlines()) == 1
    )


def test_percentiles_against_reference():
    from stillroom.core.measure import percentiles

    samples = [0.010, 0.030, 0.020, 0.050, 0.040]
    ordered = sorted(s * 1000 for s in samples)

    def ref(q):  # linear interpolation between order statistics
        pos = q / 100 * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    got = percentiles(samples)
    for q in (50, 90, 99):
        assert got[f"p{q}"] == pytest.approx(ref(q))
    assert got["mean"] == pytest.approx(float(np.mean(ordered)))
