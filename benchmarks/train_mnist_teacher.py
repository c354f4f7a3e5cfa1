"""Train the embedded class-conditional MNIST DDPM teacher (``stillroom/data/mnist_teacher``).

Why: diffusion-distillation methods need a real diffusion teacher, and no model hub is reachable.
This trains a small diffusers ``UNet2DModel`` (epsilon prediction, 1000-step cosine DDPM schedule)
on the shipped 4000-image MNIST train split in a CPU budget of ~15 minutes, then measures its
quality with DDIM at 50/25/10 steps and classifier-free guidance (CFG), and writes

    OUT/unet/                 UNet2DModel.save_pretrained (safetensors; EMA weights)
    OUT/scheduler/            DDPMScheduler.save_pretrained (DDIMScheduler.from_config works on it)
    OUT/samples.png           10x10 grid, one row per class, 50 DDIM steps with CFG
    OUT/training.json         machine-readable record: config, steps, wall time, quality table
    OUT/TRAINING.md           the same for humans

Design choices, and why:
- Class conditioning through ``num_class_embeds=11``: labels 0-9 are digits, label 10 is the
  "null" class. Training replaces the label by 10 with probability ``--label-dropout`` so the same
  network gives the unconditional prediction, which CFG needs (Ho & Salimans 2022):
  eps = eps(x, null) + w * (eps(x, y) - eps(x, null)); w = 1 is plain conditional sampling.
- Cosine ("squaredcos_cap_v2") betas: at 28x28 the linear schedule wastes its last few hundred
  steps on pure noise (Nichol & Dhariwal 2021). ``timestep_spacing="trailing"`` makes few-step
  DDIM start at t=999 (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed"), which matters for the 10-step and distilled samplers.
- Budget by time: the first ``--probe-steps`` steps are timed and the total step count is then
  fixed, so the LR schedule (warmup + cosine) ends exactly at the end of the budget. The default
  clock is this process's CPU time (``--clock cpu``), so "15 minutes at 1 thread" means the same
  amount of training on a shared, busy machine as on an idle one; ``--clock wall`` uses elapsed
  time. Pass ``--steps N`` to pin the count (TRAINING.md records N for an exact rerun).
- Guidance: the recommended w is the first ``--cfg`` value (1.25). In a 15-minute budget the
  null-class branch sees only ~12% of the samples, and larger w (2.0) amplifies its errors along
  many-step DDIM trajectories (fine at 10 steps, worse at 50); TRAINING.md shows both.
- EMA of the weights (decay warmed up as min(d, (1+n)/(10+n))) is what gets saved: with a short run
  EMA samples are visibly cleaner than the raw weights.

    python benchmarks/train_mnist_teacher.py --minutes 15 --threads 1
    python benchmarks/train_mnist_teacher.py --eval-only          # re-measure an existing teacher
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from stillroom.plugins.diffusion.metrics import (
    evaluate_images,
    extract,
    fid_like,
    load_classifier,
    load_mnist_split,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "stillroom" / "data" / "mnist_teacher"
NULL_CLASS = 10


def unet_config(channels: tuple[int, int, int] = (16, 32, 64)) -> dict:
    """The teacher architecture: 28 -> 14 -> 7, self-attention only at 7x7 (~0.7M parameters).

    Narrow at 28x28 on purpose: on CPU the full-resolution convolutions dominate the step time, and
    (16, 32, 64) trains ~2.2x more samples per CPU-second than (32, 64, 64); in a fixed budget the
    number of samples seen matters more than width for MNIST.
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


def scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        timestep_spacing="trailing",
        clip_sample=True,
        clip_sample_range=1.0,
    )


@torch.no_grad()
def sample_ddim(
    unet,
    scheduler_config_dict,
    labels: torch.Tensor,
    steps: int,
    guidance: float,
    generator: torch.Generator,
    batch_size: int = 500,
) -> torch.Tensor:
    """DDIM (eta=0) sampling with classifier-free guidance; returns images [N, 1, 28, 28] in [-1, 1].

    Conditional and null-class predictions run in one batch of 2B.
    """
    from diffusers import DDIMScheduler

    unet.eval()
    out = []
    for i in range(0, len(labels), batch_size):
        y = labels[i : i + batch_size]
        sched = DDIMScheduler.from_config(scheduler_config_dict)
        sched.set_timesteps(steps)
        x = torch.randn(len(y), 1, 28, 28, generator=generator)
        y2 = torch.cat([y, torch.full_like(y, NULL_CLASS)])
        for t in sched.timesteps:
            eps = unet(torch.cat([x, x]), t, class_labels=y2).sample
            eps_c, eps_u = eps.chunk(2)
            x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


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


def train(args) -> dict:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_mnist_split("train")
    unet = UNet2DModel(**unet_config(args.channels))
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_sched = DDPMScheduler(**scheduler_config())
    abar = noise_sched.alphas_cumprod.float()
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
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(y),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t, class_labels=y).sample, noise)
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
    noise_sched.save_pretrained(out / "scheduler")
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
        "command": f"python benchmarks/train_mnist_teacher.py --steps {step} --batch-size {args.batch_size} "
        f"--lr {args.lr} --warmup {args.warmup} --label-dropout {args.label_dropout} --ema {args.ema} "
        f"--channels {','.join(map(str, args.channels))} "
        f"--threads {args.threads} --seed {args.seed}",
    }


def evaluate(args) -> dict:
    """Quality for each (CFG scale, DDIM step count): ``--per-class`` samples per class, the same
    initial noise for every row, so rows differ only in the sampler settings."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(args.out, subfolder="unet").eval()
    sched_cfg = DDPMScheduler.from_pretrained(args.out, subfolder="scheduler").config
    clf = load_classifier()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    rows = []
    grid = None
    for w in args.cfg:
        for steps in args.eval_steps:
            t0 = time.time()
            imgs = sample_ddim(unet, sched_cfg, labels, steps, w, torch.Generator().manual_seed(1234))
            m = evaluate_images(imgs, labels, clf)
            rows.append(
                {
                    "sampler": f"DDIM {steps} steps",
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

    # Floor for reference: real train images (same count, 50 per class) scored against eval.
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


def write_report(out: Path, record: dict) -> None:
    tr, ev = record["training"], record["quality"]
    lines = [
        "# MNIST teacher: class-conditional DDPM",
        "",
        "Written by `benchmarks/train_mnist_teacher.py` (do not edit by hand; rerun the script).",
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
        f"- `DDPMScheduler`: `{json.dumps(record['scheduler_config'])}`",
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
        f"{ev['num_samples']} samples ({ev['per_class']} per class), DDIM (eta 0, "
        f"`DDIMScheduler.from_config` of the saved scheduler, trailing timesteps), "
        "classifier-free guidance (eps = eps_null + w (eps_y - eps_null)); **recommended w = "
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--minutes", type=float, default=15.0, help="training wall-time budget (ignored with --steps)"
    )
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
        default=[1.25, 2.0],
        help="CFG scales w for the quality table; the first is the recommended one",
    )
    ap.add_argument("--per-class", type=int, default=50, help="samples per class for the quality table")
    ap.add_argument("--eval-steps", type=lambda s: [int(v) for v in s.split(",")], default=[50, 25, 10])
    ap.add_argument("--eval-only", action="store_true", help="skip training; re-measure the teacher in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    record_path = args.out / "training.json"
    if args.eval_only:
        record = json.loads(record_path.read_text())
        record["eval_invocation"] = "python benchmarks/train_mnist_teacher.py " + " ".join(sys.argv[1:])
    else:
        record = {
            "invocation": "python benchmarks/train_mnist_teacher.py " + " ".join(sys.argv[1:]),
            "unet_config": unet_config(args.channels),
            "scheduler_config": scheduler_config(),
            "machine": f"{platform.machine()}, torch {torch.__version__}",
            "training": train(args),
        }
    record["quality"] = evaluate(args)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    write_report(args.out, record)
    print((args.out / "TRAINING.md").read_text())


if __name__ == "__main__":
    main()
