"""Which real images should ``rethink_pca`` keep? Its selection rules against plain random draws.

Takes a finished rethink_pca run (``stillroom run mnist-dd-rethink_pca-ipc10``), scores every real
training image with the run's scoring ConvNet (its last checkpoint), d_i = CE(f(x_i), y_i), and per rule
draws ``--ipc`` images per class with draws 0, 1, 2, each trained once with network seed = draw (as the
bench's random baseline) under the run's evaluation protocol. Rules (``--rules``):

- ``easyK``: uniform from the easiest K % of each class (the method; its recipes use K = 50);
- ``all``: uniform from the whole class (a random real subset, drawn from this script's RNG stream);
- ``strataK``: one image from each of ``ipc`` equal-size difficulty bins of the easiest K %;

and a ``xF`` suffix (e.g. ``easy50x2``) adds Combine: F x F images per stored image, downscaled.
Accuracies are cached like the bench's, so a re-run only trains what is new:

    STILLROOM_CACHE=... python benchmarks/rethink_pca_selection.py RUN --ipc 10 \\
        --rules easy50 all easy80 strata100 strata80 easy50x2
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from stillroom.plugins.dataset import bench
from stillroom.plugins.dataset.convnet import Protocol
from stillroom.plugins.dataset.data import load
from stillroom.plugins.dataset.experts import network
from stillroom.plugins.dataset.methods.rethink_pca import combine, difficulty


def pick(rule: str, order: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices from one class's members ``order`` (easiest first) by ``rule``."""
    if rule == "all":
        return rng.choice(order, count, replace=False)
    match = re.fullmatch(r"(easy|strata)(\d+)", rule)
    if not match:
        raise SystemExit(f"unknown rule {rule!r}: use easyK, all or strataK (K in %), optionally with xF")
    kept = order[: int(round(int(match[2]) / 100 * len(order)))]
    if match[1] == "easy":
        return rng.choice(kept, count, replace=False)
    return np.array([rng.choice(b) for b in np.array_split(kept, count)])


def subset(name, d, images, labels, ipc, draw) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``draw`` of rule ``name`` (``rule`` or ``rulexF``): ``ipc`` stored images per class."""
    rule, _, factor = name.partition("x")
    factor, rng, chosen = int(factor or 1), np.random.default_rng(draw), []
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        chosen.append(pick(rule, members[np.argsort(d[members], kind="stable")], ipc * factor**2, rng))
    combined = combine(torch.from_numpy(images[np.concatenate(chosen)]), factor).numpy()
    return combined, np.repeat(np.arange(len(chosen), dtype=np.int64), ipc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished rethink_pca run folder")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--rules", nargs="+", default=["easy50", "all", "easy80", "strata100", "strata80"])
    args = parser.parse_args()
    card = json.loads((args.run / "student" / "card.json").read_text(encoding="utf-8"))
    real, protocol = load(card["source"]["id"]), Protocol.model_validate(card["protocol"])
    last = sorted((args.run / "checkpoints").glob("step-*"))[-1]
    scorer = network(real, card["params"]["scorer_width"], 3)
    scorer.load_state_dict(load_file(last / "student.safetensors"))
    scorer.eval()
    d = difficulty(scorer, torch.from_numpy(real.train_images), torch.from_numpy(real.train_labels)).numpy()
    print(f"scorer {last}; protocol width {protocol.width}, {protocol.epochs} epochs; IPC {args.ipc}")
    print("| rule | draws 0, 1, 2 % | mean +- std % |\n|---|---|---|")
    for name in args.rules:
        accuracies = []
        for draw in range(3):
            images, labels = subset(name, d, real.train_images, real.train_labels, args.ipc, draw)
            ident = f"pca-sweep:{name}:ipc{args.ipc}:draw{draw}"
            accuracies += bench.scores(images, labels, ident, real, protocol, protocol.epochs, [draw])[0]
        a = 100 * np.asarray(accuracies)
        cells = ", ".join(f"{x:.1f}" for x in a)
        print(f"| {name} | {cells} | {a.mean():.2f} +- {a.std():.2f} |", flush=True)


if __name__ == "__main__":
    main()
