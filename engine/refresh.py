"""Note [predicted refresh]: an asynchronous step runs sequentially where its predicted error is
above ``refresh_error``.

Stale inputs cost most where the model's values move most from one step to the next (the first
steps, AsyncDiff's observation). The fidelity rule's measurement (Note [measured plan choice])
gives, for the chosen plan, the predicted error ``e`` (Note [predicted error]) and, from the same
one-process run, how far the sequential outputs moved per step ``m`` (mean relative L2 distance
between consecutive outputs, :func:`~asyncdiff.engine.drift.output_motion`). Their ratio
``k = e / m``, the error per unit of motion, is a note of the plan (``error_per_motion``) and is
cached with it. At every later step the engine knows how far the denoiser's output moved over the
last step, ``m_t`` (the output every rank returns to the pipeline, so the same number on every
rank, with no communication), and predicts the step's error as ``k * m_t``; above
``refresh_error`` the step runs as a refresh (Note [step decision]: "predicted error 0.08 > 0.05").
Where no motion is seen yet (the first step after a warm-up of one step), the prediction is the
error the fidelity rule measured for the first asynchronous steps, ``e`` itself.

What it rests on, stated: the error is taken as proportional to the output's motion, with the
constant measured once, on the first call's warm-up (extrapolated for ``model_n + 1`` steps); a
plan with no such measurement (given, or chosen by the depth rule) cannot predict, and the engine
says so (a warning) and runs without it.

Example:
    >>> refresh = PredictedRefresh(limit=0.05)
    >>> refresh.observe(torch.ones(4), step=0); refresh.observe(torch.full((4,), 1.2), step=1)
    >>> round(refresh.predicted({"error_per_motion": 0.5}), 3)
    0.1
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["PredictedRefresh"]

log = logging.getLogger(__name__)


class PredictedRefresh:
    """The last outputs of the running loop and the prediction from them (Note [predicted refresh])."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.last: torch.Tensor | None = None  # the last step's output (first tensor leaf), float64
        self.motion: float | None = None  # how far it moved from the step before (relative L2)
        self.warned = False

    def observe(self, output: Any, step: int) -> None:
        """The output of ``step`` (its first call: branch 0); step 0 starts a loop afresh."""
        leaf = next((t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)), None)
        if leaf is None:
            return
        now = leaf.detach().flatten().double()  # on its device: only the norm comes to the host
        if step == 0 or self.last is None or self.last.shape != now.shape:
            self.motion = None
        else:
            self.motion = float((now - self.last).norm() / self.last.norm().clamp_min(1e-30))
        self.last = now

    def predicted(self, notes: dict[str, Any]) -> float | None:
        """The next step's predicted error, or None where the plan has no measured error per motion."""
        per_motion = notes.get("error_per_motion")
        if per_motion is None:
            if not self.warned:
                log.warning("refresh_error=%g is inactive: the plan has no measured error per motion (Note "
                            "[predicted refresh]: it needs the fidelity rule's measurement on the first call)",
                            self.limit)
                self.warned = True
            return None
        if self.motion is None:  # the first step after a warm-up of one: the error measured for it
            return notes.get("predicted_error")
        return float(per_motion) * self.motion
