"""The coverage suite: one tiny offline pipeline per diffusers family, to check that asyncdiff
runs each one exactly (or refuses it at the start, naming why).

A :class:`Case` builds a pipeline with seeded random weights and the call kwargs of one run. Cases
keep the denoiser's real topology at a toy width; text encoders are left out where the pipeline
accepts precomputed prompt embeddings (seeded random tensors of the encoder's output shape),
since the suite is about the denoiser. :mod:`asyncdiff.models.coverage.check` runs the cases on a
process group and makes the coverage matrix (``python -m benchmarks.coverage_matrix``).

Adding a case is one builder function in a group module and one :class:`Case` line in that
module's ``CASES``.

Example:
    >>> case = CASES["pixart-sigma"]
    >>> case.family, case.pipeline
    ('PixArt', 'PixArtSigmaPipeline')
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CASES", "GROUPS", "Case", "case", "representative"]

# group modules, each with a CASES tuple; a group whose diffusers classes are missing is skipped
GROUPS = ("builtin", "dit_image", "dit_image2", "video", "video2", "unet")


@dataclass(frozen=True)
class Case:
    """One pipeline of the suite. ``build()`` returns ``(pipeline, call kwargs)``: everything the
    call needs except ``num_inference_steps`` and ``generator``; ``family`` groups cases in the
    matrix; ``representative``: part of the default test run (the full matrix runs on request);
    ``stride2``: also checked with stride 2 on 3 processes."""

    name: str
    family: str
    pipeline: str
    build: Callable[[], tuple[Any, dict[str, Any]]]
    representative: bool = False
    stride2: bool = False


def _collect() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for group in GROUPS:
        module = importlib.import_module(f"{__name__}.{group}")
        for c in module.CASES:
            if c.name in cases:
                raise ValueError(f"coverage case {c.name!r} is defined twice (group {group!r})")
            cases[c.name] = c
    return cases


CASES: dict[str, Case] = _collect()


def case(name: str) -> Case:
    """The coverage case ``name``, or a ``ValueError`` naming the choices."""
    if name not in CASES:
        raise ValueError(f"case={name!r} is not a coverage case; use one of {sorted(CASES)}")
    return CASES[name]


def representative() -> list[str]:
    """The cases of the default test run."""
    return [name for name, c in CASES.items() if c.representative]
