"""Plan a denoiser and report the partition, for ``asyncdiff inspect`` and for Python users.

Example (a new architecture, no adapter needed):
    >>> import torch
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
    >>> plan, report = partition_report(net, (torch.randn(8, 64),), {}, model_n=3, cost="flops")
    >>> [len(s) for s in plan.stages], round(report.imbalance, 3)
    ([2, 2, 2], 1.0)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from asyncdiff.engine.config import WarmUp, warm_up_steps
from asyncdiff.engine.drift import extrapolated_calls, predicted_error, record_calls, sequential_outputs
from asyncdiff.engine.local import AsyncSimulator
from asyncdiff.engine.schedule import Layout, Schedule
from asyncdiff.partition.auto import block_values, candidate_plans, plan_candidates, plan_depth, plan_layout
from asyncdiff.partition.blocks import BlockPolicy
from asyncdiff.partition.cache import cached_plan, device_kind
from asyncdiff.partition.hybrid import (
    ParallelOption,
    choose_parallel,
    format_options,
    parallel_degrees,
    two_calls,
)
from asyncdiff.partition.planner import FIDELITY_SLOWDOWN, LAYOUTS, MAX_SLOWDOWN, choose_faithful, main_path_depth
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.profile import profile_blocks
from asyncdiff.partition.report import LINKS, PartitionReport, build_report
from asyncdiff.partition.split import SplitDenoiser, split_graph
from asyncdiff.partition.trace import trace_denoiser
from asyncdiff.partition.traced import TracedDenoiser

__all__ = ["final_latents", "load_for_inspection", "measured_errors", "parallel_report", "partition_report",
           "pipeline_report"]


def partition_report(denoiser: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, model_n: int,
                     cost: str = "flops", link: str = "gloo", policy: str | BlockPolicy = "fine",
                     latent: str | None = None, plan: Plan | None = None, name: str | None = None,
                     layouts: tuple[str, ...] = LAYOUTS, max_slowdown: float | None = None, replan: bool = False,
                     drift: Callable[[TracedDenoiser, SplitDenoiser], float] | None = None,
                     errors: Callable[[TracedDenoiser, list[Plan]], list[float]] | None = None,
                     ) -> tuple[Plan, PartitionReport]:
    """Trace ``denoiser(*args, **kwargs)``, profile its blocks, plan ``model_n`` stages (or use
    ``plan``) and report, with the plans weighed, their modelled step and staleness (Note
    [staleness]). ``errors``: each candidate's predicted error (Note [predicted error]): the plan
    is then the fidelity rule's (Note [fidelity rule]; needs real weights), else the depth rule's
    (cached where the plan cache has it; ``replan=True``: plan anew). ``cost="flops"`` works on
    ``meta`` tensors. ``drift``: gives each plan's predicted drift (Note [predicted drift])."""
    if link not in LINKS:
        raise ValueError(f"link={link!r} is not a preset; use one of {sorted(LINKS)}")
    on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in (*denoiser.parameters(), *args))
    if cost == "time" and on_meta:
        raise ValueError("cost='time' measures the blocks and needs real weights; use cost='flops' "
                         "for a model on the meta device")
    traced = trace_denoiser(denoiser, args, kwargs, policy=policy, latent=latent)
    costs = profile_blocks(traced, denoiser, args, kwargs, measure_time=cost == "time")
    unit = "s" if cost == "time" else "flop"
    bandwidth = LINKS[link].planner_bandwidth(unit)
    window = max_slowdown if max_slowdown is not None else FIDELITY_SLOWDOWN if errors else MAX_SLOWDOWN
    considered = candidate_plans(traced, costs, model_n, cost=cost, bandwidth=bandwidth, layouts=layouts,
                                 max_slowdown=window) if errors else [
        _as_plan(traced, c, model_n) for c in plan_candidates(traced, costs, model_n, cost=cost, bandwidth=bandwidth,
                                                             layouts=layouts)]
    predicted = errors(traced, considered) if errors else [None] * len(considered)
    source = "given"
    if plan is None and errors:
        index = choose_faithful([p.notes["modeled_step"] for p in considered], predicted)
        plan, source = considered[index], (f"fidelity rule: predicted error {predicted[index]:.4g}, the least of "
                                           f"{len(considered)} candidates within {window:.0%} of the fastest")
    elif plan is None:
        device = next((t.device for t in args if isinstance(t, torch.Tensor)), torch.device("cpu"))
        plan, source = cached_plan(traced, model_n, lambda: costs, cost=cost, bandwidth=bandwidth, layouts=layouts,
                                   max_slowdown=window, device=device_kind(device), replan=replan)
        source += "; depth rule (fidelity needs real weights: --cost time or --drift)"
    split = split_graph(traced, plan)
    report = build_report(name or type(denoiser).__name__, traced, costs, plan, split, LINKS[link])
    rows = []
    for candidate, error in zip(considered, predicted):
        blocks = [candidate.stage_of(b) for b in traced.blocks]
        rows.append((plan_layout(traced, candidate), LINKS[link].seconds(float(candidate.notes["modeled_step"]), unit),
                     main_path_depth(block_values(traced), blocks),
                     drift(traced, split_graph(traced, candidate)) if drift is not None else None, error,
                     candidate.stages == plan.stages))
    schedule = Schedule(plan.model_n, warm_up=1).format(3, Layout.of(split))
    return plan, dataclasses.replace(report, source=source, main_path_depth=plan_depth(traced, plan),
                                     candidates=tuple(rows), trace_notes=traced.notes(), schedule=schedule)


def _as_plan(traced: TracedDenoiser, c: Any, model_n: int) -> Plan:
    return Plan(stages=tuple(tuple(b for b, s in zip(traced.blocks, c.assignment) if s == k) for k in range(model_n)),
                notes={"modeled_step": c.step})


def measured_errors(calls: list[tuple[tuple[Any, ...], dict[str, Any]]], denoiser: torch.nn.Module, warm_up: int,
                    model_n: int) -> Callable[[TracedDenoiser, list[Plan]], list[float]]:
    """Note [predicted error] as the engine measures it, from a sequential run's recorded ``calls``:
    the first ``warm_up + 1`` of them, continued for ``model_n + 1`` steps."""
    def errors(traced: TracedDenoiser, plans: list[Plan]) -> list[float]:
        flat = [traced.flatten_call(a, k) for a, k in calls[: warm_up + 1]]
        inputs = extrapolated_calls(flat, model_n + 1)
        reference = sequential_outputs(traced, denoiser, inputs)
        return [predicted_error(traced, split_graph(traced, p), denoiser, inputs, warm_up, reference) for p in plans]
    return errors


def pipeline_report(pipeline: Any, *, model_n: int, cost: str = "flops", link: str = "gloo",
                    policy: str | BlockPolicy = "fine", name: str | None = None, plan: Plan | None = None,
                    max_slowdown: float | None = None, replan: bool = False, drift_steps: int = 0,
                    plan_rule: str = "fidelity", warm_up: WarmUp = 1, **call_kwargs: Any) -> tuple[Plan, PartitionReport]:
    """:func:`partition_report` for a diffusers pipeline's denoiser, called as the pipeline calls it.
    ``drift_steps``: give each considered plan its predicted drift: the relative distance of the
    final latents of a run of that many steps (warm-up 1) under the engine's schedule, simulated
    in this process (:func:`final_latents`), from the sequential run's (needs real weights).
    ``plan_rule="fidelity"`` on real weights: the engine's choice (Note [fidelity rule]), from one
    sequential run of the call with ``warm_up`` warm-up steps."""
    from asyncdiff.adapters.api import other_denoisers
    from asyncdiff.adapters.capture import capture_denoiser_call
    from asyncdiff.adapters.registry import adapter_for

    adapter = adapter_for(pipeline)
    args, kwargs = capture_denoiser_call(pipeline, adapter.denoiser, **call_kwargs)
    denoiser = getattr(pipeline, adapter.denoiser)
    drift = None
    if drift_steps:
        reference = final_latents(pipeline, adapter.denoiser, None, drift_steps, call_kwargs)

        def drift(traced: TracedDenoiser, split: SplitDenoiser) -> float:
            simulated = final_latents(pipeline, adapter.denoiser, AsyncSimulator(traced, split, denoiser),
                                      drift_steps, call_kwargs)
            return float((simulated - reference).norm() / reference.norm().clamp_min(1e-30))
    real = not any(t.is_meta for t in denoiser.parameters())
    errors = None
    if plan_rule == "fidelity" and real and model_n > 1 and warm_up != 0:
        calls = record_calls(pipeline, adapter.denoiser, **call_kwargs)  # a relative warm-up: of these steps
        errors = measured_errors(calls, denoiser, warm_up_steps(warm_up, len(calls)), model_n)
    chosen, report = partition_report(denoiser, args, kwargs, model_n=model_n, cost=cost, link=link, policy=policy,
                                      latent=adapter.latent, name=name or adapter.name, plan=plan,
                                      max_slowdown=max_slowdown, replan=replan, drift=drift, errors=errors)
    others = [f"{other} ({type(getattr(pipeline, other)).__name__})"
              for other in other_denoisers(pipeline, adapter.denoiser, denoiser)]
    if others:  # Note [several denoisers]
        note = (f"the pipeline calls another denoiser too: {', '.join(others)}; the engine splits it as well, with "
                f"its own plan made at its first call (Note [several denoisers])")
        report = dataclasses.replace(report, trace_notes=(*report.trace_notes, note))
    return chosen, report


def parallel_report(pipeline: Any, *, devices: int, stride: int = 1, cost: str = "flops", link: str = "gloo",
                    policy: str | BlockPolicy = "fine", max_slowdown: float | None = None, plan_rule: str = "fidelity",
                    **call_kwargs: Any) -> tuple[list[ParallelOption], ParallelOption, str]:
    """Every way to run ``pipeline``'s denoiser call on ``devices`` processes (guidance x batch x
    stages, Note [choosing the mesh]) with its modelled step in seconds on ``link`` and its
    staleness; the one ``parallel="auto"`` takes (within the window of ``plan_rule``: an exact
    option has no staleness error, so the fidelity rule's 15 %); and both as a table."""
    from asyncdiff.adapters.api import _guided
    from asyncdiff.adapters.capture import capture_denoiser_call
    from asyncdiff.adapters.registry import adapter_for
    from asyncdiff.engine.mesh import batch_size, model_option

    if link not in LINKS:
        raise ValueError(f"link={link!r} is not a preset; use one of {sorted(LINKS)}")
    adapter = adapter_for(pipeline)
    args, kwargs = capture_denoiser_call(pipeline, adapter.denoiser, **call_kwargs)
    denoiser = getattr(pipeline, adapter.denoiser)
    n, unit = batch_size(denoiser, adapter.latent, args, kwargs), "s" if cost == "time" else "flop"
    guided, profiles = _guided(pipeline), {}
    options = [model_option(denoiser, args, kwargs, degrees, n, policy=policy, latent=adapter.latent, cost=cost,
                            bandwidth=LINKS[link].planner_bandwidth(unit),
                            max_slowdown=MAX_SLOWDOWN if max_slowdown is None else max_slowdown,
                            profiles=profiles, two_calls=two_calls(n, guided))
               for degrees in parallel_degrees(devices, stride, n, guided)]
    window = max_slowdown if max_slowdown is not None else (
        FIDELITY_SLOWDOWN if plan_rule == "fidelity" else MAX_SLOWDOWN)
    chosen = choose_parallel(options, window)
    options = [dataclasses.replace(o, step=LINKS[link].seconds(o.step, unit)) for o in options]
    chosen = options[[(o.guidance, o.batch, o.stages) for o in options].index(
        (chosen.guidance, chosen.batch, chosen.stages))]
    title = (f"{adapter.name}: {devices} devices, denoiser batch {n}, stride {stride}, {cost} on {link} "
             f"(* = parallel='auto')")
    return options, chosen, f"{title}\n{format_options(options, chosen)}"


def final_latents(pipeline: Any, attr: str, simulator: AsyncSimulator | None, steps: int,
                  call_kwargs: dict[str, Any]) -> torch.Tensor:
    """The latents after the last scheduler step of one seeded run of ``pipeline``, with the
    denoiser's outputs replaced by ``simulator``'s where given (Note [predicted drift]: the
    engine's asynchronous schedule in this process; the run is exactly the engine's)."""
    def hook(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if simulator is None:
            return output
        try:
            return simulator(*args, **kwargs)
        except ValueError as err:  # a call with another signature: a second call per step
            raise ValueError(f"{type(pipeline).__name__} calls its denoiser with more than one signature per run "
                             f"(guidance as two calls?); predicted drift needs one call per step ({err})") from err

    scheduler = pipeline.scheduler
    original = scheduler.step
    last: list[torch.Tensor] = []

    def step(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        last[:] = [next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)).detach().float().clone()]
        return out

    kwargs = {**call_kwargs, "num_inference_steps": steps}
    if "generator" in inspect.signature(type(pipeline).__call__).parameters:
        kwargs["generator"] = torch.Generator().manual_seed(0)
    handle = getattr(pipeline, attr).register_forward_hook(hook, with_kwargs=True)
    scheduler.step = step
    try:
        with torch.no_grad():
            pipeline(**kwargs)
    finally:
        handle.remove()
        del scheduler.step  # the class's method shows through again
    if not last:
        raise ValueError(f"{type(pipeline).__name__} made no scheduler step; predicted drift needs one")
    return last[0]


def load_for_inspection(pipeline: str, size: str, model: str | None, *, on_meta: bool) -> Any:
    """A built-in pipeline (its models on ``meta`` when only FLOPs are needed) or one loaded from ``model``."""
    if model is not None:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(model)
    from asyncdiff.models.builders import system

    build = system(pipeline).build
    if not on_meta:
        return build(size, 0)
    # Schedulers copy tables to the CPU while they are built, so only modules go to meta.
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build(size, 0)
