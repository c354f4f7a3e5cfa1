"""Does an exported generator graph draw the same images as the PyTorch sampler? Checks that can fail.

fp32 graphs: on fresh random inputs (noise, class labels / text states, guidance scale) at every batch
size in ``BATCH_SIZES``, ``max |image_ort - image_torch| <= ATOL``. Images live in [-1, 1], where one
8-bit grey level is 2/255; ``ATOL`` is half of that, so no pixel of the exported sampler can land on a
different 8-bit value than PyTorch's, while float32 rounding accumulated over K UNet evaluations of
a real teacher (2.4e-3 measured for the embedded MNIST 4-step student) still passes.

Reduced-precision variants are judged at the image level against the fp32 PyTorch images with the
peak signal-to-noise ratio over the [-1, 1] range, PSNR = 10 log10(2^2 / MSE), which must reach
``VARIANT_MIN_PSNR`` dB; the mean and max absolute differences are reported alongside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from stillroom.core import ort_session

ATOL = 1.0 / 255.0
BATCH_SIZES = (1, 3)
VARIANT_MIN_PSNR = {"fp16": 35.0, "int8": 20.0}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 200.0 if mse < 1e-20 else min(200.0, 10.0 * math.log10(4.0 / mse))  # 200 dB: identical


def compare(
    reference: Callable[[dict[str, np.ndarray]], np.ndarray],
    sess,
    make_inputs: Callable[[int, np.random.Generator], dict[str, np.ndarray]],
    precision: str = "fp32",
    atol: float = ATOL,
    seed: int = 1,
) -> dict[str, Any]:
    """Runs ``reference`` (PyTorch) and the session on the same fresh inputs; returns the numbers."""
    rng = np.random.default_rng(seed)
    worst, mean_sum, count, psnrs = 0.0, 0.0, 0, []
    for batch in BATCH_SIZES:
        feeds = make_inputs(batch, rng)
        ref = reference(feeds)
        try:
            got = ort_session.run(sess, feeds)[0].astype(np.float32)
        except Exception as err:  # noqa: BLE001 - a graph that cannot run these inputs fails validation
            return {
                "passed": False,
                "max_abs_diff": None,
                "tolerance": atol,
                "error": f"batch {batch}: {' '.join(str(err).split())[:200]}",
            }
        if got.shape != ref.shape:
            return {
                "passed": False,
                "max_abs_diff": None,
                "tolerance": atol,
                "error": f"shape {list(got.shape)} != {list(ref.shape)} at batch {batch}",
            }
        diff = np.abs(got - ref)
        worst = max(worst, float(diff.max()))
        mean_sum, count = mean_sum + float(diff.sum()), count + diff.size
        psnrs.append(psnr(got, ref))
    result: dict[str, Any] = {
        "precision": precision,
        "batch_sizes": list(BATCH_SIZES),
        "max_abs_diff": worst,
        "mean_abs_diff": mean_sum / count,
        "psnr_db": min(psnrs),
    }
    if precision == "fp32":
        result.update(
            {
                "tolerance": atol,
                "passed": worst <= atol,
                "criteria": "max |ort - torch| <= tolerance on fresh inputs",
            }
        )
    else:
        need = VARIANT_MIN_PSNR[precision]
        result.update(
            {
                "thresholds": {"min_psnr_db": need},
                "passed": min(psnrs) >= need,
                "criteria": "PSNR of variant images vs fp32 PyTorch images >= threshold",
            }
        )
    return result
