"""The shipped digits model draws digits the shipped classifier recognises, and the metrics mean
something: samples are confident, diverse and close to the real digits in classifier features,
pure noise is far from them (no training here: the weights ship with the package)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asyncdiff.fidelity import as_batch, classify, deviation, digit_metrics
from asyncdiff.generate import GenerateSpec, run
from asyncdiff.models.digits import build_digits, digits_split, load_digits16

SAMPLES = 32
STEPS = 30


@pytest.fixture(scope="module")
def samples() -> torch.Tensor:
    """32 digits sampled sequentially with 30 DDIM steps, ``(32, 1, 16, 16)`` in ``[0, 1]``."""
    pipe = build_digits("trained")
    with torch.no_grad():
        return pipe(batch_size=SAMPLES, num_inference_steps=STEPS, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def metrics(samples: torch.Tensor) -> dict:
    return digit_metrics(samples)


def test_samples_are_confident_and_diverse(metrics: dict) -> None:
    print(f"\nsequential samples: {metrics}")
    assert metrics["count"] == SAMPLES and sum(metrics["histogram"]) == SAMPLES
    assert metrics["confidence"] > 0.8  # chance is 0.1
    assert metrics["classes"] >= 6


def test_frechet_distance_is_far_below_noise(metrics: dict) -> None:
    noise = (0.5 + 0.5 * torch.randn(SAMPLES, 1, 16, 16, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    noise_frechet = digit_metrics(noise)["frechet"]
    print(f"\nFréchet distance: samples {metrics['frechet']:.2f}, Gaussian noise {noise_frechet:.2f}")
    assert metrics["frechet"] < 0.3 * noise_frechet


def test_classifier_is_accurate_on_held_out_digits() -> None:
    images, labels = load_digits16()
    _, test = digits_split(len(images))
    predicted, _ = classify(images[test])
    accuracy = (predicted == labels[test]).float().mean().item()
    print(f"\nclassifier held-out accuracy: {accuracy:.4f} on {len(test)} digits")
    assert accuracy > 0.95


def test_deviation(samples: torch.Tensor) -> None:
    assert deviation(samples, samples) == {"psnr": math.inf, "max_abs": 0.0}
    shifted = samples + 0.1
    result = deviation(samples, shifted)
    assert result["psnr"] == pytest.approx(20.0, abs=1e-6)  # 10 log10(1 / 0.1^2)
    assert result["max_abs"] == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        deviation(samples, samples[:4])


def test_image_layouts_agree(samples: torch.Tensor) -> None:
    channels_last = samples.permute(0, 2, 3, 1).numpy()
    torch.testing.assert_close(as_batch(channels_last), samples, rtol=0, atol=0)
    torch.testing.assert_close(as_batch(samples[:, 0]), samples, rtol=0, atol=0)
    with pytest.raises(ValueError, match="16x16 grey digits"):
        as_batch(np.zeros((2, 3, 16, 16), dtype=np.float32))


def test_unknown_size_names_the_size() -> None:
    with pytest.raises(ValueError, match="size='huge'"):
        build_digits("huge")


def test_generate_writes_a_grid_and_keeps_the_samples(tmp_path) -> None:
    from PIL import Image

    out = tmp_path / "digits.png"
    result = run(GenerateSpec(pipeline="digits", devices=1, steps=20, out=str(out)))
    assert tuple(result["latents"].shape) == (16, 1, 16, 16)  # the batch, as the final sample
    assert 0.0 <= result["latents"].min() and result["latents"].max() <= 1.0
    assert Image.open(out).size == (4 * 16 + 3 * 2,) * 2  # 4 x 4 digits of 16 x 16, 2-pixel gaps
