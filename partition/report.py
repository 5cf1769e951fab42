"""The step-time model and a partition report: per-stage cost, weights, bytes received.

Modelled step time of an asynchronous step = max over stages of (compute + bytes received per
step / link bandwidth); sequential time = the sum of all stages' compute. FLOPs turn into
seconds through the link preset's device throughput.

Example:
    >>> LINKS["pcie"].bytes_per_s > LINKS["gloo"].bytes_per_s
    True
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from typing import Mapping

from asyncdiff.partition.plan import Plan
from asyncdiff.partition.profile import BlockCost
from asyncdiff.partition.split import SplitDenoiser
from asyncdiff.partition.traced import TracedDenoiser

__all__ = ["LINKS", "Link", "PartitionReport", "StageReport", "build_report"]


@dataclass(frozen=True)
class Link:
    """A link between devices and the devices' sustained throughput (for FLOP costs)."""

    name: str
    bytes_per_s: float
    flops_per_s: float

    def planner_bandwidth(self, cost_unit: str) -> float | None:
        """Bytes per planner cost unit (per second, or per FLOP); None: communication is free."""
        if self.bytes_per_s == float("inf"):
            return None
        return self.bytes_per_s if cost_unit == "s" else self.bytes_per_s / self.flops_per_s

    def seconds(self, cost: float, cost_unit: str) -> float:
        return cost if cost_unit == "s" else cost / self.flops_per_s


LINKS: dict[str, Link] = {
    # one direction of an NVLink 4 GPU pair, and an A100/H100-class GPU at ~40% of fp16 peak. FLOPs
    # are a poor clock on GPUs: an H200 ran SD 1.5's UNet at 56 TFLOP/s and a Flux-size DiT at 431
    # (BENCHMARKS.md, GPU check); plan with cost="time" on the device where it matters
    "nvlink": Link("nvlink", 300e9, 250e12),
    "pcie": Link("pcie", 25e9, 250e12),  # PCIe 4.0 x16, same GPUs
    "gloo": Link("gloo", 2.5e9, 40e9),  # processes on one CPU machine (FACTS.md), one core each
    "none": Link("none", float("inf"), 250e12),  # compute balance only: plan as if transfers were free
}


@dataclass(frozen=True)
class StageReport:
    index: int
    blocks: tuple[str, ...]
    cost: float
    share: float
    params_bytes: int
    recv_bytes: int
    modeled_s: float


@dataclass(frozen=True)
class PartitionReport:
    model: str
    cost_unit: str
    link: str
    stages: tuple[StageReport, ...]
    imbalance: float
    sequential_s: float
    modeled_step_s: float
    speedup: float
    blocks: tuple[tuple[str, float, int], ...]  # (block, cost, stage) in program order
    transfers: tuple[tuple[str, int, int, int], ...]  # (value, src, dst, bytes)
    p2p_bytes: int = 0  # bytes all stages send per step, point to point
    broadcast_bytes: int = 0  # what broadcasting every block's output to every other rank would send
    source: str = ""  # where the plan came from: "given", "measured now, saved to PATH", "cached at PATH"
    main_path_depth: int = 0  # stage crossings from the latent to the output (Note [staleness])
    # the plans weighed: (layout, modelled s, main-path depth, predicted drift or None, predicted error or None,
    # chosen); the error is Note [predicted error]'s, the drift Note [predicted drift]'s
    candidates: tuple[tuple[str, float, int, float | None, float | None, bool], ...] = ()
    trace_notes: tuple[str, ...] = ()  # what the tracer did beyond tracing (TracedDenoiser.notes)
    schedule: str = ""  # the first steps' programs per rank (Note [schedule as program])

    def to_json(self) -> str:
        data = asdict(self)
        data["stages"] = [asdict(s) for s in self.stages]
        return json.dumps(data, indent=1)

    def table(self) -> str:
        unit = self.cost_unit
        rows = [f"{self.model}: {len(self.blocks)} blocks, {len(self.stages)} stages, cost in {unit}, link {self.link}",
                f"{'stage':>5} {'blocks':>6}  {'first .. last block':<58} {'cost':>11} {'share':>6} "
                f"{'params MB':>9} {'recv MB':>8} {'model s':>9}"]
        for s in self.stages:
            span = f"{s.blocks[0]} .. {s.blocks[-1]}"
            rows.append(f"{s.index:>5} {len(s.blocks):>6}  {span:<58} {s.cost:>11.4g} {s.share:>6.1%} "
                        f"{s.params_bytes / 1e6:>9.1f} {s.recv_bytes / 1e6:>8.3f} {s.modeled_s:>9.4g}")
        rows.append(f"imbalance (max/mean stage cost) {self.imbalance:.3f}; modelled step {self.modeled_step_s:.4g} s "
                    f"vs sequential {self.sequential_s:.4g} s: speed-up {self.speedup:.2f}x")
        if self.source:
            rows.append(f"plan: {self.source}; main-path depth {self.main_path_depth} (the output is "
                        f"{self.main_path_depth} step{'s' if self.main_path_depth != 1 else ''} behind the latent "
                        "after warm-up)")
        for layout, step, depth, drift, error, chosen in self.candidates:
            rows.append(f"  considered {layout:<10} modelled step {step:.4g} s, speed-up "
                        f"{self.sequential_s / step if step else 1.0:.2f}x, main-path depth {depth}"
                        + (f", predicted error {error:.4g}" if error is not None else "")
                        + (f", predicted drift {drift:.4f}" if drift is not None else "") + (" <- chosen" if chosen else ""))
        rows.extend(f"trace: {note}" for note in self.trace_notes)
        if self.schedule:
            rows.append("schedule at warm-up 1, stride 1 (what each rank executes; sK runs segment K, [t-a] on "
                        "values other stages sent a steps ago; Note [schedule as program]):")
            rows.extend("  " + line for line in self.schedule.splitlines())
        if self.broadcast_bytes:
            rows.append(f"sent per step: {self.p2p_bytes / 1e6:.3f} MB point to point, "
                        f"{self.p2p_bytes / self.broadcast_bytes:.1%} of the {self.broadcast_bytes / 1e6:.1f} MB "
                        "that broadcasting every block's output to every rank would send")
        return "\n".join(rows)

    def html(self) -> str:
        """The blocks in program order (width ~ cost, colour = stage) and the edges that cross stages."""
        colours = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"]
        total = sum(c for _, c, _ in self.blocks) or 1.0
        width, x, boxes, centre = 1400.0, 0.0, [], {}
        for name, cost, stage in self.blocks:
            w = max(2.0, width * cost / total)
            boxes.append(f'<rect x="{x:.1f}" y="120" width="{w:.1f}" height="40" fill="{colours[stage % 8]}" '
                         f'stroke="white"><title>{html.escape(name)}: {cost:.4g} {self.cost_unit}, stage {stage}'
                         f"</title></rect>")
            centre[name] = x + w / 2
            x += w
        boundary = {}
        for i, (name, _, stage) in enumerate(self.blocks):
            if i + 1 < len(self.blocks) and self.blocks[i + 1][2] != stage:
                boundary[stage, self.blocks[i + 1][2]] = centre[name]
        arcs = []
        for value, src, dst, nbytes in self.transfers:
            x0 = boundary.get((src, dst), centre.get(self.stages[src].blocks[-1], 0.0))
            x1 = centre.get(self.stages[dst].blocks[0], x0)
            lift = 20 + min(100.0, abs(x1 - x0) / 6)
            arcs.append(f'<path d="M {x0:.1f} 120 C {x0:.1f} {120 - lift:.1f}, {x1:.1f} {120 - lift:.1f}, {x1:.1f} 120" '
                        f'fill="none" stroke="#333" stroke-width="{1 + min(4.0, nbytes / 2e6):.1f}">'
                        f"<title>{html.escape(value)}: stage {src} -> {dst}, {nbytes / 1e6:.3f} MB</title></path>")
        legend = "".join(f'<span style="background:{colours[s.index % 8]};color:white;padding:2px 6px;margin:4px">'
                         f"stage {s.index}: {len(s.blocks)} blocks, {s.share:.1%}</span>" for s in self.stages)
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>asyncdiff plan: {html.escape(self.model)}"
                f"</title></head><body style='font-family:sans-serif'><h2>{html.escape(self.model)}</h2><p>{legend}</p>"
                f"<p>imbalance {self.imbalance:.3f}, modelled speed-up {self.speedup:.2f}x ({self.link})</p>"
                f"<svg width='{width + 20:.0f}' height='180'>{''.join(arcs)}{''.join(boxes)}</svg>"
                f"<pre>{html.escape(self.table())}</pre></body></html>")


def build_report(model: str, traced: TracedDenoiser, costs: Mapping[str, BlockCost], plan: Plan,
                 split: SplitDenoiser, link: Link) -> PartitionReport:
    unit = plan.cost_unit or "s"

    def cost_of(block: str) -> float:
        return costs[block].seconds if unit == "s" else float(costs[block].flops)

    stage_costs = [sum(cost_of(b) for b in stage) for stage in plan.stages]
    total = sum(stage_costs) or 1.0
    stages = []
    for k, stage in enumerate(plan.stages):
        recv = sum(t.spec.nbytes for t in split.transfers if t.dst == k)
        stages.append(StageReport(
            index=k, blocks=stage, cost=stage_costs[k], share=stage_costs[k] / total,
            params_bytes=sum(costs[b].param_bytes for b in stage), recv_bytes=recv,
            modeled_s=link.seconds(stage_costs[k], unit) + recv / link.bytes_per_s,
        ))
    step = max(s.modeled_s for s in stages)
    sequential = link.seconds(sum(stage_costs), unit)
    mean = sum(stage_costs) / len(stage_costs)
    return PartitionReport(
        model=model, cost_unit=unit, link=link.name, stages=tuple(stages),
        imbalance=max(stage_costs) / mean if mean else 1.0, sequential_s=sequential, modeled_step_s=step,
        speedup=sequential / step if step else 1.0,
        blocks=tuple((b, cost_of(b), plan.stage_of(b)) for b in traced.blocks),
        transfers=tuple((t.value, t.src, t.dst, t.spec.nbytes) for t in split.transfers),
        p2p_bytes=sum(t.spec.nbytes for t in split.transfers),
        broadcast_bytes=sum(costs[b].out_bytes for b in traced.blocks) * (plan.model_n - 1),
    )
