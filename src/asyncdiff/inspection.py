"""Plan a denoiser and report the partition, for ``asyncdiff inspect`` and for Python users.

Example (a new architecture, no adapter needed):
    >>> import torch
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
    >>> plan, report = partition_report(net, (torch.randn(8, 64),), {}, stages=3, cost="flops")
    >>> [len(s) for s in plan.stages], round(report.imbalance, 3)
    ([2, 2, 2], 1.0)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from asyncdiff.partition.auto import block_values, plan_candidates
from asyncdiff.partition.blocks import BlockPolicy
from asyncdiff.partition.cache import cached_plan, device_kind
from asyncdiff.partition.drift import predicted_drift, record_calls
from asyncdiff.partition.planner import LAYOUTS, MAX_SLOWDOWN, main_path_depth
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.profile import profile_blocks
from asyncdiff.partition.report import LINKS, PartitionReport, build_report
from asyncdiff.partition.split import split_graph
from asyncdiff.partition.trace import call_signature, trace_denoiser

__all__ = ["load_for_inspection", "partition_report", "pipeline_report"]


def partition_report(denoiser: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, stages: int,
                     cost: str = "flops", link: str = "gloo", policy: str | BlockPolicy = "fine",
                     latent: str | None = None, plan: Plan | None = None, name: str | None = None,
                     layouts: tuple[str, ...] = LAYOUTS, max_slowdown: float = MAX_SLOWDOWN, replan: bool = False,
                     calls: list[tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
                     ) -> tuple[Plan, PartitionReport]:
    """Trace ``denoiser(*args, **kwargs)``, profile its blocks, plan ``stages`` stages (or use
    ``plan``) and report, with every layout's best plan and its staleness (Note [staleness]).
    ``cost="flops"`` works on ``meta`` tensors (no weights needed). Plans come from the plan cache
    where it has one for this call and options (Note [plan cache]; ``replan=True``: plan anew).
    ``calls``: the denoiser's calls over consecutive steps of a real run (same signature): each
    considered plan then gets its predicted drift (Note [predicted drift]; needs real weights)."""
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
    source = "given"
    if plan is None:
        device = next((t.device for t in args if isinstance(t, torch.Tensor)), torch.device("cpu"))
        plan, source = cached_plan(traced, stages, lambda: costs, cost=cost, bandwidth=bandwidth, layouts=layouts,
                                   max_slowdown=max_slowdown, device=device_kind(device), replan=replan)
    split = split_graph(traced, plan)
    report = build_report(name or type(denoiser).__name__, traced, costs, plan, split, LINKS[link])
    values = block_values(traced)
    depth = main_path_depth(values, [plan.stage_of(b) for b in traced.blocks])
    considered = []
    for c in plan_candidates(traced, costs, stages, cost=cost, bandwidth=bandwidth, layouts=layouts):
        drift = None
        if calls:
            candidate = Plan(stages=tuple(tuple(b for b, s in zip(traced.blocks, c.assignment) if s == k)
                                          for k in range(stages)))
            drift = predicted_drift(traced, split_graph(traced, candidate), denoiser, calls)
        considered.append((c.layout, LINKS[link].seconds(c.step, unit), c.depth, drift))
    return plan, dataclasses.replace(report, source=source, main_path_depth=depth, candidates=tuple(considered))


def pipeline_report(pipeline: Any, *, stages: int, cost: str = "flops", link: str = "gloo",
                    policy: str | BlockPolicy = "fine", name: str | None = None, plan: Plan | None = None,
                    max_slowdown: float = MAX_SLOWDOWN, replan: bool = False, drift_steps: int = 0,
                    **call_kwargs: Any) -> tuple[Plan, PartitionReport]:
    """:func:`partition_report` for a diffusers pipeline's denoiser, called as the pipeline calls it.
    ``drift_steps``: record a real run of that many steps and give each considered plan its
    predicted drift (Note [predicted drift]; needs real weights)."""
    from asyncdiff.adapters.capture import capture_denoiser_call
    from asyncdiff.adapters.registry import adapter_for

    adapter = adapter_for(pipeline)
    args, kwargs = capture_denoiser_call(pipeline, adapter.denoiser, **call_kwargs)
    denoiser = getattr(pipeline, adapter.denoiser)
    calls = None
    if drift_steps:
        calls = record_calls(pipeline, adapter.denoiser, **{**call_kwargs, "num_inference_steps": drift_steps})
        if any(call_signature(denoiser, *c)[0] != call_signature(denoiser, args, kwargs)[0] for c in calls):
            raise ValueError(f"{type(pipeline).__name__} calls its denoiser with more than one signature per run "
                             "(guidance as two calls?); predicted drift needs one call per step: drop --drift")
    return partition_report(denoiser, args, kwargs, stages=stages, cost=cost, link=link, policy=policy,
                            latent=adapter.latent, name=name or adapter.name, plan=plan,
                            max_slowdown=max_slowdown, replan=replan, calls=calls)


def load_for_inspection(pipeline: str, size: str, model: str | None, *, on_meta: bool) -> Any:
    """A built-in pipeline (its models on ``meta`` when only FLOPs are needed) or one loaded from ``model``."""
    if model is not None:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(model)
    from asyncdiff.models.builders import BUILDERS

    if pipeline not in BUILDERS:
        raise ValueError(f"pipeline={pipeline!r} has no built-in model; use one of {sorted(BUILDERS)} or --model PATH")
    if not on_meta:
        return BUILDERS[pipeline](size, 0)
    # Schedulers copy tables to the CPU while they are built, so only modules go to meta.
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return BUILDERS[pipeline](size, 0)
