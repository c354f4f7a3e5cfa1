"""Teacher vs distilled students on the embedded MNIST domain: quality per network evaluation.

Prints one table — the teacher at 50/25/10/4/1 DDIM steps and each method's student at 1/2/4 steps —
with FID-like (classifier features, NOT Inception FID), class accuracy, diversity (1.0 = as varied as
real digits) and wall time per image, and saves a PNG sample grid per row beside the table.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/diffusion_steps.py --out runs/diffusion_steps \
        --train-steps 200 --per-class 30

Students are trained by the shipped recipes (``stillroom/recipes/mnist-*.yaml``) with
``train.steps`` overridden; an existing run directory is reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

METHODS = {
    "progressive": "mnist-progressive",
    "consistency": "mnist-consistency",
    "hypersd": "mnist-hypersd",
    "dmd2": "mnist-dmd2",
    "vsd": "mnist-vsd",
}


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


def timed(fn, noise, labels, batch=250):
    start = time.perf_counter()
    with torch.no_grad():
        out = torch.cat(
            [fn(noise[i : i + batch], labels[i : i + batch]) for i in range(0, len(labels), batch)]
        )
    return out, (time.perf_counter() - start) / len(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/diffusion_steps")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--teacher-steps", default="50,25,10,4,1")
    ap.add_argument("--student-steps", default="1,2,4")
    ap.add_argument("--teacher", default="embedded:mnist_teacher", help="class-conditional 28/32px teacher")
    args = ap.parse_args()

    from stillroom.core import diffusion_models as dm
    from stillroom.core import recipe as recipes
    from stillroom.core.generator import load_generator
    from stillroom.core.image_metrics import evaluate_images, load_classifier
    from stillroom.core.trainer import Trainer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = dm.load_teacher(args.teacher)
    classifier = load_classifier("cpu")
    labels = torch.arange(10).repeat_interleave(args.per_class)
    noise = torch.randn(
        len(labels),
        teacher.channels,
        teacher.image_size,
        teacher.image_size,
        generator=torch.Generator().manual_seed(0),
    )
    rows = []

    def record(name: str, steps: int, images: torch.Tensor, per_image: float) -> None:
        metrics = evaluate_images(images, labels, classifier)
        grid = out / f"{name}-{steps}step.png"
        first = images.view(10, args.per_class, *images.shape[1:])[:, :8]  # 8 samples of each digit
        save_grid(first.reshape(-1, *images.shape[1:]), grid, 8)
        rows.append(
            {"model": name, "steps": steps, **metrics, "ms_per_image": per_image * 1e3, "grid": str(grid)}
        )
        print(
            f"{name:<14}{steps:>6}{metrics['fid_like']:>10.2f}{metrics['class_accuracy']:>9.3f}"
            f"{metrics['diversity']:>10.3f}{metrics['recall']:>8.3f}{per_image * 1e3:>10.2f}",
            flush=True,
        )

    print(f"{'model':<14}{'steps':>6}{'fid_like':>10}{'acc':>9}{'divers.':>10}{'recall':>8}{'ms/img':>10}")
    guidance = 2.0
    for steps in [int(s) for s in args.teacher_steps.split(",")]:

        def sample(z, y, steps=steps):
            cond, uncond = dm.class_cond(y, teacher.null_class)
            return dm.teacher_sample(teacher, z, cond, uncond, steps, guidance)

        images, per = timed(sample, noise, labels)
        record("teacher", steps, images, per)

    for method in args.methods.split(","):
        run_dir = out / "runs" / method
        student = run_dir / "student"
        if not student.is_dir():
            rec = recipes.load(
                METHODS[method],
                [
                    f"train.steps={args.train_steps}",
                    "train.device=cpu",
                    "train.tensorboard=false",
                    "train.log_every=25",
                    f"teacher.path={args.teacher}",
                ],
            )
            started = time.perf_counter()
            Trainer(rec, run_dir).fit()
            print(
                f"# trained {method} for {args.train_steps} steps in {time.perf_counter() - started:.0f}s",
                flush=True,
            )
        for steps in [int(s) for s in args.student_steps.split(",")]:
            g = load_generator(student, steps=steps)
            images, per = timed(lambda z, y, g=g: g(z, y), noise, labels)
            record(method, steps, images, per)
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    print(f"# table: {out / 'table.json'}; grids: {out}/*.png")


if __name__ == "__main__":
    main()
