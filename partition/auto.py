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

from collections.abc import Mapping, Sequence

from asyncdiff.partition.plan import Plan
from asyncdiff.partition.planner import LAYOUTS, MAX_SLOWDOWN, Candidate, Value, candidates, choose, stage_times
from asyncdiff.partition.profile import BlockCost
from asyncdiff.partition.split import place_latent_nodes
from asyncdiff.partition.trace import TracedDenoiser

__all__ = ["COSTS", "auto_plan", "block_values", "plan_candidates"]

COSTS = ("time", "flops")


def block_values(traced: TracedDenoiser, costs: Mapping[str, BlockCost] | None = None) -> list[Value]:
    """Block-level dataflow for the planner: every latent tensor of the graph, placed where the
    split will compute it (Note [placement] in :mod:`asyncdiff.partition.split`), read by the
    blocks that use it. A skip connection is one value with a far consumer; a residual stream is
    a chain of values, each crossing only the cut it spans."""
    last = len(traced.blocks) - 1
    pos = place_latent_nodes(traced, {traced.block_node[b]: i for i, b in enumerate(traced.blocks)}, last)
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


def _block_costs(traced: TracedDenoiser, costs: Mapping[str, BlockCost], cost: str) -> list[float]:
    if cost not in COSTS:
        raise ValueError(f"cost={cost!r} is not a cost model; use one of {COSTS}")
    return [costs[b].seconds if cost == "time" else float(costs[b].flops) for b in traced.blocks]


def plan_candidates(traced: TracedDenoiser, costs: Mapping[str, BlockCost], n_stages: int, *,
                    cost: str = "time", bandwidth: float | None = None,
                    layouts: Sequence[str] = LAYOUTS) -> list[Candidate]:
    """The best plan of each layout, with its modelled step and main-path depth (Note [staleness])."""
    return candidates(_block_costs(traced, costs, cost), block_values(traced), n_stages, bandwidth, layouts)


def auto_plan(traced: TracedDenoiser, costs: Mapping[str, BlockCost], n_stages: int, *,
              cost: str = "time", bandwidth: float | None = None, layouts: Sequence[str] = LAYOUTS,
              max_slowdown: float = MAX_SLOWDOWN) -> Plan:
    """The plan of ``traced``'s blocks into ``n_stages`` stages: among the best plan of each of
    ``layouts``, the least stale one within ``max_slowdown`` of the fastest (Note [staleness]).

    ``cost``: ``"time"`` (measured seconds) or ``"flops"``; ``bandwidth`` in bytes per cost unit
    (None: plan for compute only).
    """
    per_block = _block_costs(traced, costs, cost)
    values = block_values(traced)
    chosen = choose(candidates(per_block, values, n_stages, bandwidth, layouts), max_slowdown)
    assignment = chosen.assignment
    stages = tuple(tuple(b for b, s in zip(traced.blocks, assignment) if s == k) for k in range(n_stages))
    stage_costs = tuple(sum(c for c, s in zip(per_block, assignment) if s == k) for k in range(n_stages))
    modeled = stage_times(per_block, values, assignment, bandwidth)
    return Plan(stages=stages, costs=stage_costs, cost_unit="s" if cost == "time" else "flop",
                notes={"modeled_step": max(modeled), "main_path_depth": chosen.depth})
