"""Export report: per artifact, export time, size, max abs diff, greedy agreement, int8 deltas.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_report.py [--model DIR ...] [--work DIR]

Without ``--model`` it builds tiny students from configs (GPT-2, Llama with GQA, a 2-step
class-conditional generator) and, when the embedded LM teacher has weights, exports it too. Each
model is exported fp32 and int8; the int8 row shows its size relative to fp32 and its quality delta
(LM: perplexity relative change and greedy agreement vs fp32 PyTorch; generator: PSNR vs fp32).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="LM or generator student dir")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

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
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    print("| " + " | ".join(k.ljust(widths[k]) for k in keys) + " |")  # noqa: T201 - a report script
    print("|" + "|".join("-" * (widths[k] + 2) for k in keys) + "|")  # noqa: T201
    for r in rows:
        print("| " + " | ".join(r[k].ljust(widths[k]) for k in keys) + " |")  # noqa: T201


if __name__ == "__main__":
    main()
