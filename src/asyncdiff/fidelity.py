"""Quality metrics for the trained digits model (:mod:`asyncdiff.models.digits`).

What stale inputs cost is measured two ways:

- against the data: :func:`digit_metrics` classifies generated digits with the shipped
  classifier (class histogram, mean confidence) and gives the Fréchet distance between the
  classifier's penultimate-layer features of the samples and of all 1797 real digits (an FID
  with a digits classifier in place of Inception);
- against the sequential run: :func:`deviation` gives the PSNR and the largest absolute
  difference between two batches of the same seed.

Images are float batches in ``[0, 1]`` (what the pipeline returns with ``output_type="np"`` or
``"pt"``): a tensor or array shaped ``(N, 1, 16, 16)``, ``(N, 16, 16, 1)`` or ``(N, 16, 16)``,
or a list of PIL images.

Example:
    >>> import torch
    >>> from asyncdiff.models.digits import build_digits
    >>> pipe = build_digits()
    >>> images = pipe(batch_size=32, num_inference_steps=30, output_type="np",
    ...               generator=torch.Generator().manual_seed(0)).images
    >>> metrics = digit_metrics(images)
    >>> metrics["confidence"] > 0.5, metrics["classes"] >= 6
    (True, True)
    >>> deviation(images, images)["psnr"]
    inf
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from asyncdiff.models.digits import ASSETS, RESOLUTION, load_digits16

__all__ = [
    "CLASSIFIER_WEIGHTS",
    "DigitClassifier",
    "as_batch",
    "classify",
    "deviation",
    "digit_features",
    "digit_metrics",
    "frechet_distance",
    "load_classifier",
]

CLASSIFIER_WEIGHTS = ASSETS / "digits_classifier.safetensors"
CLASSES = 10

Images = torch.Tensor | np.ndarray | Sequence[Any]


class DigitClassifier(nn.Module):
    """A small CNN for 16x16 digits in ``[0, 1]``; :meth:`features` is the penultimate layer."""

    def __init__(self, width: int = 32, features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(2 * width * (RESOLUTION // 4) ** 2, features), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(features, CLASSES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2.0 - 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@functools.cache
def load_classifier() -> DigitClassifier:
    """The shipped classifier (``scripts/train_digits.py`` wrote it), in eval mode; loaded once."""
    from safetensors.torch import load_file

    if not CLASSIFIER_WEIGHTS.is_file():
        raise FileNotFoundError(f"{CLASSIFIER_WEIGHTS} is missing; run `python scripts/train_digits.py` to write it")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(CLASSIFIER_WEIGHTS)))
    return model.eval()


def as_batch(images: Images) -> torch.Tensor:
    """``images`` as a float32 ``(N, 1, 16, 16)`` tensor in ``[0, 1]`` (see the module docstring)."""
    if isinstance(images, torch.Tensor):
        batch = images
    elif isinstance(images, np.ndarray):
        batch = torch.from_numpy(images)
    else:
        batch = torch.stack([torch.as_tensor(np.asarray(im, dtype=np.float32) / 255.0) for im in images])
    batch = batch.detach().float().cpu()
    if batch.ndim == 3:
        batch = batch.unsqueeze(1)
    elif batch.ndim == 4 and batch.shape[1] != 1 and batch.shape[-1] == 1:
        batch = batch.permute(0, 3, 1, 2)
    if batch.ndim != 4 or tuple(batch.shape[1:]) != (1, RESOLUTION, RESOLUTION):
        raise ValueError(f"images of shape {tuple(batch.shape)} are not a batch of 16x16 grey digits; "
                         f"pass (N, 1, {RESOLUTION}, {RESOLUTION}) or (N, {RESOLUTION}, {RESOLUTION}, 1) in [0, 1]")
    return batch


def classify(images: Images) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, confidences)``: the predicted digit of each image and its softmax probability.

    Example:
        >>> images, labels = load_digits16()
        >>> predicted, confidence = classify(images[:8])
        >>> bool((predicted == labels[:8]).all()), bool((confidence > 0.5).all())
        (True, True)
    """
    with torch.no_grad():
        probabilities = load_classifier()(as_batch(images)).softmax(dim=1)
    confidences, labels = probabilities.max(dim=1)
    return labels, confidences


def digit_features(images: Images) -> np.ndarray:
    """The classifier's penultimate-layer features, ``(N, 64)`` float64."""
    with torch.no_grad():
        return load_classifier().features(as_batch(images)).double().numpy()


def _statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if features.shape[0] < 2:
        raise ValueError(f"{features.shape[0]} image(s) give no covariance; pass at least 2 (32 or more is better)")
    return features.mean(axis=0), np.cov(features, rowvar=False)


@functools.cache
def _real_statistics() -> tuple[np.ndarray, np.ndarray]:
    images, _ = load_digits16()
    return _statistics(digit_features(images))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(values.clip(min=0.0))) @ vectors.T


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians ``N(mean_a, cov_a)`` and ``N(mean_b, cov_b)``.

    ``tr sqrt(cov_a cov_b)`` is computed as the trace of the square root of the symmetric matrix
    ``sqrt(cov_a) cov_b sqrt(cov_a)`` (same eigenvalues), with ``eigh``: no complex parts from
    rank-deficient covariances of small batches.

    Example:
        >>> eye = np.eye(2)
        >>> round(frechet_distance(np.zeros(2), eye, np.ones(2), eye), 6)
        2.0
    """
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0.0)
    distance = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.sqrt(cross).sum()
    return float(max(distance, 0.0))


def digit_metrics(images: Images) -> dict[str, Any]:
    """How digit-like a batch is: ``count``, ``histogram`` (predicted classes 0..9), ``classes``
    (distinct predicted classes), ``confidence`` (mean max-probability) and ``frechet`` (Fréchet
    distance of the classifier features to all real digits; lower is closer).

    Example:
        >>> images, _ = load_digits16()
        >>> metrics = digit_metrics(images[:200])
        >>> metrics["classes"], metrics["confidence"] > 0.9
        (10, True)
        >>> metrics["frechet"] < digit_metrics(torch.rand(200, 1, 16, 16))["frechet"] / 4
        True
    """
    batch = as_batch(images)
    labels, confidences = classify(batch)
    histogram = torch.bincount(labels, minlength=CLASSES).tolist()
    return {
        "count": len(batch),
        "histogram": histogram,
        "classes": sum(1 for n in histogram if n),
        "confidence": confidences.mean().item(),
        "frechet": frechet_distance(*_statistics(digit_features(batch)), *_real_statistics()),
    }


def deviation(a: Images, b: Images) -> dict[str, float]:
    """How far batch ``a`` is from batch ``b`` (e.g. parallel against sequential, same seed):
    ``psnr`` in dB with peak 1 (images in ``[0, 1]``; ``inf`` when equal) and ``max_abs``.

    Example:
        >>> images, _ = load_digits16()
        >>> deviation(images[:4], images[:4])
        {'psnr': inf, 'max_abs': 0.0}
    """
    first, second = as_batch(a).double(), as_batch(b).double()
    if first.shape != second.shape:
        raise ValueError(f"batches of shapes {tuple(first.shape)} and {tuple(second.shape)} differ; "
                         "compare the same number of images")
    error = (first - second).pow(2).mean().item()
    return {
        "psnr": math.inf if error == 0.0 else 10.0 * math.log10(1.0 / error),
        "max_abs": (first - second).abs().max().item(),
    }
