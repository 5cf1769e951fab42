"""Staleness compensation: a stage's stale inputs extrapolated from the last two it received.

Note [compensation]: at an asynchronous step ``t`` a stage reads the values its upstream stages
computed at step ``t - 1`` (Note [stale inputs] in schedule.py). With ``compensate="linear"``
it reads instead

    v(t) ~ v(t-1) + r * (v(t-1) - v(t-2)),    r = (tau(t) - tau(t-1)) / (tau(t-1) - tau(t-2)),

the values' linear trend over the last two steps scaled by the timestep spacing ``tau`` (the
predict step of ParaStep, applied to stage inputs). It costs no communication: the receiver
keeps the message before the last. Where the engine knows no timesteps (an engine made without
``timesteps``) the spacing is taken as uniform (r = 1); where two timesteps repeat (r's
denominator 0) that step reads the plain stale values. With ``compensate="auto"`` each value is
extrapolated only while, over the steps seen so far in the call (the warm-up steps first), its
linear prediction of the next value that arrived was closer than the stale one (summed squared
error; each rank decides for the values it receives, from what it received, so the choice needs
no agreement). A call's first two steps have no trend yet; with ``warm_up=1`` ``auto`` has
measured nothing at the first asynchronous step and reads it stale. Synchronous steps (warm-up,
refresh) read no stale values, so exact modes stay exact.

Example:
    >>> import torch
    >>> e = Extrapolation()
    >>> for step, value in enumerate([1.0, 2.0, 3.0]):
    ...     seen = e.step({"h": torch.tensor([value])}, "linear", 1.0, asynchronous=step == 2)
    >>> seen["h"].item()   # at step 3, from the values of steps 1 and 2: the next on the line
    4.0
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["COMPENSATE", "Extrapolation", "spacing_at", "spacing_ratio"]

log = logging.getLogger(__name__)

COMPENSATE = ("none", "linear", "auto")


@dataclass
class Extrapolation:
    """One branch's stale inputs across the steps of a call (Note [compensation])."""

    last: dict[str, torch.Tensor] = field(default_factory=dict)  # the previous step's stale values, copied
    predicted: dict[str, torch.Tensor] = field(default_factory=dict)  # last step's linear prediction of v(t-1)
    errors: dict[str, list[float]] = field(default_factory=dict)  # auto: summed squared errors [stale, linear]

    def step(self, stale: dict[str, torch.Tensor], mode: str, ratio: float | None,
             asynchronous: bool) -> dict[str, torch.Tensor]:
        """At the start of a step, with ``stale`` the values received last step, v(t-1): what the
        step's stage reads (``stale`` itself unless it is asynchronous and compensation applies).
        ``ratio``: the timestep spacing ratio r (None: this step cannot be compensated)."""
        if mode == "auto":
            self._score(stale)
        out, predicted = dict(stale), {}
        for name, value in stale.items():
            previous = self.last.get(name)
            if previous is None or ratio is None or previous.shape != value.shape:
                continue
            predicted[name] = guess = value + ratio * (value - previous)
            if asynchronous and (mode == "linear" or mode == "auto" and self._better(name)):
                out[name] = guess
        self.predicted = predicted
        self.last = {name: value.clone() for name, value in stale.items()}  # receive buffers get reused
        return out

    def _score(self, arrived: dict[str, torch.Tensor]) -> None:
        """Auto: how the stale value (v(t-2)) and the linear guess predicted v(t-1), now arrived."""
        for name, value in arrived.items():
            guess, stale = self.predicted.get(name), self.last.get(name)
            if guess is None or stale is None or stale.shape != value.shape:
                continue
            errors = self.errors.setdefault(name, [0.0, 0.0])
            errors[0] += float((value.float() - stale.float()).square().sum())
            errors[1] += float((value.float() - guess.float()).square().sum())

    def _better(self, name: str) -> bool:
        errors = self.errors.get(name)
        return errors is not None and errors[1] < errors[0]

    def choices(self) -> dict[str, bool]:
        """Auto: per value, whether it is extrapolated now."""
        return {name: self._better(name) for name in self.errors}


def spacing_ratio(timesteps: list[float | None]) -> float | None:
    """r of Note [compensation] from the timesteps of steps t-2, t-1, t (None entries: unknown,
    uniform spacing assumed); None where the last spacing is 0."""
    if any(t is None for t in timesteps):
        return 1.0
    older, last, now = timesteps
    if last == older:
        return None
    return (now - last) / (last - older)


def spacing_at(timesteps: Callable[[int], Any] | None, step: int) -> float | None:
    """r at ``step`` of a call whose step timesteps ``timesteps(step)`` gives (None: uniform);
    None before a trend exists."""
    if step < 2:
        return None
    if timesteps is None:
        return 1.0
    return spacing_ratio([float(timesteps(s)) for s in (step - 2, step - 1, step)])
