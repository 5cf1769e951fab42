"""A plan: which blocks each stage runs. Pure data; round-trips through JSON.

A plan is made once (on one rank, or before launch) and shared, so that every rank uses the
same cuts: timing profiles differ between processes, and different cuts on different ranks
would silently corrupt the result.

Example:
    >>> plan = Plan(stages=(("conv_in", "down"), ("up", "conv_out")), costs=(1.0, 1.2), cost_unit="s")
    >>> Plan.from_json(plan.to_json()) == plan
    True
    >>> plan.stage_of("up")
    1
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Plan"]


@dataclass(frozen=True)
class Plan:
    stages: tuple[tuple[str, ...], ...]
    costs: tuple[float, ...] = ()
    cost_unit: str = ""
    notes: dict[str, Any] = field(default_factory=dict, compare=False)  # numbers, and the layout

    def __post_init__(self) -> None:
        if not self.stages or any(not s for s in self.stages):
            raise ValueError(f"a plan needs at least one block in every stage, got {self.stages!r}")
        seen: dict[str, int] = {}
        for k, stage in enumerate(self.stages):
            for block in stage:
                if block in seen:
                    raise ValueError(f"block {block!r} is in stage {seen[block]} and in stage {k}; "
                                     "every block belongs to exactly one stage")
                seen[block] = k
        if self.costs and len(self.costs) != len(self.stages):
            raise ValueError(f"plan has {len(self.stages)} stages but {len(self.costs)} costs")

    @property
    def model_n(self) -> int:
        return len(self.stages)

    def stage_of(self, block: str) -> int:
        for k, stage in enumerate(self.stages):
            if block in stage:
                return k
        raise KeyError(f"block {block!r} is in no stage of this plan")

    @property
    def imbalance(self) -> float:
        """Slowest stage over the mean stage (1.0 is perfect balance)."""
        if not self.costs or sum(self.costs) == 0:
            return 1.0
        return max(self.costs) / (sum(self.costs) / len(self.costs))

    def check_covers(self, blocks: Sequence[str]) -> None:
        """Raise unless the plan assigns exactly ``blocks`` (each to one stage)."""
        planned = [b for stage in self.stages for b in stage]
        missing = [b for b in blocks if b not in set(planned)]
        unknown = [b for b in planned if b not in set(blocks)]
        if missing or unknown:
            raise ValueError(
                f"plan does not match the traced denoiser: blocks not in any stage {missing[:5]}, "
                f"unknown blocks {unknown[:5]}; list every traced block exactly once"
            )

    def restricted_to(self, blocks: Sequence[str]) -> Plan:
        """This plan for a call that runs only ``blocks`` (skip-layer guidance leaves some out):
        every block keeps its stage. Blocks the plan does not know, or a stage left without
        blocks, are an error naming them."""
        called = set(blocks)
        unknown = [b for b in blocks if b not in {b for stage in self.stages for b in stage}]
        if unknown:
            self.check_covers(blocks)
        stages = tuple(tuple(b for b in stage if b in called) for stage in self.stages)
        empty = [k for k, stage in enumerate(stages) if not stage]
        if empty:
            raise ValueError(f"this denoiser call skips every block of stage(s) {empty} "
                             f"({list(self.stages[empty[0]])[:3]} ...): a stage would have nothing to run; "
                             f"use fewer stages (model_n) or a plan whose stages all run in every call")
        return Plan(stages, self.costs, self.cost_unit, dict(self.notes))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """A plan from :meth:`to_json`, or from ``asyncdiff inspect --json`` (stages with ``blocks``)."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
            raise ValueError('a plan is a JSON object with "stages": a list of block-name lists '
                             '(or of objects with "blocks", as asyncdiff inspect --json writes)')
        stages = tuple(tuple(s["blocks"] if isinstance(s, dict) else s) for s in data["stages"])
        costs = tuple(s["cost"] for s in data["stages"]) if all(isinstance(s, dict) for s in data["stages"]) \
            else tuple(data.get("costs", ()))
        return cls(stages=stages, costs=costs, cost_unit=data.get("cost_unit", ""), notes=dict(data.get("notes", {})))
