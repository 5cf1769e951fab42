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

import torch.fx

from asyncdiff.partition.plan import Plan
from asyncdiff.partition.planner import LAYOUTS, Value, best_assignment, stage_times
from asyncdiff.partition.profile import BlockCost
from asyncdiff.partition.trace import TracedDenoiser

__all__ = ["COSTS", "auto_plan", "block_values"]

COSTS = ("time", "flops")


def block_values(traced: TracedDenoiser, costs: Mapping[str, BlockCost]) -> list[Value]:
    """Block-level dataflow: each block's output, and the blocks that read it (through glue ops
    such as ``torch.cat`` or indexing, so skip connections appear as edges)."""
    index = {traced.block_node[b]: i for i, b in enumerate(traced.blocks)}
    nodes = {n.name: n for n in traced.graph.nodes}
    values = []
    for block, i in ((b, index[traced.block_node[b]]) for b in traced.blocks):
        consumers: set[int] = set()
        frontier: list[torch.fx.Node] = list(nodes[traced.block_node[block]].users)
        seen: set[str] = set()
        while frontier:
            node = frontier.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.name in index:
                consumers.add(index[node.name])
            elif node.op != "output":
                frontier.extend(node.users)
        values.append(Value(i, tuple(sorted(consumers)), costs[block].out_bytes))
    return values


def auto_plan(traced: TracedDenoiser, costs: Mapping[str, BlockCost], n_stages: int, *,
              cost: str = "time", bandwidth: float | None = None, layouts: Sequence[str] = LAYOUTS) -> Plan:
    """The best plan of ``traced``'s blocks into ``n_stages`` stages over ``layouts``.

    ``cost``: ``"time"`` (measured seconds) or ``"flops"``; ``bandwidth`` in bytes per cost unit
    (None: plan for compute only).
    """
    if cost not in COSTS:
        raise ValueError(f"cost={cost!r} is not a cost model; use one of {COSTS}")
    per_block = [costs[b].seconds if cost == "time" else float(costs[b].flops) for b in traced.blocks]
    values = block_values(traced, costs)
    assignment = best_assignment(per_block, values, n_stages, bandwidth, layouts)
    stages = tuple(tuple(b for b, s in zip(traced.blocks, assignment) if s == k) for k in range(n_stages))
    stage_costs = tuple(sum(c for c, s in zip(per_block, assignment) if s == k) for k in range(n_stages))
    modeled = stage_times(per_block, values, assignment, bandwidth)
    return Plan(stages=stages, costs=stage_costs, cost_unit="s" if cost == "time" else "flop",
                notes={"modeled_step": max(modeled)})
