"""GPU readiness: one prepared script that proves stillroom's CUDA paths on a lent accelerator.

Our development machines have no GPU, so the CUDA code paths (bf16 autocast, CUDA roles, ORT's
CUDA/TensorRT providers, torch.compile, TensorRT engines) are written blind unless this script runs
where a GPU is. In one run (under 8 minutes on one GPU) it

1. trains every built-in method plugin for 20 steps on CUDA with bf16 autocast on tiny teacher /
   student pairs built from configs, checks that the losses are finite and fall, and that a
   checkpoint written on CUDA resumes to the end;
2. exports one tiny generator and one tiny LM student to ONNX and runs them through every runtime
   present (torch eager, torch.compile, onnxruntime with each available provider, TensorRT when
   installed), comparing outputs against PyTorch;
3. times teacher vs student for the tiny models with the bench machinery (CUDA events);
4. prints one table (check, result, seconds) last, and writes the full log and a JSON copy of the
   table to --out (default: $OUT when set, else ./gpu_check_out).

Without CUDA it exits at once with one line saying so. How to run it through the device tool, and
the last table obtained, are in benchmarks/gpu_check.md.

    python benchmarks/gpu_check.py [--out DIR] [--only lm,diffusion,export,runtimes,timing]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("gpu_check")

# Packages stillroom needs that the lent H200 image does not hold (device KINDS.md, 2026-11-17), with
# the versions this repository is tested with. They travel as wheels (see gpu_check.md).
DEVICE_WHEELS: dict[str, str] = {
    "diffusers": "0.42.1",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
}
# What the device image already has, of stillroom's runtime dependencies.
DEVICE_HAS = {
    "torch",
    "transformers",
    "tokenizers",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "pluggy",
    "safetensors",
    "pyyaml",
    "click",
    "rich",
    "numpy",
    "psutil",
    "matplotlib",
    "huggingface-hub",
}
SECTIONS = ("lm", "diffusion", "export", "runtimes", "timing")
STEPS = 20


@dataclass
class Check:
    """One row of the final table."""

    check: str
    result: str  # "ok", "FAIL: ...", or "skip: ..."
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.result.startswith("FAIL")


def no_cuda_line() -> str | None:
    """The one line printed on a machine without CUDA (None when a GPU is visible)."""
    try:
        import torch
    except ImportError:
        return "gpu_check: torch is not installed; nothing to check"
    if not torch.cuda.is_available():
        return (
            "gpu_check: no CUDA GPU visible; nothing to check here (run it on a GPU: benchmarks/gpu_check.md)"
        )
    return None


def wheel_requirements() -> list[str]:
    """``name==version`` of every wheel to carry to the device machine."""
    return [f"{name}=={version}" for name, version in DEVICE_WHEELS.items()]


def render_table(rows: list[Check]) -> str:
    """A plain-text table, widest cell per column (readable in a log and in output_tail)."""
    header = ("check", "result", "seconds")
    cells = [header] + [(r.check, r.result, f"{r.seconds:.1f}") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(3)) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    passed = sum(r.ok for r in rows)
    lines.append(f"{passed}/{len(rows)} checks without failure")
    return "\n".join(lines)


def write_results(rows: list[Check], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    path.write_text(
        json.dumps({"checks": [asdict(r) for r in rows], "passed": all(r.ok for r in rows)}, indent=2)
    )
    return path


def timed(name: str, rows: list[Check], fn: Callable[[], dict[str, Any] | str | None]) -> None:
    """Runs one check; an exception is a FAIL row with its message (the traceback goes to the log)."""
    start = time.perf_counter()
    try:
        out = fn()
        detail = out if isinstance(out, dict) else {}
        result = out if isinstance(out, str) else "ok"
    except Exception as err:  # noqa: BLE001 - every failure becomes a row, the run goes on
        log.error("%s failed:\n%s", name, traceback.format_exc())
        result, detail = f"FAIL: {type(err).__name__}: {' '.join(str(err).split())[:160]}", {}
    rows.append(Check(name, result, time.perf_counter() - start, detail))
    log.info("%-40s %s", name, result)


# -- 1. every built-in method on CUDA -----------------------------------------------------------
def shipped_recipe(method: str) -> dict[str, Any]:
    """The CPU-sized shipped recipe of ``method`` (GPU-scale ones need hub teachers)."""
    from stillroom.core.recipe import load_yaml, named_recipes

    for name, path in sorted(named_recipes().items()):
        data = load_yaml(path)
        if (data.get("method") or {}).get("name") == method and not name.startswith(("sd15", "lm-smollm2")):
            return data
    raise LookupError(f"no shipped recipe uses method '{method}'")


def teacher_asset(method: str, family: str) -> str:
    """The tiny teacher ``method`` trains on: the flow-matching one for a method that distils only flow
    teachers (``DiffusionMethod.teachers``), else its family's."""
    from stillroom.core.host import get_host

    kinds = getattr(get_host().method(method), "teachers", None)
    return "flow_teacher" if kinds is not None and "ddpm" not in kinds else f"{family}_teacher"


def tiny_recipe(method: str, family: str, assets: dict[str, Path], run: Path) -> dict[str, Any]:
    data = shipped_recipe(method)
    data["train"] = {
        **(data.get("train") or {}),
        "steps": STEPS,
        "batch_size": 4,
        "device": "cuda",
        "precision": "bf16",
        "checkpoint_every": STEPS // 2,
        "keep_checkpoints": 2,
        "eval_every": 0,
        "tensorboard": False,
        "warmup_steps": 0,
        "lr": 3e-3,
    }
    data["teacher"] = {**(data.get("teacher") or {}), "path": str(assets[teacher_asset(method, family)])}
    if family == "lm":
        data["teacher"].pop("cache", None)
        # the shipped recipe's init (lm_had's GPT-2 student starts random; block copy needs a Llama)
        init = (data.get("student") or {}).get("init", "teacher-layers")
        data["student"] = {"config": {"num_hidden_layers": 1}, "init": init}
        data["data"] = {
            **(data.get("data") or {}),
            "source": str(assets["corpus"]),
            "seq_len": 16,
            "eval_tokens": 128,
        }
    else:
        data["data"] = {"source": str(assets["images"])}
    return data


def loss_key(rows: list[dict[str, Any]]) -> str:
    """The student's loss, or the critic's denoising loss for critic methods (DMD2, VSD)."""
    keys = {k for r in rows for k in r}
    return "critic_denoise" if "critic_denoise" in keys else "loss/student"


def check_method(method: str, family: str, assets: dict[str, Path], work: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from stillroom.core import checkpoint
    from stillroom.core import recipe as recipes
    from stillroom.core.trainer import Trainer, iter_metrics

    run = work / f"run-{method}"
    rec = recipes.validate(tiny_recipe(method, family, assets, run))
    student = Trainer(rec, run).fit()
    rows = list(iter_metrics(run))
    key = loss_key(rows)
    values = [r[key] for r in rows if key in r and "final" not in r]
    if len(values) != STEPS or not all(map(lambda v: v == v and abs(v) != float("inf"), values)):
        raise AssertionError(f"{key}: {len(values)} values, finite={all(v == v for v in values)}")
    k = max(2, len(values) // 4)
    head, tail = sum(values[:k]) / k, sum(values[-k:]) / k
    if not tail < head:
        raise AssertionError(f"{key} did not fall: {head:.4f} -> {tail:.4f}")
    # resume on CUDA: drop the final checkpoint and the student, continue from the middle one
    shutil.rmtree(student)
    (run / "run.json").unlink()
    shutil.rmtree(checkpoint.list_checkpoints(run / "checkpoints")[-1])
    resumed = Trainer(rec, run).fit(resume=True)
    weights = sorted(p for p in resumed.rglob("*.safetensors"))
    if not weights:
        raise AssertionError("resumed run saved no weights")
    finite = all(torch.isfinite(t).all() for p in weights for t in load_file(p).values())
    return {"loss_key": key, "head": round(head, 5), "tail": round(tail, 5), "resume_finite": bool(finite)}


# -- 2. export + runtimes -------------------------------------------------------------------------
def available_runtimes() -> list[tuple[str, dict[str, Any]]]:
    """(runtime, options) pairs to try on this machine, torch eager first (the reference)."""
    pairs: list[tuple[str, dict[str, Any]]] = [
        ("torch", {"device": "cuda"}),
        ("torch", {"device": "cuda", "compile": True}),
    ]
    import onnxruntime as ort

    providers = ort.get_available_providers()
    for provider, name in (
        ("TensorrtExecutionProvider", "tensorrt"),
        ("CUDAExecutionProvider", "cuda"),
        ("CPUExecutionProvider", "cpu"),
    ):
        if provider in providers:
            pairs.append(("onnxruntime", {"provider": name}))
    return pairs


def compare_lm(artifact: Path, model_dir: Path) -> dict[str, Any]:
    import numpy as np

    from stillroom.core.host import get_host

    host = get_host()
    ids = np.random.default_rng(0).integers(1, 200, size=(2, 12)).astype(np.int64)
    ref = host.runtime("torch")(str(model_dir), device="cuda").full_logits(ids)
    diffs = {}
    for name, opts in available_runtimes()[1:]:
        target = str(model_dir) if name == "torch" else str(artifact)
        try:
            got = host.runtime(name)(target, **opts).full_logits(ids)
            diffs[f"{name}:{opts.get('provider', 'compile')}"] = float(np.abs(got - ref).max())
        except Exception as err:  # noqa: BLE001 - one runtime failing is reported, not fatal
            diffs[f"{name}:{opts.get('provider', 'compile')}"] = f"error: {err}"
    return diffs


def compare_generator(artifact: Path, student_dir: Path) -> dict[str, Any]:
    import numpy as np

    from stillroom.core.host import get_host

    host = get_host()
    reference = host.runtime("torch")(str(student_dir), device="cuda")
    noise = reference.noise(4, seed=0)
    labels = np.arange(4, dtype=np.int64)
    ref = reference.generate(noise, labels)
    diffs = {}
    for name, opts in available_runtimes()[1:]:
        target = str(student_dir) if name == "torch" else str(artifact)
        try:
            got = host.runtime(name)(target, **opts).generate(noise, labels)
            diffs[f"{name}:{opts.get('provider', 'compile')}"] = float(np.abs(got - ref).max())
        except Exception as err:  # noqa: BLE001
            diffs[f"{name}:{opts.get('provider', 'compile')}"] = f"error: {err}"
    return diffs


def tensorrt_check(onnx_artifact: Path, work: Path) -> dict[str, Any] | str:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "skip: tensorrt is not installed (carry its wheels to test it)"
    from stillroom.core.host import get_host

    engine = get_host().exporter("tensorrt")(onnx_artifact, work / "engine")
    return {"engine": str(engine)}


def check_runtime_diffs(diffs: dict[str, Any], tolerance: float) -> dict[str, Any]:
    bad = {k: v for k, v in diffs.items() if isinstance(v, str) or v > tolerance}
    if bad:
        raise AssertionError(f"outside {tolerance}: {bad}")
    return diffs


# -- 3. timing --------------------------------------------------------------------------------------
def cuda_time_ms(fn: Callable[[], Any], repeats: int = 20) -> float:
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def timing_check(assets: dict[str, Path], student_dir: Path) -> dict[str, Any]:
    import numpy as np

    from stillroom.core.host import get_host

    host = get_host()
    teacher = host.runtime("torch")(str(assets["diffusion_teacher"]), device="cuda", steps=50)
    student = host.runtime("torch")(str(student_dir), device="cuda")
    noise = student.noise(8, seed=0)
    labels = np.arange(8, dtype=np.int64) % 10
    t_ms = cuda_time_ms(lambda: teacher.generate(noise, labels), repeats=3)
    s_ms = cuda_time_ms(lambda: student.generate(noise, labels), repeats=10)
    return {
        "teacher_50step_ms": round(t_ms, 2),
        "student_ms": round(s_ms, 2),
        "speedup": round(t_ms / s_ms, 1),
    }


# -- main ---------------------------------------------------------------------------------------------
def build_flow_teacher(out: Path) -> Path:
    """The tiny class teacher's UNet with a rectified-flow scheduler (a velocity teacher)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stillroom.testing import build_class_teacher

    build_class_teacher(out)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(out / "scheduler")
    return out


def build_assets(root: Path) -> dict[str, Path]:
    from stillroom.testing import build_class_teacher, build_label_folder, build_tiny_generator, build_tiny_lm

    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    from stillroom.testing import TEXT

    (corpus / "train.txt").write_text(TEXT * 20)
    (corpus / "valid.txt").write_text(TEXT * 2)
    return {
        "lm_teacher": build_tiny_lm(root / "lm_teacher", "llama", layers=2, hidden=64),
        "corpus": corpus,
        "diffusion_teacher": build_class_teacher(root / "diffusion_teacher"),
        "flow_teacher": build_flow_teacher(root / "flow_teacher"),
        "images": build_label_folder(root / "images"),
        "generator": build_tiny_generator(root / "generator", steps=2),
    }


def run_checks(sections: tuple[str, ...], work: Path) -> list[Check]:
    from stillroom.core.host import get_host

    rows: list[Check] = []
    assets: dict[str, Path] = {}
    timed("build tiny models", rows, lambda: assets.update(build_assets(work / "assets")) or {})
    host = get_host()
    builtin = [(m, info.name) for info in host.infos() if info.builtin for m in info.methods]
    for family in ("lm", "diffusion"):
        if family not in sections:
            continue
        for method, plugin in builtin:
            if plugin == family:
                timed(
                    f"{family}/{method}: 20 bf16 steps + resume",
                    rows,
                    lambda m=method, f=family: check_method(m, f, assets, work),
                )
    lm_art, gen_art = work / "lm.onnx", work / "gen.onnx"
    if "export" in sections or "runtimes" in sections:
        from stillroom.plugins.diffusion.export import export_generator
        from stillroom.plugins.lm.export.onnx_artifact import export_causal_lm

        timed(
            "export tiny LM (onnx, validated)",
            rows,
            lambda: {"graphs": list(export_causal_lm(assets["lm_teacher"], lm_art).manifest.graphs)},
        )
        timed(
            "export tiny generator (onnx, validated)",
            rows,
            lambda: {"graphs": list(export_generator(assets["generator"], gen_art).manifest.graphs)},
        )
    if "runtimes" in sections:
        timed(
            "LM logits on every runtime vs torch",
            rows,
            lambda: check_runtime_diffs(compare_lm(lm_art, assets["lm_teacher"]), 2e-2),
        )
        timed(
            "generator on every runtime vs torch",
            rows,
            lambda: check_runtime_diffs(compare_generator(gen_art, assets["generator"]), 2e-2),
        )
        timed("TensorRT engine from the LM artifact", rows, lambda: tensorrt_check(lm_art, work))
    if "timing" in sections:
        timed(
            "teacher 50-step vs student (CUDA events)",
            rows,
            lambda: timing_check(assets, assets["generator"]),
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"))
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    line = no_cuda_line()
    if line is not None:
        print(line)
        return 0
    sections = tuple(s for s in args.only.split(",") if s in SECTIONS)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        handlers=[logging.FileHandler(args.out / "gpu_check.log"), logging.StreamHandler()],
    )
    import torch

    log.info(
        "device: %s, torch %s, CUDA %s", torch.cuda.get_device_name(0), torch.__version__, torch.version.cuda
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_checks(sections, Path(tmp))
    write_results(rows, args.out)
    print(render_table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
