"""Automatic planning: trace + profile + planner, turned into a :class:`Plan`.

Example:
    >>> import torch
    >>> from asyncdiff.partition.trace import trace_denoiser
    >>> from asyncdiff.partition.profile import profile_blocks
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    >>> x = torch.randn(2, 16)
    >>> traced = trace_denoiser(net, (x,), {})
    >>> plan = auto_plan(traced, profile_blocks(traced, net, (x,), {}, measure_time=False), 2, cost="flops")
    >>> plan.stages
    (('0', '1'), ('2', '3'))
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import torch.fx

from asyncdiff.partition.plan import Plan
from asyncdiff.partition.planner import (
    FIDELITY_SLOWDOWN,
    LAYOUTS,
    MAX_SLOWDOWN,
    Candidate,
    Value,
    candidates,
    choose,
    main_path_depth,
    nearby_candidates,
    stage_times,
)
from asyncdiff.partition.profile import BlockCost
from asyncdiff.partition.split import place_latent_nodes
from asyncdiff.partition.passes import updated_base
from asyncdiff.partition.traced import TracedDenoiser

__all__ = ["COSTS", "COST_UNITS", "auto_plan", "block_cost", "block_values", "candidate_plans", "inplace_spans", "untransferable_spans", "plan_candidates", "plan_depth", "plan_layout"]

COSTS = ("time", "flops", "bytes")  # measured seconds, counted FLOPs, or weight bytes (memory balance)
COST_UNITS = {"time": "s", "flops": "flop", "bytes": "byte"}


def block_cost(c: BlockCost, cost: str) -> float:
    """One block's cost for the planner under ``cost`` (one of :data:`COSTS`)."""
    return c.seconds if cost == "time" else float(c.flops if cost == "flops" else c.param_bytes)


def _block_positions(traced: TracedDenoiser) -> tuple[int, dict[str, int]]:
    """The last block's index, and where each latent node runs as a block index (Note [placement])."""
    last = len(traced.blocks) - 1
    return last, place_latent_nodes(traced, {traced.block_node[b]: i for i, b in enumerate(traced.blocks)}, last)


def block_values(traced: TracedDenoiser, costs: Mapping[str, BlockCost] | None = None) -> list[Value]:
    """Block-level dataflow for the planner: every latent tensor of the graph, placed where the
    split will compute it (Note [placement] in :mod:`asyncdiff.partition.split`), read by the
    blocks that use it. A skip connection is one value with a far consumer; a residual stream is
    a chain of values, each crossing only the cut it spans."""
    last, pos = _block_positions(traced)
    nodes = list(traced.graph.nodes)
    values = []
    for node in nodes:
        specs = (traced.specs[node.name],) if node.name in traced.specs else traced.part_specs.get(node.name, ())
        if node.name not in pos or not specs:
            continue
        consumers = {last if u.op == "output" else pos[u.name] for u in node.users} - {pos[node.name]}
        if consumers:
            values.append(Value(pos[node.name], tuple(sorted(consumers)), sum(s.nbytes for s in specs)))
    return values


def untransferable_spans(traced: TracedDenoiser) -> list[tuple[int, int]]:
    """Block index ranges from where a value that is not a tensor (a Python list of lengths, a
    dtype) is made to its last reader: it cannot travel between stages, so they share one."""
    last, pos = _block_positions(traced)
    spans = []
    for node in traced.graph.nodes:
        if node.name not in pos or node.name in traced.specs or node.name in traced.part_specs:
            continue
        readers = [last if u.op == "output" else pos[u.name] for u in node.users]
        if readers and max(readers) > pos[node.name]:
            spans.append((pos[node.name], max(readers)))
    return spans


def inplace_spans(traced: TracedDenoiser) -> list[tuple[int, int]]:
    """Block index ranges ``(first, last)`` that must stay on one stage: from the block that made a
    value to the block that first runs after an in-place update of it (Note [in-place updates])."""
    last, pos = _block_positions(traced)
    spans = []
    for node in traced.graph.nodes:
        source = updated_base(node)
        if source is None or node.name not in pos:
            continue
        if isinstance(source, torch.fx.Node) and source.name in pos and pos[source.name] < pos[node.name]:
            spans.append((pos[source.name], pos[node.name]))
    return spans


class _Problem:
    """The planner's view of a traced denoiser: units (blocks that must stay together: Notes
    [in-place updates] and [merged blocks], values that are not tensors; mostly single blocks)
    with their costs and the values between them."""

    def __init__(self, traced: TracedDenoiser, costs: Mapping[str, BlockCost], cost: str) -> None:
        if cost not in COSTS:
            raise ValueError(f"cost={cost!r} is not a cost model; use one of {COSTS}")
        per_block = [block_cost(costs[b], cost) for b in traced.blocks]
        glued = [False] * len(per_block)  # glued[i]: block i joins block i - 1's unit
        for first, last in (*inplace_spans(traced), *traced.repeated_spans(), *untransferable_spans(traced)):
            for i in range(first + 1, last + 1):
                glued[i] = True
        self.unit = list(itertools.accumulate(0 if g or i == 0 else 1 for i, g in enumerate(glued)))
        n = self.unit[-1] + 1 if self.unit else 0
        self.costs = [0.0] * n
        for u, c in zip(self.unit, per_block):
            self.costs[u] += c
        self.values = [Value(self.unit[v.producer] if v.producer >= 0 else -1,
                             tuple(sorted({self.unit[c] for c in v.consumers})), v.nbytes)
                       for v in block_values(traced)]

    def blocks(self, assignment: Sequence[int]) -> tuple[int, ...]:
        """Stage per block from stage per unit."""
        return tuple(assignment[u] for u in self.unit)


def plan_candidates(traced: TracedDenoiser, costs: Mapping[str, BlockCost], model_n: int, *,
                    cost: str = "time", bandwidth: float | None = None,
                    layouts: Sequence[str] = LAYOUTS) -> list[Candidate]:
    """The best plan of each layout, with its modelled step and main-path depth (Note [staleness])."""
    problem = _Problem(traced, costs, cost)
    return [dataclasses.replace(c, assignment=problem.blocks(c.assignment))
            for c in candidates(problem.costs, problem.values, model_n, bandwidth, layouts)]


def auto_plan(traced: TracedDenoiser, costs: Mapping[str, BlockCost], model_n: int, *,
              cost: str = "time", bandwidth: float | None = None, layouts: Sequence[str] = LAYOUTS,
              max_slowdown: float = MAX_SLOWDOWN) -> Plan:
    """The plan of ``traced``'s blocks into ``model_n`` stages: among the best plan of each of
    ``layouts``, the least stale one within ``max_slowdown`` of the fastest (Note [staleness]).

    ``cost``: ``"time"`` (measured seconds) or ``"flops"``; ``bandwidth`` in bytes per cost unit
    (None: plan for compute only).
    """
    problem = _Problem(traced, costs, cost)
    chosen = choose(candidates(problem.costs, problem.values, model_n, bandwidth, layouts), max_slowdown)
    return _plan_of(traced, problem, chosen, cost, bandwidth)


def candidate_plans(traced: TracedDenoiser, costs: Mapping[str, BlockCost], model_n: int, *,
                    cost: str = "time", bandwidth: float | None = None, layouts: Sequence[str] = LAYOUTS,
                    max_slowdown: float = FIDELITY_SLOWDOWN) -> list[Plan]:
    """Note [fidelity rule]: the plans whose fidelity the engine measures, fastest first, each
    with its layout, modelled step and main-path depth in ``notes``."""
    problem = _Problem(traced, costs, cost)
    return [_plan_of(traced, problem, c, cost, bandwidth)
            for c in nearby_candidates(problem.costs, problem.values, model_n, bandwidth, layouts, max_slowdown)]


def _plan_of(traced: TracedDenoiser, problem: _Problem, chosen: Candidate, cost: str,
             bandwidth: float | None) -> Plan:
    model_n = max(chosen.assignment) + 1
    assignment = problem.blocks(chosen.assignment)
    stages = tuple(tuple(b for b, s in zip(traced.blocks, assignment) if s == k) for k in range(model_n))
    stage_costs = tuple(sum(c for c, s in zip(problem.costs, chosen.assignment) if s == k) for k in range(model_n))
    modeled = stage_times(problem.costs, problem.values, chosen.assignment, bandwidth)
    return Plan(stages=stages, costs=stage_costs, cost_unit=COST_UNITS[cost],
                notes={"modeled_step": max(modeled), "main_path_depth": chosen.depth, "layout": chosen.layout})


def plan_depth(traced: TracedDenoiser, plan: Plan) -> int:
    """``plan``'s main-path depth on ``traced`` (Note [staleness])."""
    return main_path_depth(block_values(traced), [plan.stage_of(b) for b in traced.blocks])


def plan_layout(traced: TracedDenoiser, plan: Plan) -> str:
    """``"wrapped"`` where stage 0 also runs the last block, else ``"contiguous"``."""
    return "wrapped" if plan.model_n > 1 and plan.stage_of(traced.blocks[-1]) == 0 else "contiguous"
