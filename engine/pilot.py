"""The default plan chosen by measurement during the first call's warm-up (Note [measured plan choice]).

Note [measured plan choice]: the fidelity rule (Note [fidelity rule] in
:mod:`asyncdiff.partition.planner`) needs the error each candidate plan would cause, and that
needs two consecutive steps of the real call. So at the first call without a plan, rank 0 plans
the candidates and every rank starts with the provisional one (the depth rule's plan; the warm-up
steps are sequential, so their outputs do not depend on the plan) and keeps every weight. Each
rank records the flat inputs of the warm-up calls. At the first asynchronous step (step
``warm_up``), before it runs, rank 0 predicts each candidate's error on the recorded calls (Note
[predicted error] in :mod:`asyncdiff.engine.drift`) and every rank takes its choice, the
plan is cached (Note [plan cache]) and the foreign weights are released. Where the choice is
another plan than the provisional one, every rank re-splits and computes the stale values its
new stage reads at this step from the last warm-up call's recorded inputs, in one process (the
values the new plan's stages would have sent it; the same computation, so the same bits as a run
that had this plan from the start, tests/test_pilot.py). A later run reads the cached plan and
measures nothing.

The measurement needs the whole denoiser on rank 0 and the plain stage schedule: it is not
taken (the depth rule decides, and the plan's source says why) for stage-only loads, stride 2,
time shift, guidance or batch slices, adaptive refresh, a warm-up of 0, or one stage; a pipeline
that calls its denoiser more than once per step, or ends before the first asynchronous step,
keeps the provisional plan (not cached).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree

from asyncdiff.engine.drift import extrapolated_calls, output_motion, predicted_error, sequential_outputs
from asyncdiff.engine.local import AsyncSimulator
from asyncdiff.partition.cache import PlanCache
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.planner import choose_faithful
from asyncdiff.partition.split import split_graph
from asyncdiff.partition.verify import fresh as fresh_copy

if TYPE_CHECKING:
    from asyncdiff.engine.config import EngineConfig
    from asyncdiff.engine.runtime import AsyncEngine
    from asyncdiff.engine.stage import CompiledCall, StageState

__all__ = ["PlanPilot", "horizon_for", "unmeasured"]

log = logging.getLogger(__name__)


def unmeasured(config: EngineConfig, stage_only: bool) -> str | None:
    """Why the fidelity rule cannot measure under ``config`` (None: it can; Note [measured plan choice])."""
    reasons = [(config.plan_rule != "fidelity", f"plan_rule={config.plan_rule!r}"),
               (config.model_n < 2, "one stage"),
               (stage_only, "a stage-only load (rank 0 lacks the other stages' weights)"),
               (config.stride != 1, "stride=2"), (config.time_shift, "time_shift=True"),
               (config.data > 1 or config.parallel is not None, "guidance or batch slices"),
               (config.refresh_drift is not None, "refresh_drift"), (config.warm_up == 0, "warm_up=0")]
    return next((text for cond, text in reasons if cond), None)


class PlanPilot:
    """The pending choice among ``candidates`` (Plans, fastest first); ``key``: where the choice is
    cached; ``made``: how the candidates were made (for the plan's source)."""

    def __init__(self, candidates: list[Plan], key: str, made: str, horizon: int) -> None:
        self.candidates, self.key, self.made, self.horizon = candidates, key, made, horizon
        self.warm_up = 0  # the running call's (reset_state may change it)
        self.calls: list[list[Any]] = []  # flat inputs of this loop's warm-up steps
        self.compiled: CompiledCall | None = None  # the call signature they were recorded for
        self.errors: list[float] = []  # measured, per candidate

    def step(self, engine: AsyncEngine, compiled: CompiledCall, state: StageState, args: tuple[Any, ...],
             kwargs: dict[str, Any], step: int, branch: int) -> CompiledCall:
        """Before the step runs: record its inputs, or at the first asynchronous step choose; the
        compiled call to run it with (another one where the choice changed the plan)."""
        if branch != 0:
            self._settle(engine, None, "the pipeline calls its denoiser more than once per step")
            return compiled
        if step == 0 or compiled is not self.compiled:  # a new call, or a new loop (Note [a second loop])
            self.calls, self.compiled, self.warm_up = [], compiled, engine.schedule.warm_up
        if self.warm_up < 1:
            self._settle(engine, None, "warm_up=0")
            return compiled
        flat = compiled.traced.flatten_call(args, kwargs)
        if step < self.warm_up:
            self.calls.append(fresh_copy(flat))
            return compiled
        if len(self.calls) != self.warm_up:  # this loop's warm-up began before the plan was made
            return compiled
        return self._choose(engine, compiled, state, flat, args, kwargs)

    def _choose(self, engine: AsyncEngine, compiled: CompiledCall, state: StageState, flat: list[Any],
                args: tuple[Any, ...], kwargs: dict[str, Any]) -> CompiledCall:
        start = time.perf_counter()
        traced, denoiser = compiled.traced, engine.denoiser

        def measure() -> tuple[list[float], float]:
            calls = extrapolated_calls([*self.calls, flat], self.horizon)
            reference = sequential_outputs(traced, denoiser, calls)
            return [predicted_error(traced, split_graph(traced, plan.restricted_to(traced.blocks)), denoiser, calls,
                                    self.warm_up, reference) for plan in self.candidates], \
                output_motion(reference, self.warm_up)

        self.errors, motion = engine.planning.from_rank0(measure)
        index = choose_faithful([p.notes["modeled_step"] for p in self.candidates], self.errors)
        chosen = Plan(self.candidates[index].stages, self.candidates[index].costs, self.candidates[index].cost_unit,
                      {**self.candidates[index].notes, "predicted_error": self.errors[index],
                       "error_per_motion": self.errors[index] / motion if motion > 0 else None})  # Note [predicted refresh]
        log.info("fidelity rule: %s; chose candidate %d in %.2f s", ", ".join(
            f"{i}: step {p.notes['modeled_step']:.4g} error {e:.4g}" for i, (p, e) in
            enumerate(zip(self.candidates, self.errors))), index, time.perf_counter() - start)
        if chosen.stages != engine.planning.plan.stages:
            engine.planning.plan = chosen
            engine._compiled.clear()  # every signature was split by the provisional plan
            compiled = engine._compile(args, kwargs, 0)  # still pending: every weight stays for _refill
            self._refill(engine, compiled, state)
        self._settle(engine, chosen, None)
        return compiled

    def _refill(self, engine: AsyncEngine, compiled: CompiledCall, state: StageState) -> None:
        """The stale values this rank's new stage reads at the first asynchronous step: what the
        new plan's stages would have sent it at the last warm-up step, computed here."""
        config = engine.config
        calls = self.calls if config.compensate != "none" else self.calls[-1:]  # compensation keeps a history
        simulator = AsyncSimulator(compiled.traced, compiled.split, engine.denoiser, warm_up=self.warm_up,
                                   compensate=config.compensate, timesteps=engine.timesteps)
        simulator.step = self.warm_up - len(calls)
        for flat in calls:
            simulator.leaves(flat)
        state.channel = compiled.channel(0)
        state.stale = pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x,
                                      simulator.states[engine.rank].stale)
        state.extrapolation = simulator.states[engine.rank].extrapolation

    def _settle(self, engine: AsyncEngine, chosen: Plan | None, reason: str | None) -> None:
        """The end of the pilot: ``chosen`` becomes the plan and is cached (on rank 0), or the
        provisional plan stays (``reason``: why nothing was measured)."""
        planning = engine.planning
        planning.pilot = None
        planning.measured = list(zip(self.candidates, self.errors))
        for compiled in engine._compiled.values():
            engine._release(compiled)
        if chosen is None:
            planning.plan_source = f"{self.made}, provisional plan kept (fidelity not measured: {reason})"
            log.info("plan: %s", planning.plan_source)
            return
        planning.plan = chosen
        path = planning.from_rank0(lambda: PlanCache().store(self.key, chosen))  # rank 0 keeps the cache
        error = chosen.notes["predicted_error"]
        planning.plan_source = (f"{self.made}, " + (f"saved to {path}" if path else "not cached") +
                                f"; fidelity rule: predicted error {error:.3g}, the least of "
                                f"{len(self.candidates)} candidates")
        log.info("plan: %s", planning.plan_source)


def horizon_for(config: EngineConfig) -> int:
    """Extrapolated steps after the first asynchronous one (Note [predicted error])."""
    return config.model_n + 1
