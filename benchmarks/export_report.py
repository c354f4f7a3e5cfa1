"""Export report: per artifact, export time, size, max abs diff, greedy agreement, int8 deltas.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_report.py [--model DIR ...] [--work DIR]

Without ``--model`` it builds tiny students from configs (GPT-2, Llama with GQA, a 2-step
class-conditional generator) and, when the embedded LM teacher has weights, exports it too. Each
model is exported fp32 and int8; the int8 row shows its size relative to fp32 and its quality delta
(LM: perplexity relative change and greedy agreement vs fp32 PyTorch; generator: PSNR vs fp32).

Whether a generator's int8 graph pays off on CPU, on two artifacts already exported:

    .venv/bin/stillroom export demo-out/runs/mnist-4step --out /tmp/g32
    .venv/bin/stillroom export demo-out/runs/mnist-4step --int8 --out /tmp/g8
    .venv/bin/python benchmarks/export_report.py --generator-pair /tmp/g32 /tmp/g8

Latency: both artifacts are opened on ONNX Runtime's CPU provider in this one process and called
alternately (fp32, int8, fp32, ...) on the same noise and labels, so drift of the machine (other load,
clocks) hits both alike; the median of ``--latency-repeats`` calls per batch size (1 and 16) is
reported. Quality: ``stillroom bench ART --batch 1 --repeats 3 --samples N --teacher-steps 2`` per
artifact, the FID-like score from its ``report.json`` (against real MNIST, lower is better).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LATENCY_BATCHES = (1, 16)


def _row(name: str, variant: str, art, seconds: float, fp32_bytes: int | None) -> dict:
    from stillroom.core.onnx_variants import file_bytes

    v = art.manifest.validation
    size = file_bytes(art.graph())
    return {
        "model": name,
        "variant": variant,
        "exporter": art.manifest.exporter,
        "export_s": f"{seconds:.1f}",
        "MB": f"{size / 1e6:.2f}",
        "size_vs_fp32": f"{size / fp32_bytes:.2f}" if fp32_bytes else "1.00",
        "max_abs_diff": f"{v['max_abs_diff']:.2e}" if v.get("max_abs_diff") is not None else "-",
        "greedy_agree": f"{v['greedy_agreement']:.3f}" if "greedy_agreement" in v else "-",
        "ppl_delta": f"{v['perplexity_rel_delta']:+.2%}" if "perplexity_rel_delta" in v else "-",
        "psnr_db": f"{v['psnr_db']:.1f}" if "psnr_db" in v else "-",
        "passed": str(v["passed"]),
    }


def _latency_ms(paths: list[Path], repeats: int) -> dict[tuple[str, int], float]:
    """Median ms per ``generate`` call, per (artifact, batch), with the artifacts' calls interleaved."""
    import numpy as np

    from stillroom.serve.runtimes import onnxruntime_runtime

    gens = {str(p): onnxruntime_runtime(str(p), provider="cpu") for p in paths}
    medians = {}
    for batch in LATENCY_BATCHES:
        any_gen = next(iter(gens.values()))
        noise = any_gen.noise(batch, seed=0)
        labels = np.arange(batch, dtype=np.int64) % 10
        times: dict[str, list[float]] = {name: [] for name in gens}
        for i in range(repeats + 2):  # the first two rounds warm up (allocations, thread pools)
            for name, gen in gens.items():
                started = time.perf_counter()
                gen.generate(noise, class_labels=labels)
                if i >= 2:
                    times[name].append((time.perf_counter() - started) * 1e3)
        medians.update({(name, batch): statistics.median(t) for name, t in times.items()})
    return medians


def _fid_like(art: Path, out: Path, samples: int, teacher_steps: int) -> float:
    """FID-like of ``art`` from ``stillroom bench`` (its own process, as a user would run it).

    The student's FID-like is measured against real MNIST, not against the teacher, so the teacher's
    DDIM steps (``teacher_steps``) only set how long bench spends on the teacher's own row.
    """
    cmd = [str(Path(sys.executable).with_name("stillroom")), "bench", str(art), "--batch", "1"]
    cmd += ["--repeats", "3", "--samples", str(samples), "--provider", "cpu", "--out", str(out)]
    cmd += ["--teacher-steps", str(teacher_steps)]
    subprocess.run(cmd, check=True, capture_output=True)
    return float(json.loads((out / "report.json").read_text())["students"][0]["quality"]["fid_like"])


def generator_pair(
    fp32: Path, int8: Path, work: Path, repeats: int, samples: int, teacher_steps: int
) -> list[dict]:
    """Rows of the fp32-vs-int8 table for two exported generator artifacts."""
    from stillroom.core.artifact import load

    latency = _latency_ms([fp32, int8], repeats)
    print(
        "median ms (interleaved, CPU):",
        {f"{Path(k[0]).name} b{k[1]}": round(v, 1) for k, v in latency.items()},
    )  # noqa: T201
    rows = []
    for variant, path in (("fp32", fp32), ("int8", int8)):
        extra = load(path).manifest.extra
        ops = extra.get("int8_ops") or {}
        row = {
            "artifact": str(path),
            "variant": variant,
            "int8_method": extra.get("int8_method", "-"),
            "int8_ops": " ".join(f"{k}:{v['int8']}/{v['total']}" for k, v in ops.items()) or "-",
        }
        for batch in LATENCY_BATCHES:
            row[f"ms_b{batch}"] = f"{latency[(str(path), batch)]:.1f}"
            ratio = latency[(str(path), batch)] / latency[(str(fp32), batch)]
            row[f"vs_fp32_b{batch}"] = f"{ratio:.2f}x"
        row["fid_like"] = f"{_fid_like(path, work / f'bench-{variant}', samples, teacher_steps):.3f}"
        rows.append(row)
    return rows


def _print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    print("| " + " | ".join(k.ljust(widths[k]) for k in keys) + " |")  # noqa: T201 - a report script
    print("|" + "|".join("-" * (widths[k] + 2) for k in keys) + "|")  # noqa: T201
    for r in rows:
        print("| " + " | ".join(r[k].ljust(widths[k]) for k in keys) + " |")  # noqa: T201


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="LM or generator student dir")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument(
        "--generator-pair",
        nargs=2,
        type=Path,
        metavar=("FP32_ART", "INT8_ART"),
        help="compare two exported generator artifacts on CPU: latency and FID-like",
    )
    parser.add_argument("--latency-repeats", type=int, default=15)
    parser.add_argument("--samples", type=int, default=100, help="images scored by stillroom bench")
    parser.add_argument("--teacher-steps", type=int, default=2, help="bench's teacher DDIM steps")
    args = parser.parse_args()
    if args.generator_pair:
        work = args.work or Path(tempfile.mkdtemp(prefix="export-report-"))
        _print_table(
            generator_pair(*args.generator_pair, work, args.latency_repeats, args.samples, args.teacher_steps)
        )
        return

    from stillroom.data import root as data_root
    from stillroom.export.command import to_onnx
    from stillroom.testing import build_tiny_generator, build_tiny_lm

    work = args.work or Path(tempfile.mkdtemp(prefix="export-report-"))
    models = [(Path(m).name, Path(m)) for m in args.model]
    if not models:
        models = [
            ("tiny-gpt2", build_tiny_lm(work / "gpt2", "gpt2")),
            ("tiny-llama-gqa", build_tiny_lm(work / "llama", "llama")),
            ("tiny-gen-2step", build_tiny_generator(work / "gen", steps=2, conditioning="class")),
        ]
        teacher = data_root() / "lm_teacher"
        if (teacher / "config.json").is_file():
            models.append(("embedded-lm-teacher", teacher))
    rows = []
    for name, path in models:
        fp32_bytes = None
        for variant in ("fp32", "int8"):
            started = time.perf_counter()
            art = to_onnx(path, work / f"{name}-{variant}", int8=variant == "int8")
            seconds = time.perf_counter() - started
            row = _row(name, variant, art, seconds, fp32_bytes)
            fp32_bytes = fp32_bytes or art.manifest.extra["fp32_bytes"]
            rows.append(row)
    _print_table(rows)


if __name__ == "__main__":
    main()
