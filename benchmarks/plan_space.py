"""Every 2-stage plan of a trained model whose modelled step is within a margin of the fastest,
run under the engine's schedule in one process (issue 10: is there a plan that wins by both
fidelity measures?).

    python -m benchmarks.plan_space [--model digits] [--steps 50] [--seeds 4] [--warm-up 1] [--margin 0.05] [--json PATH]

The trained model's denoiser is traced and its blocks timed once (as the engine plans on CPU,
for gloo). Every contiguous cut and every wrapped plan (stage 0 runs a head and a tail, stage 1
the middle) is modelled; those within ``--margin`` of the fastest modelled step run the same
seeded batches as the sequential pipeline, with :class:`~asyncdiff.engine.local.AsyncSimulator`
standing in for the denoiser: the engine's own programs for that plan, so the images are the
engine's (tests/test_drift.py). Each gets the digit metrics (classifier confidence, Fréchet
distance), the deviation from the sequential images (PSNR), its main-path depth (Note
[staleness]) and its predicted drift (Note [predicted drift], seed 0).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

__all__ = ["main", "plan_space"]


def _images(pipe: Any, attr: str, simulator: Any, steps: int, seeds: int, model: str, make: Any) -> torch.Tensor:
    """The batches of seeds ``0..seeds-1``, the denoiser's outputs replaced by a fresh simulator's per run."""
    from asyncdiff.models.builders import example_inputs

    batches = []
    for seed in range(seeds):
        sim = make() if simulator else None
        handle = getattr(pipe, attr).register_forward_hook(
            lambda _, args, kwargs, out, sim=sim: sim(*args, **kwargs) if sim is not None else out, with_kwargs=True)
        try:
            with torch.no_grad():
                batches.append(pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                                    output_type="pt", **example_inputs(model)).images)
        finally:
            handle.remove()
    return torch.cat(batches)


def plan_space(model: str = "digits", steps: int = 50, seeds: int = 4, warm_up: int = 1,
               margin: float = 0.05) -> list[dict[str, Any]]:
    """One row per eligible plan, fastest modelled first."""
    from asyncdiff.fidelity import deviation, digit_metrics
    from asyncdiff.inspection import final_latents
    from asyncdiff.partition.auto import _Problem, auto_plan
    from asyncdiff.engine.local import AsyncSimulator
    from asyncdiff.partition.plan import Plan
    from asyncdiff.partition.planner import main_path_depth, stage_times
    from asyncdiff.partition.report import LINKS
    from asyncdiff.partition.split import split_graph
    from benchmarks.fidelity_sweep import trained_profile

    pipe, attr, call, traced, costs = trained_profile(model)
    denoiser = getattr(pipe, attr)
    bandwidth = LINKS["gloo"].planner_bandwidth("s")
    problem = _Problem(traced, costs, "time")
    n = len(problem.costs)
    assignments = [(0,) * k + (1,) * (n - k) for k in range(1, n)]
    assignments += [(0,) * a + (1,) * (b - a) + (0,) * (n - b) for a in range(1, n - 1) for b in range(a + 1, n)]
    modelled = {a: max(stage_times(problem.costs, problem.values, a, bandwidth)) for a in assignments}
    fastest = min(modelled.values())
    eligible = sorted((a for a in assignments if modelled[a] <= fastest * (1 + margin)), key=modelled.__getitem__)
    default = auto_plan(traced, costs, 2, bandwidth=bandwidth)
    sequential = _images(pipe, attr, None, steps, seeds, model, None)
    reference = final_latents(pipe, attr, None, steps, call)
    rows = []
    for units in eligible:
        stage_of = problem.blocks(units)
        plan = Plan(stages=tuple(tuple(b for b, s in zip(traced.blocks, stage_of) if s == k) for k in range(2)))
        split = split_graph(traced, plan)

        def make(split: Any = split) -> AsyncSimulator:
            return AsyncSimulator(traced, split, denoiser, warm_up)

        images = _images(pipe, attr, True, steps, seeds, model, make)
        drift = float((final_latents(pipe, attr, make(), steps, call) - reference).norm() / reference.norm())
        metrics, dev = digit_metrics(images), deviation(images, sequential)
        rows.append({
            "layout": "wrapped" if units[-1] == 0 else "contiguous",
            "stage_1": [b for b, s in zip(traced.blocks, stage_of) if s == 1],
            "blocks_per_stage": [len(s) for s in plan.stages],
            "modelled_slowdown": modelled[units] / fastest - 1,
            "depth": main_path_depth(problem.values, units),
            "predicted_drift": drift,
            "confidence": metrics["confidence"], "frechet": metrics["frechet"], "psnr": dev["psnr"],
            "default": plan.stages == default.stages,
        })
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "stage_1"}), flush=True)
    seq = digit_metrics(sequential)
    rows.append({"layout": "sequential", "confidence": seq["confidence"], "frechet": seq["frechet"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--warm-up", type=int, default=1)
    parser.add_argument("--margin", type=float, default=0.05)
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    rows = plan_space(ns.model, ns.steps, ns.seeds, ns.warm_up, ns.margin)
    print("| layout | blocks per stage | modelled slowdown | depth | predicted drift | confidence | Fréchet | PSNR dB | default |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows[:-1]:
        print(f"| {r['layout']} | {r['blocks_per_stage']} | {100 * r['modelled_slowdown']:.1f} % | {r['depth']} | "
              f"{r['predicted_drift']:.4f} | {r['confidence']:.3f} | {r['frechet']:.2f} | {r['psnr']:.1f} | "
              f"{'yes' if r['default'] else ''} |")
    print(f"sequential: confidence {rows[-1]['confidence']:.3f}, Fréchet {rows[-1]['frechet']:.2f}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
