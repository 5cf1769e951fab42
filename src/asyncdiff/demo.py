"""The first thing to run: the trained digits model on one process and on two, side by side.

``asyncdiff demo`` generates a batch of digits with the DDIM model trained here (weights ship
with the package), once sequentially and once split over two processes with stale inputs after
warm-up, saves both grids in one picture (sequential left, parallel right), and prints one JSON
line: the measured speed-up of the denoising loop, how far the parallel digits are from the
sequential ones (PSNR), and what the shipped digit classifier makes of both (how many samples it
reads as the same digit, and its mean confidence).

Example:
    >>> result = demo(devices=2, steps=25, out="digits.png")   # doctest: +SKIP
    >>> sorted(result)[:3]                                     # doctest: +SKIP
    ['confidence_parallel', 'confidence_sequential', 'devices']
"""

from __future__ import annotations

from typing import Any

from asyncdiff.generate import GenerateSpec, run
from asyncdiff.outputs import grid

__all__ = ["demo"]


def demo(devices: int = 2, steps: int = 25, warm_up: int = 2, seed: int = 0, out: str | None = "digits.png") -> dict[str, Any]:
    """Run the digits model sequentially and on ``devices`` processes; save both grids to ``out``."""
    from asyncdiff.fidelity import classify, deviation

    base = GenerateSpec(pipeline="digits", devices=1, steps=steps, seed=seed, out=None,
                        engine={"warm_up": warm_up})
    if devices < 2:
        raise ValueError(f"devices={devices} must be >= 2: the demo compares one process with several")
    sequential = run(base)
    parallel = run(GenerateSpec(**{**base.__dict__, "devices": devices}))
    a, b = sequential["latents"].float(), parallel["latents"].float()
    labels_a, confidence_a = classify(a)
    labels_b, confidence_b = classify(b)
    result = {
        "devices": devices, "steps": steps, "warm_up": warm_up, "samples": a.shape[0],
        "speedup": round(sequential["denoise_s"] / parallel["denoise_s"], 2),
        "sequential_s": sequential["denoise_s"], "parallel_s": parallel["denoise_s"],
        "psnr_db": round(deviation(a, b)["psnr"], 1),
        "same_digit": round(float((labels_a == labels_b).float().mean()), 3),
        "confidence_sequential": round(float(confidence_a.mean()), 3),
        "confidence_parallel": round(float(confidence_b.mean()), 3),
        "plan": parallel.get("plan"), "out": out,
    }
    if out:
        left, right = grid(a, scale=4, gap=4), grid(b, scale=4, gap=4)
        from PIL import Image

        canvas = Image.new(left.mode, (left.width + right.width + 24, left.height), 255)
        canvas.paste(left, (0, 0))
        canvas.paste(right, (left.width + 24, 0))
        canvas.save(out)
    return result
