"""Teachers vs distilled students on the embedded MNIST domain: quality per network evaluation.

One table for one or more teachers (``--teacher ddpm,flow``: the DDPM teacher at DDIM steps, the
flow-matching teacher at Euler steps), each teacher at 50/25/10/4/1 steps and each method's student at
``--student-steps``, with FID-like (classifier features, NOT Inception FID), class accuracy, diversity
(1.0 = as varied as real digits), recall, wall time per image, speedup over the teacher at its most
steps and the student's training CPU minutes; a PNG sample grid per row and ``fid_vs_steps.png`` (one
panel per teacher) beside the table. A method runs on every listed teacher its equations hold for
(``Method.teachers``).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/diffusion_steps.py --out runs/diffusion_steps \
        --teacher ddpm,flow --methods progressive,boot,mdt --train-for "1;progressive=1,4" \
        --train-steps progressive=320,boot=400,mdt=300 --per-class 30

``--init dmd2=progressive`` starts each DMD2 student from the progressive student with the same step
count trained earlier in the run (list the source first in ``--methods``). ``--student LABEL=DIR``
adds rows for a student trained elsewhere (e.g. a second fine-tuning stage), scored on the same noise.

Students are trained by the shipped recipes (``stillroom/recipes/mnist-*.yaml``) with ``train.steps``
(one number, or ``method=N,...``), ``student.steps`` and the teacher overridden: one student per step
count in ``--train-for`` (default 1 and 4; ``"1,4;boot=1;agd=10"`` per method); a row whose step count
has no student of its own retargets the nearest trained student (``load_generator(..., steps=k)``) and
says so in the ``trained_for`` column. An existing run directory is reused with its recorded CPU time.
Each teacher samples with its card's CFG scale (DDPM 2.0 with DDIM, x0 clipped as its scheduler config
says; flow 1.5 with Euler), and its students are distilled at that scale.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from stillroom.core.fsio import write_json, write_text

METHODS = {
    "progressive": "mnist-progressive",
    "consistency": "mnist-consistency",
    "hypersd": "mnist-hypersd",
    "dmd2": "mnist-dmd2",
    "vsd": "mnist-vsd",
    "flow_map": "mnist-flow-map",
    "mdt": "mnist-mdt",
    "boot": "mnist-boot",
    "tbcm": "mnist-tbcm",
    "agd": "mnist-agd",
    "phased_dmd": "mnist-phased-dmd",
    "distill_dpo": "mnist-distill-dpo",
}
# --teacher NAME: (teacher spec, CFG scale of its reference rows = its card's recommended w)
TEACHERS = {"ddpm": ("embedded:mnist_teacher", 2.0), "flow": ("embedded:mnist_flow_teacher", 1.5)}


def save_grid(images: torch.Tensor, path: Path, per_row: int) -> None:
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()[:, 0]
    n, h, w = x.shape
    rows = (n + per_row - 1) // per_row
    grid = torch.zeros(rows * h, per_row * w, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, per_row)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = x[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)


def parse_budgets(text: str) -> dict[str, int]:
    """``"200"`` -> {"*": 200}; ``"dmd2=40,vsd=30"`` -> {"dmd2": 40, "vsd": 30}."""
    out = {}
    for part in text.split(","):
        name, _, n = part.rpartition("=")
        out[name or "*"] = int(n)
    return out


def overrides_for(method: str, extra: str) -> list[str]:
    """The ``--extra`` overrides that apply to ``method``: unprefixed ones and ``method:KEY=VALUE``."""
    out = []
    for item in extra.split():
        name, sep, rest = item.partition(":")
        if not sep or "=" in name:
            out.append(item)
        elif name == method:
            out.append(rest)
    return out


def generate(fn, noise, labels, batch=250) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [fn(noise[i : i + batch], labels[i : i + batch]) for i in range(0, len(labels), batch)]
        )


def latency(fn, reference, noise, labels, repeats=3) -> tuple[float, float]:
    """Seconds per image of ``fn`` on one batch and its speedup over ``reference`` on the same batch:
    ``repeats`` interleaved (reference, fn) pairs and their medians, so both sides see the same load."""
    own, ratios = [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            reference(noise, labels)
            t1 = time.perf_counter()
            fn(noise, labels)
            t2 = time.perf_counter()
            own.append((t2 - t1) / len(labels))
            ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(own), statistics.median(ratios)


def parse_train_for(text: str) -> dict[str, list[int]]:
    """``"1,4"`` -> {"*": [1, 4]}; ``"1,4;boot=1;agd=10"`` adds per-method step counts."""
    out = {}
    for part in text.split(";"):
        name, _, counts = part.rpartition("=")
        out[name or "*"] = [int(k) for k in counts.split(",")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/diffusion_steps")
    ap.add_argument("--train-steps", default="200", help="N, or method=N,... per method")
    ap.add_argument(
        "--train-for", default="1,4",
        help="student step counts that get their own student: '1,4', per method '1,4;boot=1;agd=10'",
    )  # fmt: skip
    ap.add_argument(
        "--extra", default="",
        help="extra recipe overrides, space separated: KEY=VALUE for every student, METHOD:KEY=VALUE for one",
    )  # fmt: skip
    ap.add_argument(
        "--init", default="", help="method=source,...: start that method's k-step student from source's"
    )
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--student", action="append", default=[],
        help="LABEL=DIR: also score an already trained student directory (e.g. a chained fine-tune)",
    )  # fmt: skip
    ap.add_argument("--teacher-steps", default="50,25,10,4,1")
    ap.add_argument("--student-steps", default="1,2,4")
    ap.add_argument("--latency-batch", type=int, default=8, help="images per timed call")
    ap.add_argument(
        "--teacher", default="ddpm",
        help="comma-separated: ddpm (DDIM rows), flow (Euler rows) or a class-conditional 28/32px spec; "
        "each method runs on each teacher its equations hold for",
    )  # fmt: skip
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{'teacher':<8}{'model':<14}{'steps':>6}{'trained':>8}{'cpu min':>8}{'fid_like':>10}{'acc':>9}"
        f"{'divers.':>10}{'recall':>8}{'ms/img':>10}"
    )
    rows = []
    for name in args.teacher.split(","):
        rows += Bench(args, name, out / name if "," in args.teacher else out).run()
    write_json(out / "table.json", rows)
    write_text(out / "table.md", markdown(rows, args))
    plot(rows, out / "fid_vs_steps.png")
    print(f"# table: {out / 'table.md'} (and table.json, fid_vs_steps.png); grids: {out}/**/*.png")


class Bench:
    """One teacher's rows: the teacher at each of ``--teacher-steps``, then every method it can teach."""

    def __init__(self, args, name: str, out: Path) -> None:
        from stillroom.plugins.diffusion import models as dm
        from stillroom.plugins.diffusion.metrics import load_classifier
        from stillroom.plugins.diffusion.sampler import is_flow

        self.args, self.name, self.out = args, name, out
        self.spec, self.guidance = TEACHERS.get(name, (name, 2.0))
        self.teacher = dm.load_teacher(self.spec)
        self.kind = "flow" if is_flow(self.teacher.scheduler.config) else "ddpm"
        self.classifier = load_classifier("cpu")
        self.labels = torch.arange(10).repeat_interleave(args.per_class)
        t = self.teacher
        shape = (len(self.labels), t.channels, t.image_size, t.image_size)
        self.noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        self.rows: list[dict] = []

    def run(self) -> list[dict]:
        from stillroom.core.host import get_host
        from stillroom.plugins.diffusion import models as dm

        def sampler(steps):
            def sample(z, y):
                cond, uncond = dm.class_cond(y, self.teacher.null_class)
                return dm.teacher_sample(self.teacher, z, cond, uncond, steps, self.guidance)

            return sample

        teacher_steps = [int(s) for s in self.args.teacher_steps.split(",") if s]
        self.reference = sampler(max(teacher_steps))
        for steps in teacher_steps:
            self.record("teacher", steps, sampler(steps))
        train_for = parse_train_for(self.args.train_for)
        for method in self.args.methods.split(","):
            if self.kind not in get_host().method(method).teachers:
                continue
            counts = [k for k in train_for.get(method, train_for["*"]) if method != "vsd" or k == 1]
            # (SwiftBrush/SNOOPI students are one-step by construction)
            self.score(method, {k: self.train(method, k) for k in counts})
        for item in self.args.student:
            label, _, path = item.partition("=")
            trained = json.loads((Path(path) / "stillroom.json").read_text())["sampler"]["steps"]
            self.score(label, {trained: (Path(path), None)})
        return self.rows

    def train(self, method: str, k: int) -> tuple[Path, float]:
        """Trains (or reuses) ``method``'s k-step student; returns it and its training CPU minutes,
        kept beside the run (``bench_cpu.json``) so a re-run that reuses the student reports its cost."""
        from stillroom.core import recipe as recipes
        from stillroom.core.trainer import Trainer

        run_dir = self.out / "runs" / f"{method}-{k}step"
        record = run_dir / "bench_cpu.json"
        if (run_dir / "student").is_dir() and record.is_file():
            return run_dir / "student", json.loads(record.read_text())["cpu_minutes"]
        n = parse_budgets(self.args.train_steps)
        n = n.get(method, n.get("*", 200))
        init = dict(part.split("=") for part in self.args.init.split(",") if part)
        init = (
            [f"student.init={self.out / 'runs' / f'{init[method]}-{k}step' / 'student'}"]
            if method in init
            else []
        )
        rec = recipes.load(
            METHODS[method],
            [
                f"train.steps={n}",
                f"student.steps={k}",
                "train.device=cpu",
                "train.tensorboard=false",
                "train.log_every=10",
                f"teacher.path={self.spec}",
                f"teacher.guidance={self.guidance}",
                *init,
                *overrides_for(method, self.args.extra),
            ],
        )
        started = time.process_time()
        Trainer(rec, run_dir).fit()
        minutes = (time.process_time() - started) / 60
        write_json(record, {"cpu_minutes": minutes})
        print(f"# {self.name}: {method} {k}-step, {n} steps, {minutes:.1f} CPU-min", flush=True)
        return run_dir / "student", minutes

    def score(self, name: str, students: dict[int, tuple[Path, float | None]]) -> None:
        """Rows at each of ``--student-steps``, from the student trained for the nearest step count."""
        from stillroom.plugins.diffusion.sampler import load_generator

        for steps in [int(s) for s in self.args.student_steps.split(",")]:
            k = min(students, key=lambda k: (abs(k - steps), -k))
            g = load_generator(students[k][0], steps=steps)
            self.record(name, steps, g, k, students[k][1])

    def record(self, name, steps, sample, trained_for=0, cpu=None) -> None:
        """Scores ``sample`` (z, y -> images) on the fixed noise, and times it against the teacher."""
        from stillroom.plugins.diffusion.metrics import evaluate_images

        images = generate(sample, self.noise, self.labels)
        metrics = evaluate_images(images, self.labels, self.classifier)
        b = self.args.latency_batch
        per_image, speedup = latency(sample, self.reference, self.noise[:b], self.labels[:b])
        grid = self.out / f"{name}-{steps}step.png"
        first = images.view(10, self.args.per_class, *images.shape[1:])[:, :8]  # 8 samples of each digit
        save_grid(first.reshape(-1, *images.shape[1:]), grid, 8)
        row = {"teacher": self.name, "model": name, "steps": steps, "trained_for": trained_for or None}
        row.update(train_cpu_minutes=cpu, **metrics, ms_per_image=per_image * 1e3, speedup=speedup)
        row["grid"] = str(grid)
        self.rows.append(row)
        print(
            f"{self.name:<8}{name:<14}{steps:>6}{(trained_for or '-'):>8}"
            f"{('-' if cpu is None else f'{cpu:.1f}'):>8}{metrics['fid_like']:>10.2f}"
            f"{metrics['class_accuracy']:>9.3f}{metrics['diversity']:>10.3f}{metrics['recall']:>8.3f}"
            f"{per_image * 1e3:>10.2f}",
            flush=True,
        )


def markdown(rows: list[dict], args) -> str:
    """The table as markdown, with the command line that produced it."""
    lines = [
        "FID-like = Frechet distance on the shipped MNIST classifier's features (NOT Inception FID);",
        f"{args.per_class} samples per class, each teacher with its card's CFG (students have it baked in);",
        "ms/image and speedup over the teacher at its most steps: torch, one CPU thread, batch "
        f"{args.latency_batch}, medians of 3 interleaved (teacher, row) pairs; train CPU min = the student's",
        "training CPU time (a retargeted row shares its student's).",
        "",
        "| teacher | model | steps | student trained for | train CPU min | FID-like | class acc. | diversity "
        "| recall | ms/image | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = "-" if r["train_cpu_minutes"] is None else f"{r['train_cpu_minutes']:.1f}"
        lines.append(
            f"| {r['teacher']} | {r['model']} | {r['steps']} | {r['trained_for'] or '-'} | {cpu} | "
            f"{r['fid_like']:.2f} | {r['class_accuracy']:.3f} | {r['diversity']:.3f} | {r['recall']:.3f} | "
            f"{r['ms_per_image']:.1f} | {r['speedup']:.1f}x |"
        )
    lines += ["", "    " + shlex.join(["python", *sys.argv]), ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """FID-like against sampling steps, one panel per teacher, one line per model (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    fig, axes = plt.subplots(1, len(teachers), figsize=(6 * len(teachers), 4.5), squeeze=False)
    for ax, name in zip(axes[0], teachers, strict=True):
        mine = [r for r in rows if r["teacher"] == name]
        for model in dict.fromkeys(r["model"] for r in mine):
            pts = sorted((r["steps"], r["fid_like"]) for r in mine if r["model"] == model)
            style = {"color": "black", "linewidth": 2.5} if model == "teacher" else {"marker": "o"}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=model, **style)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="sampling steps (a CFG teacher makes 2 network calls per step)",
            ylabel="FID-like",
        )
        ax.set_title(f"{name} teacher")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
