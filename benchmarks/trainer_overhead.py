"""Trainer overhead: time per step of `stillroom.core.trainer.Trainer` vs a hand-written loop.

Both train the same student (teacher-layers init) with the same KD loss, AdamW, clipping, LR
schedule, batch and data, on CPU. The hand-written loop is the nanoGPT-style minimum: batch,
forward, loss, backward, clip, step. The trainer adds roles, phases, logging to metrics.jsonl,
progress bar, EMA bookkeeping hooks and checkpoint checks. Goal: ratio <= 1.05.

    python benchmarks/trainer_overhead.py [--steps 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_teacher(root: Path, hidden: int, layers: int) -> Path:
    from stillroom.testing import TEXT, build_tiny_llama, build_tokenizer

    teacher = root / "teacher"
    tok = build_tokenizer(teacher, vocab_size=512, text=TEXT * 50)
    build_tiny_llama(teacher, tok, layers=layers, hidden=hidden)
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text(TEXT * 400)
    return teacher, corpus


def recipe(teacher: Path, corpus: Path, steps: int, batch: int, seq: int):
    from stillroom.core import recipe as recipes

    return recipes.validate(
        {
            "method": {"name": "kd", "temperature": 2.0, "kd_ratio": 1.0},
            "teacher": {"path": str(teacher)},
            "student": {"config": {"num_hidden_layers": 2}, "init": "teacher-layers"},
            "data": {"source": str(corpus), "seq_len": seq, "eval_tokens": 2 * seq},
            "train": {
                "steps": steps,
                "batch_size": batch,
                "lr": 1e-3,
                "device": "cpu",
                "tensorboard": False,
                "warmup_steps": 5,
            },
        }
    )


def trainer_step_times(rec, run_dir: Path) -> list[float]:
    from stillroom.core.trainer import Trainer, iter_metrics

    Trainer(rec, run_dir).fit()
    return [m["step_time_s"] for m in iter_metrics(run_dir) if "step_time_s" in m]


def handwritten_step_times(rec) -> list[float]:
    from stillroom.core.trainer import IndexStream, lr_lambda
    from stillroom.plugins.lm import data as textdata
    from stillroom.plugins.lm import models
    from stillroom.plugins.lm.losses import forward_kl

    torch.manual_seed(rec.train.seed)
    teacher, tok = models.load_causal_lm(rec.teacher.path)
    teacher.eval().requires_grad_(False)
    student = models.student_from_teacher_config(teacher, rec.student.config)
    models.init_from_teacher_layers(student, teacher)
    student.train()
    blocks = textdata.TokenBlocks(
        textdata.token_stream(tok, textdata.read_records(textdata.split_files(rec.data.source, "train"))),
        rec.data.seq_len,
    )
    stream = IndexStream(len(blocks), rec.train.seed, 0, 1)
    opt = torch.optim.AdamW(student.parameters(), lr=rec.train.lr, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(rec.train))
    times = []
    for _ in range(rec.train.steps):
        t0 = time.perf_counter()
        ids = torch.stack([blocks[i] for i in stream.next(rec.train.batch_size)])
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        loss = forward_kl(student(input_ids=ids).logits, t_logits, None, 2.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0, foreach=False)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, corpus = build_teacher(root, args.hidden, layers=4)
        rec = recipe(teacher, corpus, args.steps, args.batch, args.seq)
        skip = 5  # warm-up steps excluded from both
        results = {}
        for rnd in range(2):  # alternate to cancel drift in machine load
            results.setdefault("hand-written loop", []).extend(handwritten_step_times(rec)[skip:])
            results.setdefault("stillroom Trainer", []).extend(
                trainer_step_times(rec, root / f"run{rnd}")[skip:]
            )
    base = statistics.median(results["hand-written loop"])
    print(f"{'loop':<20} {'median ms/step':>15} {'mean ms/step':>13} {'ratio':>7}")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:<20} {med * 1e3:>15.2f} {statistics.mean(times) * 1e3:>13.2f} {med / base:>7.3f}")


if __name__ == "__main__":
    main()
