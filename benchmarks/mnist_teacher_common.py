"""What the two embedded MNIST teacher scripts share: architecture, training loop, quality table, card.

``train_mnist_teacher.py`` (DDPM, epsilon prediction) and ``train_mnist_flow_teacher.py`` (rectified
flow, velocity prediction) differ only in their noising objective, their diffusers scheduler and the
scheduler class that samples; everything else (the UNet, class conditioning with a null class for
classifier-free guidance, the guided sampling loop, the CPU-time budget, EMA, the quality table and
``TRAINING.md``) lives here.

Budget by time: the first ``--probe-steps`` steps are timed and the total step count is then fixed,
so the LR schedule (warmup + cosine) ends exactly at the end of the budget. The default clock is this
process's CPU time (``--clock cpu``), so "15 minutes at 1 thread" means the same amount of training on
a shared, busy machine as on an idle one; ``--clock wall`` uses elapsed time. ``--steps N`` pins the
count (TRAINING.md records N for an exact rerun). EMA of the weights (decay warmed up as
min(d, (1+n)/(10+n))) is what gets saved.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stillroom.plugins.diffusion.metrics import (
    evaluate_images,
    extract,
    fid_like,
    load_classifier,
    load_mnist_split,
)

NULL_CLASS = 10

# loss(unet, x0 [B,1,28,28], labels [B], generator) -> scalar training loss
Objective = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def unet_config(channels: tuple[int, int, int] = (16, 32, 64)) -> dict:
    """The teacher architecture: 28 -> 14 -> 7, self-attention only at 7x7 (~0.7M parameters).

    Narrow at 28x28 on purpose: on CPU the full-resolution convolutions dominate the step time, and
    (16, 32, 64) trains ~2.2x more samples per CPU-second than (32, 64, 64); in a fixed budget the
    number of samples seen matters more than width for MNIST. Labels 0-9 are digits and label 10
    is the null class (``num_class_embeds=11``) that classifier-free guidance needs.
    """
    return dict(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        norm_num_groups=8,
        num_class_embeds=NULL_CLASS + 1,
    )


def add_arguments(ap: argparse.ArgumentParser, default_out: Path, default_cfg: list[float]) -> None:
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--minutes", type=float, default=15.0, help="training time budget (ignored with --steps)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="what --minutes measures")
    ap.add_argument("--steps", type=int, default=None, help="fixed number of training steps")
    ap.add_argument("--probe-steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--label-dropout", type=float, default=0.12)
    ap.add_argument("--ema", type=float, default=0.997)
    ap.add_argument("--channels", type=lambda s: tuple(int(v) for v in s.split(",")), default=(16, 32, 64))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cfg",
        type=lambda s: [float(v) for v in s.split(",")],
        default=default_cfg,
        help="CFG scales w for the quality table; the first is the recommended one",
    )
    ap.add_argument("--per-class", type=int, default=50, help="samples per class for the quality table")
    ap.add_argument("--eval-steps", type=lambda s: [int(v) for v in s.split(",")], default=[50, 25, 10])
    ap.add_argument("--eval-only", action="store_true", help="skip training; re-measure the teacher in --out")
    ap.add_argument("--report-only", action="store_true", help="only rewrite TRAINING.md from training.json")


def save_grid(images: torch.Tensor, rows: int, path: Path) -> None:
    """Save [rows*cols, 1, 28, 28] images in [-1, 1] as one PNG grid (2 px gaps)."""
    from PIL import Image

    cols = len(images) // rows
    pad = 2
    canvas = np.zeros((rows * (28 + pad) + pad, cols * (28 + pad) + pad), dtype=np.uint8)
    pix = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        canvas[
            pad + r * (28 + pad) : pad + r * (28 + pad) + 28, pad + c * (28 + pad) : pad + c * (28 + pad) + 28
        ] = pix[k]
    Image.fromarray(canvas).save(path, optimize=True)


def train(args, objective: Objective, scheduler, script: str) -> dict:
    """Train the class-conditional UNet on ``objective`` (label dropout to the null class), save the
    EMA weights and ``scheduler`` under ``args.out``; returns the training record."""
    from diffusers import UNet2DModel

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_mnist_split("train")
    unet = UNet2DModel(**unet_config(args.channels))
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DModel: {n_params / 1e6:.2f}M parameters", flush=True)

    total = args.steps  # None -> decided after the probe

    def lr_at(s: int) -> float:
        """Linear warmup, then cosine from lr to 0.1 lr over the planned steps (flat while probing)."""
        progress = 0.0 if total is None else min(1.0, s / total)
        return args.lr * min(1.0, (s + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    clock = time.process_time if args.clock == "cpu" else time.time
    t0, c0, cpu0 = time.time(), clock(), time.process_time()
    step, losses = 0, []
    while total is None or step < total:
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < args.label_dropout] = NULL_CLASS
        loss = objective(unet, x0, y, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        step += 1
        losses.append(loss.item())
        if total is None and step == args.probe_steps:
            per_step = (clock() - c0) / step
            total = max(step, int(args.minutes * 60 / per_step))
            print(
                f"probe: {per_step:.3f} {args.clock}-s/step -> {total} steps in {args.minutes} min",
                flush=True,
            )
        if step % 50 == 0:
            print(
                f"step {step:5d}/{total} loss {np.mean(losses[-50:]):.4f} lr {lr_at(step):.2e} "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
    wall = time.time() - t0
    cpu = time.process_time() - cpu0

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    return {
        "steps": step,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "label_dropout": args.label_dropout,
        "ema_decay": args.ema,
        "seed": args.seed,
        "threads": args.threads,
        "parameters": n_params,
        "budget": f"{args.minutes} min of {args.clock} time" if args.steps is None else f"{args.steps} steps",
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "seconds_per_step": round(wall / step, 3),
        "final_loss_mean_last_100": round(float(np.mean(losses[-100:])), 4),
        "command": f"python benchmarks/{script} --steps {step} --batch-size {args.batch_size} "
        f"--lr {args.lr} --warmup {args.warmup} --label-dropout {args.label_dropout} --ema {args.ema} "
        f"--channels {','.join(map(str, args.channels))} "
        f"--threads {args.threads} --seed {args.seed}",
    }


@torch.no_grad()
def sample_cfg(
    unet, sampler_class: str, scheduler_config, labels, steps, guidance, generator, batch_size=500
) -> torch.Tensor:
    """Classifier-free guided sampling with the diffusers scheduler ``sampler_class`` built from the
    teacher's saved scheduler config (DDIM eta=0 for the DDPM teacher, Euler for the flow teacher): the
    model output is guided as out_null + w (out_y - out_null), the conditional and null-class calls
    running in one batch of 2B. Returns images [N, 1, 28, 28] in [-1, 1]."""
    import diffusers

    out = []
    for i in range(0, len(labels), batch_size):
        y = labels[i : i + batch_size]
        sched = getattr(diffusers, sampler_class).from_config(scheduler_config)
        sched.set_timesteps(steps)
        x = torch.randn(len(y), 1, 28, 28, generator=generator)
        y2 = torch.cat([y, torch.full_like(y, NULL_CLASS)])
        for t in sched.timesteps:
            o_c, o_u = unet(torch.cat([x, x]), t.expand(2 * len(y)), class_labels=y2).sample.chunk(2)
            x = sched.step(o_u + guidance * (o_c - o_u), t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def evaluate(args, sampler_class: str, sampler_name: str) -> dict:
    """Quality for each (CFG scale, step count): ``--per-class`` samples per class, the same initial
    noise for every row, so rows differ only in the sampler settings."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(args.out, subfolder="unet").eval()
    sched_cfg = json.loads((args.out / "scheduler" / "scheduler_config.json").read_text())
    clf = load_classifier()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    rows = []
    grid = None
    for w in args.cfg:
        for steps in args.eval_steps:
            t0 = time.time()
            with torch.no_grad():
                gen = torch.Generator().manual_seed(1234)
                imgs = sample_cfg(unet.eval(), sampler_class, sched_cfg, labels, steps, w, gen)
            m = evaluate_images(imgs, labels, clf)
            rows.append(
                {
                    "sampler": f"{sampler_name} {steps} steps",
                    "steps": steps,
                    "cfg": w,
                    **{k: round(v, 4) for k, v in m.items()},
                    "seconds": round(time.time() - t0, 1),
                }
            )
            print(rows[-1], flush=True)
            if grid is None:  # the first row (recommended w, most steps) makes the sample grid
                grid = imgs.view(10, args.per_class, 1, 28, 28)[:, :10].reshape(-1, 1, 28, 28)
    save_grid(grid, 10, args.out / "samples.png")

    # Floor for reference: real train images (same count, per class) scored against eval.
    train_x, train_y = load_mnist_split("train")
    pick = torch.cat([torch.nonzero(train_y == c)[: args.per_class, 0] for c in range(10)])
    real = evaluate_images(train_x[pick], train_y[pick], clf)
    rows.append(
        {
            "sampler": "real train images (reference)",
            "steps": 0,
            "cfg": None,
            **{k: round(v, 4) for k, v in real.items()},
            "seconds": 0.0,
        }
    )
    feats, _ = extract(clf, train_x[pick])
    assert abs(fid_like(feats, feats)) < 1e-6
    return {"per_class": args.per_class, "num_samples": len(labels), "cfg": args.cfg[0], "rows": rows}


def write_report(out: Path, record: dict, script: str, card: dict) -> None:
    """``TRAINING.md``; ``card``: title, scheduler_name, objective (what the UNet learns), sampling (how
    the quality rows were sampled)."""
    tr, ev = record["training"], record["quality"]
    title, scheduler_name, sampling = card["title"], card["scheduler_name"], card["sampling"]
    lines = [
        f"# MNIST teacher: {title}",
        "",
        f"Written by `benchmarks/{script}` (do not edit by hand; rerun the script).",
        "",
        "## Command",
        "",
        "```",
        record["invocation"],
        "```",
        "",
        f"Exact rerun of this training (same steps, same seeds): `{tr['command']}`",
        *(
            ["", f"Quality table below re-measured with `{record['eval_invocation']}`."]
            if "eval_invocation" in record
            else []
        ),
        "",
        "## Configuration",
        "",
        f"- `UNet2DModel`: `{json.dumps(record['unet_config'])}` ({tr['parameters'] / 1e6:.2f}M parameters)",
        f"- `{scheduler_name}`: `{json.dumps(record['scheduler_config'])}`",
        f"- Objective: {card['objective']}",
        "- Data: shipped MNIST train split (4000 images, `stillroom/data/mnist/mnist.npz`), "
        "pixels in [-1, 1]",
        f"- Labels 0-9 digits, {NULL_CLASS} = null class; label dropout {tr['label_dropout']} (for CFG)",
        f"- AdamW (wd 1e-4), lr {tr['lr']}, {tr['warmup']}-step warmup then cosine to 10%, grad-clip 1.0, "
        f"batch {tr['batch_size']}, EMA {tr['ema_decay']} (saved weights are the EMA)",
        f"- Steps: {tr['steps']} (budget: {tr['budget']}); wall time {tr['wall_seconds']} s "
        f"({tr['seconds_per_step']} s/step), process CPU time {tr['cpu_seconds']} s, "
        f"{tr['threads']} CPU thread(s), {record['machine']}",
        f"- Final training loss (mean of last 100 steps): {tr['final_loss_mean_last_100']}",
        "",
        "## Quality",
        "",
        f"{ev['num_samples']} samples ({ev['per_class']} per class), {sampling}; **recommended w = "
        f"{ev['cfg']}** (the first one listed, used for `samples.png`). Same initial noise for every "
        "row. Metrics from `stillroom.plugins.diffusion.metrics.evaluate_images` against the "
        "1000-image eval split: `fid_like` is a "
        "Fréchet distance in the shipped MNIST classifier's 128-d feature space (**not Inception FID**; "
        "lower is better), `class_accuracy` = classifier agrees with the requested class, `diversity` = "
        "within-class feature spread relative to real eval digits (1 = as varied as real), "
        "`recall` = per-class k-NN recall (k=3).",
        "",
        "| sampler | CFG w | fid_like | class_accuracy | diversity | recall | sampling time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ev["rows"]:
        w = "-" if r["cfg"] is None else r["cfg"]
        lines.append(
            f"| {r['sampler']} | {w} | {r['fid_like']:.2f} | {r['class_accuracy']:.3f} "
            f"| {r['diversity']:.3f} | {r['recall']:.3f} | {r['seconds']} |"
        )
    lines += [
        "",
        "`samples.png`: one row per class (0-9), first 10 samples of the first row of the table.",
        "",
        "The reference row scores real digits the same way; its `fid_like` is the floor at this sample "
        "count (not 0: two finite samples of one distribution differ).",
        "",
    ]
    (out / "TRAINING.md").write_text("\n".join(lines))


def run(
    doc: str,
    script: str,
    default_out: Path,
    default_cfg: list[float],
    objective: Objective,
    make_scheduler: Callable[[], object],
    sampler_class: str,
    card: dict,
) -> None:
    """The command line both scripts share. ``card``: ``write_report``'s, plus sampler_name."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, default_out, default_cfg)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    record_path = args.out / "training.json"
    if args.report_only:
        write_report(args.out, json.loads(record_path.read_text()), script, card)
        return
    invocation = f"python benchmarks/{script} " + " ".join(sys.argv[1:])
    if args.eval_only:
        record = json.loads(record_path.read_text())
        record["eval_invocation"] = invocation
    else:
        scheduler = make_scheduler()
        record = {
            "invocation": invocation,
            "unet_config": unet_config(args.channels),
            "scheduler_config": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
            "machine": f"{platform.machine()}, torch {torch.__version__}",
            "training": train(args, objective, scheduler, script),
        }
    record["quality"] = evaluate(args, sampler_class, card["sampler_name"])
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    write_report(args.out, record, script, card)
    print((args.out / "TRAINING.md").read_text())
