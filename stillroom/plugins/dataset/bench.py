"""``stillroom bench DATASET``: fresh ConvNets trained on a distilled dataset, beside the same protocol
on the full real training split and on a random real subset at the same IPC.

The protocol (``convnet.Protocol``: seeds, epochs, width, DSA strategy) is the one in the dataset's card,
so a bench answers the question the recipe asked. Every (data, protocol, epochs, seed) accuracy is
cached as JSON under ``$STILLROOM_CACHE/dataset/eval/`` (keyed by the data's sha256 and the protocol),
so repeated benches, and the bench right after ``stillroom run`` evaluated the card, retrain nothing;
the full-data and random baselines are shared by every dataset of the same source and protocol.
A method's transfer evaluations in the card (``evaluation`` entries that are tables of rows, e.g.
ssl_dd's linear probe and fine-tuning) are carried into the report as ``transfer``, as measured.
The report is report.json, report.md and report.html (written last) in ``out``.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.core.fsio import write_json, write_text
from stillroom.plugins.dataset import artifact
from stillroom.plugins.dataset.convnet import Protocol, train_and_evaluate
from stillroom.plugins.dataset.data import Real, load, per_class_sample
from stillroom.plugins.dataset.experts import cache_root

log = logging.getLogger(__name__)


def scores(
    images: np.ndarray,
    labels: np.ndarray,
    ident: str,
    real: Real,
    protocol: Protocol,
    epochs: int,
    seeds: list[int] | None = None,
) -> tuple[list[float], float]:
    """Accuracies of fresh ConvNets (seeds ``seeds``, default 0 .. protocol.seeds - 1) trained on
    (images, labels) for ``epochs``, and the CPU seconds spent (0 for cached seeds). ``ident`` names
    the data in the cache key."""
    test_x, test_y = real.eval_images, real.eval_labels
    if protocol.eval_images:
        test_x, test_y = test_x[: protocol.eval_images], test_y[: protocol.eval_images]
    setting = {**protocol.model_dump(exclude={"seeds", "epochs", "full_epochs"}), "epochs": epochs}
    accuracies, spent = [], 0.0
    for seed in range(protocol.seeds) if seeds is None else seeds:
        blob = json.dumps({"data": ident, "eval": real.sha256, "seed": seed, **setting}, sort_keys=True)
        path = cache_root() / "eval" / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json"
        if path.is_file():
            accuracies.append(json.loads(path.read_text(encoding="utf-8"))["accuracy"])
            continue
        started = time.process_time()
        acc = train_and_evaluate(images, labels, test_x, test_y, protocol, seed, epochs, real.classes)
        spent += time.process_time() - started
        write_json(path, {"accuracy": acc, "setting": json.loads(blob)})
        accuracies.append(acc)
    return accuracies, spent


def figures(accuracies: list[float]) -> dict[str, Any]:
    a = np.asarray(accuracies, dtype=np.float64)
    return {"accuracy": float(a.mean()), "accuracy_std": float(a.std()), "accuracies": accuracies}


def baselines(real: Real, protocol: Protocol, ipc: int) -> dict[str, dict[str, Any]]:
    """The full training split and a random real subset of ``ipc`` images per class (draw s trained
    once, with network seed s, for s in 0 .. seeds - 1), scored like the dataset."""
    full, full_cpu = scores(
        real.train_images, real.train_labels, f"{real.sha256}:full", real, protocol, protocol.full_epochs
    )
    randoms, random_cpu = [], 0.0
    for seed in range(protocol.seeds):
        pick = per_class_sample(real.train_labels, ipc, seed, real.classes)
        ident = f"{real.sha256}:random:ipc{ipc}:draw{seed}"
        x, y = real.train_images[pick], real.train_labels[pick]
        acc, cpu = scores(x, y, ident, real, protocol, protocol.epochs, seeds=[seed])
        randoms += acc
        random_cpu += cpu
    return {
        "full": {**figures(full), "images": len(real.train_labels), "cpu_s": full_cpu},
        "random": {**figures(randoms), "images": ipc * real.classes, "cpu_s": random_cpu},
    }


def run(path: Path, out: Path) -> dict[str, Any]:
    """Benchmarks the dataset folder ``path`` and writes the report into ``out``."""
    images, labels, card = artifact.read(path)
    real = load(card["source"]["id"])
    if real.sha256 != card["source"]["sha256"]:
        log.warning("the source '%s' changed since the dataset was distilled", card["source"]["id"])
    protocol = Protocol.model_validate(card["protocol"])
    own, cpu = scores(images, labels, card["data_sha256"], real, protocol, protocol.epochs)
    rows = {"distilled": {**figures(own), "images": len(labels), "cpu_s": cpu}}
    rows.update(baselines(real, protocol, int(card["ipc"])))
    report = {
        "kind": artifact.KIND,
        "dataset": str(Path(path).resolve()),
        "method": card["method"],
        "ipc": card["ipc"],
        "distill_cpu_minutes": card.get("cpu_minutes"),
        "protocol": protocol.model_dump(),
        "rows": rows,
        "transfer": {name: v for name, v in card.get("evaluation", {}).items() if isinstance(v, dict)},
    }
    out = Path(out)
    write_json(out / "report.json", report)
    table = markdown(report)
    write_text(out / "report.md", table)
    write_text(out / "report.html", f"<!doctype html><meta charset=utf-8><pre>{html.escape(table)}</pre>\n")
    log.info("dataset %s (%s, IPC %s):\n%s", path, card["method"], card["ipc"], table)
    return report


def markdown(report: dict[str, Any]) -> str:
    p = report["protocol"]
    lines = [
        f"ConvNet-{p['depth']} (width {p['width']}, DSA '{p['augment']}'), {p['seeds']} seeds, "
        f"{p['epochs']} epochs ({p['full_epochs']} on the full split)",
        "",
        "| data | images | accuracy (mean +- std) | eval CPU s |",
        "|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        lines.append(
            f"| {name} | {row['images']} | {100 * row['accuracy']:.2f} +- {100 * row['accuracy_std']:.2f} "
            f"| {row['cpu_s']:.0f} |"
        )
    for name, rows in report["transfer"].items():
        lines += ["", f"{name} (the card's: ConvNets pretrained on each row's data)", ""]
        lines += ["| pretrained on | accuracy (mean +- std) |", "|---|---|"]
        for row, f in rows.items():
            lines.append(f"| {row} | {100 * f['accuracy']:.2f} +- {100 * f['accuracy_std']:.2f} |")
    return "\n".join(lines) + "\n"
