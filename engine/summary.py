"""What one engine did in the last pipeline call, as a plain record (what ``generate`` prints).

Example (needs a process group, so not run as a doctest)::

    summary(async_diff.engine, steps=20)
    # {'stages': 2, 'guidance': 1, 'batch': 1, 'refresh_steps': 0, 'step_s': 0.031, 'plan': [26, 22], ...}
"""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["predicted_step_seconds", "summary"]


def summary(engine: Any, steps: int) -> dict[str, Any]:
    """``engine``'s degrees (``parallel="auto"`` chose them at the first call), the options it
    weighed, its step times over the last call (``step_s``: the mean after warm-up, per denoising
    step, so stride 2's compute-free reuse steps and refreshes count as they cost), the modelled
    step, and its plan: sizes, where it came from, main-path depth, bytes per step, released weights."""
    from asyncdiff.partition.report import LINKS

    config = engine.config
    result: dict[str, Any] = {"stages": config.model_n, "guidance": config.guidance, "batch": config.batch}
    if engine.parallel_options:
        result["parallel_options"] = [
            {"guidance": o.guidance, "batch": o.batch, "stages": o.stages, "modeled_step": round(o.step, 6),
             "main_path_depth": o.depth} for o in engine.parallel_options]
    # stage runs per step: 2 where guidance is two calls (Note [branches]), 1 again where two
    # guidance slices run one call each (Note [two-call guidance])
    calls_per_step = max(1, round(len(engine.seconds) / steps))
    kinds = [kind for kind, _ in engine.seconds]
    result["refresh_steps"] = kinds.count("refresh") // calls_per_step
    result["warm_up_steps"] = engine.schedule.warm_up  # the last loop's (Note [relative warm-up])
    steady = [s for kind, s in engine.seconds if kind != "warm-up"]
    if steady:
        result["step_s"] = round(statistics.fmean(steady) * calls_per_step, 4)
    predicted = predicted_step_seconds(engine, LINKS["gloo"].bytes_per_s)
    if predicted is not None:
        result["predicted_step_s"] = round(predicted * calls_per_step, 4)
    if engine.plan is not None:
        result["plan"] = [len(s) for s in engine.plan.stages]
        result["plan_source"] = engine.plan_source
        if "main_path_depth" in engine.plan.notes:
            result["main_path_depth"] = int(engine.plan.notes["main_path_depth"])
        result["bytes_sent_per_step"] = engine.bytes_sent_per_step
        result["released_weights"] = len(engine.released_weights)
    return result


def predicted_step_seconds(engine: Any, bytes_per_s: float) -> float | None:
    """The step-time model for an asynchronous step of ``engine``: the slowest stage's profiled
    time plus the bytes it receives, plus the final output's broadcast, over ``bytes_per_s``.
    Needs a plan made with ``cost="time"`` (None otherwise)."""
    if engine.plan is None or engine.plan.cost_unit != "s" or not engine._compiled:
        return None
    compiled = next(reversed(engine._compiled.values()))
    recv = [sum(t.spec.nbytes for t in compiled.split.transfers if t.dst == k) for k in range(engine.plan.model_n)]
    stage = max(cost + nbytes / bytes_per_s for cost, nbytes in zip(engine.plan.costs, recv))
    return stage + compiled.output_layout.nbytes / bytes_per_s
