"""What stale inputs cost on a trained model: the fidelity sweep of issue 6, for BENCHMARKS.md.

    python -m benchmarks.fidelity_sweep [--steps 50] [--seeds 4] [--json results/fidelity.json] [--plot results/fidelity.png]
    python -m benchmarks.fidelity_sweep --sweep transfer [--json results/fidelity-transfer.json]
    python -m benchmarks.fidelity_sweep --sweep plans [--model digits-dit] [--json results/fidelity-plans.json]
    python -m benchmarks.fidelity_sweep --sweep compensation --devices 2,3 --steps 25 [--model digits-dit]
    python -m benchmarks.fidelity_sweep --sweep rule --devices 2,3 --steps 25 --seeds 8 [--model digits-dit]
    python -m benchmarks.fidelity_sweep --sweep warmup --devices 2,3 --steps 25 --seeds 8 [--model digits-flow]
    python -m benchmarks.fidelity_sweep --sweep refresh --devices 2,3 --steps 25 --seeds 8 [--model digits-flow]

The shipped trained digits model (``asyncdiff.models.digits``, a DDIM pipeline) generates the same
batches (fixed seeds) sequentially and under every setting: devices N in {2, 3, 4}, stride {1, 2},
warm-up {1, 2, 4, 8}, time shift off/on; then, on 2 devices with warm-up 1, a sequential refresh
every K steps. ``--sweep transfer`` instead runs 2 devices, warm-up 1, with each transfer dtype
(float32, bfloat16, float16, float8). ``--sweep plans`` compares plans on 2 and 3 devices with
warm-up 1 and 2 (issue 10): the default (least stale within 5 % of the fastest modelled step),
the fastest modelled plan, the best contiguous and the best wrapped plan (all from measured
times), and on 2 devices a cut right after the mid block (as the reference implementation
cuts; for ``--model digits-dit``, the class-conditional DiT, a cut after the first half of its
transformer blocks); each with its main-path depth (Note [staleness]). ``--model`` picks the
trained model (a built-in system: ``digits``, the default, ``digits-dit`` or ``digits-flow``); the other sweeps
run on either too. For each: the quality metric (digit-classifier confidence, distinct classes,
Fréchet distance of classifier features to the real digits), the deviation from the sequential
images (PSNR, max abs), and the denoising loop's time.

``--sweep rule`` (issue 26) runs the default plan as users get it, chosen in the workers on the
real call (the fidelity rule, Note [fidelity rule]: the first generation measures it), against
the old default (the depth rule) and a hand cut (``hand``: the mid-block cut on 2 devices, and on
3 the mid-block cut with the up blocks halved; the DiT's transformer blocks in halves or thirds),
each with compensation off and ``auto``, at warm-up 1 and 2; with the speed-up against the
sequential loop in the same run.

``--sweep warmup`` (issue 26, Note [relative warm-up]) runs the default plan (as users get it) at
warm-up 1, 2 and the fractions 0.1 and 0.2 of the steps, compensation off, with the speed-up: the
table ``warm_up="auto"`` was chosen from. ``--model digits-flow`` is the flow-matching MMDiT.

``--sweep refresh`` (issue 26, Note [predicted refresh]) runs the default plan at warm-up 1 with
``refresh_error`` limits, against longer fixed warm-ups, compensation off: each row's sequential
steps (warm-up plus refreshes, per generation) say which rows cost the same time.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from asyncdiff.engine.config import warm_up_steps
from asyncdiff.engine.launch import launch
from asyncdiff.engine.runtime import stages_for

WARM_UPS: tuple[int | float, ...] = (1, 2, 0.1, 0.2)  # --sweep warmup: counts and fractions of the steps
REFRESH_ERRORS = (0.02, 0.016, 0.013)  # --sweep refresh: limits at warm-up 1, among these models' predictions (0.009-0.022)


@dataclass(frozen=True)
class Setting:
    stride: int
    warm_up: int | float | str  # Note [relative warm-up]
    time_shift: bool = False
    refresh_every: int | None = None
    refresh_drift: float | None = None
    transfer_dtype: str | None = None
    plan: str = "flops"  # flops (the sweeps above); the plans sweep: default, fastest, contiguous, wrapped, mid;
    # the rule sweep: fidelity, depth (chosen in the workers from measured times), hand
    plan_json: str | None = None  # the plans sweep: the plan itself, made once in the main process
    compensate: str = "none"  # Note [compensation]
    refresh_error: float | None = None  # Note [predicted refresh]


def _after_mid_block(blocks: tuple[str, ...]) -> int:
    """The U's middle: stage 0 ends with the mid block (as the reference implementation cuts)."""
    return max(i for i, b in enumerate(blocks) if b.startswith("mid_block")) + 1


def _after_half_the_chain(blocks: tuple[str, ...]) -> int:
    """The DiT's middle: stage 0 ends with the last block of the first half of the transformer blocks."""
    index = [int(m.group(1)) if (m := re.match(r"transformer_blocks\.(\d+)\.", b)) else None for b in blocks]
    half = (max(i for i in index if i is not None) + 1) // 2
    return max(k for k, i in enumerate(index) if i is not None and i < half) + 1


def _hand_cut(model: str, blocks: tuple[str, ...], n: int) -> tuple[int, ...]:
    """The hand cut of ``n`` stages: first-block index of stages 1.. (see the module's docstring)."""
    if n == 2:
        return (MIDDLE[model](blocks),)
    if model == "digits":  # after the mid block, then the up blocks halved by count
        first = _after_mid_block(blocks)
        ups = [i for i, b in enumerate(blocks) if b.startswith("up_blocks")]
        return first, ups[len(ups) // 2]
    index = [int(m.group(1)) if (m := re.match(r"transformer_blocks\.(\d+)\.", b)) else None for b in blocks]
    count = max(i for i in index if i is not None) + 1
    return tuple(max(k for k, i in enumerate(index) if i is not None and i < count * j // n) + 1 for j in range(1, n))


# The trained models (built-in systems) the sweep runs on, and where each one's "mid" plan cuts:
# the index of stage 1's first block in the traced block list.
MIDDLE: dict[str, Callable[[tuple[str, ...]], int]] = {
    "digits": _after_mid_block,
    "digits-dit": _after_half_the_chain,
    "digits-flow": _after_half_the_chain,
}


def _generate(pipe: Any, steps: int, seeds: int, first_seed: int = 0, model: str = "digits") -> tuple[torch.Tensor, float]:
    from asyncdiff.models.builders import example_inputs

    batches, seconds = [], 0.0
    for seed in range(first_seed, first_seed + seeds):
        start = time.perf_counter()
        with torch.no_grad():
            out = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt",
                       **example_inputs(model))
        seconds += time.perf_counter() - start
        batches.append(out.images)
    return torch.cat(batches), seconds


def sweep_worker(settings: list[Setting], steps: int, seeds: int,
                 model: str = "digits") -> list[tuple[Setting, torch.Tensor, float, float]]:
    """On every rank of this process group: each setting's images and generation time."""
    from asyncdiff import AsyncDiff
    from asyncdiff.models.builders import system

    pipe = system(model).build("trained", 0)
    results = []
    for setting in settings:
        model_n = stages_for(dist.get_world_size(), setting.stride)
        async_diff = AsyncDiff(pipe, model_n=model_n, stride=setting.stride, warm_up=setting.warm_up,
                               time_shift=setting.time_shift, refresh_every=setting.refresh_every,
                               refresh_drift=setting.refresh_drift, transfer_dtype=setting.transfer_dtype,
                               compensate=setting.compensate, refresh_error=setting.refresh_error,
                               **_plan_options(setting, pipe, model_n))
        # plan once, outside the timing; a plan chosen by measurement measures this real call's warm-up
        _generate(pipe, steps if setting.plan in ("fidelity", "depth") else 2, 1, model=model)
        refreshes = 0
        images, seconds = [], 0.0
        for seed in range(seeds):
            batch, spent = _generate(pipe, steps, 1, first_seed=seed, model=model)
            refreshes += [kind for kind, _ in async_diff.engine.seconds].count("refresh")
            images.append(batch)
            seconds += spent
        depth = _depth(async_diff)
        async_diff.remove()
        results.append((setting, torch.cat(images), seconds, refreshes / seeds, depth,
                        async_diff.engine.plan.to_json()))
    return results


def _plan_options(setting: Setting, pipe: Any, model_n: int) -> dict[str, Any]:
    """AsyncDiff's planning options: FLOP plans for the sweeps, the given plan for the plans sweep."""
    if setting.plan_json is not None:
        from asyncdiff.partition.plan import Plan

        return {"plan": Plan.from_json(setting.plan_json)}
    if setting.plan in ("fidelity", "depth"):  # as users get it: measured times, the rule's own choice
        return {"plan_rule": setting.plan, "replan": True}
    return {"cost": "flops"}


def trained_profile(model: str) -> tuple[Any, str, dict[str, Any], Any, dict[str, Any]]:
    """``model``'s trained pipeline, its denoiser's attribute, the sweep's call, the denoiser traced
    on it, and its blocks' measured costs (as the engine plans on CPU)."""
    from asyncdiff.adapters.capture import capture_denoiser_call
    from asyncdiff.adapters.registry import adapter_for
    from asyncdiff.models.builders import example_inputs, system
    from asyncdiff.partition.profile import profile_blocks
    from asyncdiff.partition.trace import trace_denoiser

    pipe = system(model).build("trained", 0)
    attr = adapter_for(pipe).denoiser
    denoiser = getattr(pipe, attr)
    call = {"output_type": "pt", **example_inputs(model)}
    args, kwargs = capture_denoiser_call(pipe, attr, **call)
    traced = trace_denoiser(denoiser, args, kwargs)
    return pipe, attr, call, traced, profile_blocks(traced, denoiser, args, kwargs, repeats=7)


def sweep_plans(devices: list[int], steps: int,
                model: str = "digits") -> dict[int, list[tuple[str, str, int, dict[int, float], str]]]:
    """Per device count: (kind, plan JSON, main-path depth, predicted drift per warm-up, layout) of each plan
    kind, all made from one measured profile of ``model``'s denoiser in this process and planned for
    gloo as the engine would; every worker then runs exactly these plans."""
    from asyncdiff.partition.auto import auto_plan, plan_depth, plan_layout
    from asyncdiff.engine.local import AsyncSimulator
    from asyncdiff.partition.plan import Plan
    from asyncdiff.partition.report import LINKS
    from asyncdiff.partition.split import split_graph

    from asyncdiff.inspection import final_latents

    pipe, attr, call, traced, costs = trained_profile(model)
    denoiser = getattr(pipe, attr)
    bandwidth = LINKS["gloo"].planner_bandwidth("s")
    reference = final_latents(pipe, attr, None, steps, call)
    found: dict[int, list[tuple[str, str, int, dict[int, float], str]]] = {}
    for n in devices:
        kinds: dict[str, Plan] = {
            "default": auto_plan(traced, costs, n, bandwidth=bandwidth),
            "fastest": auto_plan(traced, costs, n, bandwidth=bandwidth, max_slowdown=0.0),
            "contiguous": auto_plan(traced, costs, n, bandwidth=bandwidth, layouts=("contiguous",)),
            "wrapped": auto_plan(traced, costs, n, bandwidth=bandwidth, layouts=("wrapped",)),
        }
        if n == 2:  # a cut at the model's middle (MIDDLE)
            cut = MIDDLE[model](traced.blocks)
            kinds["mid"] = Plan(stages=(traced.blocks[:cut], traced.blocks[cut:]))
        found[n] = []
        for kind, plan in kinds.items():
            split = split_graph(traced, plan)
            depth = plan_depth(traced, plan)
            drift = {w: float((final_latents(pipe, attr, AsyncSimulator(traced, split, denoiser, w), steps, call)
                               - reference).norm() / reference.norm()) for w in (1, 2)}
            layout = plan_layout(traced, plan)
            found[n].append((kind, plan.to_json(), depth, drift, layout))
    return found


def _depth(async_diff: Any) -> int:
    from asyncdiff.partition.auto import plan_depth

    return plan_depth(next(iter(async_diff.engine._compiled.values())).traced, async_diff.engine.plan)


def main() -> None:
    from asyncdiff.fidelity import classify, deviation, digit_metrics
    from asyncdiff.models.builders import system

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--devices", default="2,3,4", help="comma-separated device counts to sweep")
    parser.add_argument("--sweep", default="all", choices=("all", "transfer", "plans", "compensation", "rule", "warmup",
                                                          "refresh"),
                        help="all: devices x stride x warm-up x time shift, and refresh; transfer: wire dtypes; "
                             "compensation: devices x warm-up 1, 2 x compensate none, linear, auto")
    parser.add_argument("--model", default="digits", choices=sorted(MIDDLE),
                        help="the trained model: the digits UNet, the digits DiT or the flow-matching MMDiT")
    parser.add_argument("--refresh-errors", default=",".join(map(str, REFRESH_ERRORS)),
                        help="--sweep refresh: the refresh_error limits, comma-separated")
    args = parser.parse_args()
    devices = [int(n) for n in args.devices.split(",")]

    torch.set_num_threads(1)
    reference, reference_s = _generate(system(args.model).build("trained", 0), args.steps, args.seeds,
                                       model=args.model)
    rows: list[dict[str, Any]] = [{"devices": 1, "stride": 1, "warm_up": args.steps, "time_shift": False,
                                   "refresh_every": None, "refresh_drift": None, "transfer_dtype": None,
                                   "refreshes": 0.0,
                                   "seconds": reference_s, **digit_metrics(reference),
                                   "psnr": float("inf"), "max_abs": 0.0}]
    plans: dict[int, list[Setting]] = {
        n: [Setting(stride, warm_up, shift) for stride in (1, 2) if stages_for(n, stride) >= 2
            for warm_up in (1, 2, 4, 8) for shift in (False, True)]
        for n in devices
    }
    if 2 in plans:
        plans[2] += [Setting(1, 1, False, k) for k in (2, 3, 5, 10)]
        plans[2] += [Setting(1, 1, False, None, d) for d in (0.02, 0.05, 0.1)]
    if args.sweep == "transfer":
        plans = {2: [Setting(1, 1, transfer_dtype=wire) for wire in (None, "bfloat16", "float16", "float8")]}
    if args.sweep == "compensation":
        plans = {n: [Setting(1, w, compensate=c) for w in (1, 2) for c in ("none", "linear", "auto")] for n in devices}
    if args.sweep == "rule":
        blocks = trained_profile(args.model)[3].blocks
        plans = {}
        for n in devices:
            starts = (0, *_hand_cut(args.model, blocks, n), len(blocks))
            hand = json.dumps({"stages": [list(blocks[a:b]) for a, b in zip(starts, starts[1:])]})
            plans[n] = [Setting(1, w, plan=kind, plan_json=hand if kind == "hand" else None, compensate=c)
                        for w in (1, 2) for c in ("none", "auto") for kind in ("fidelity", "depth", "hand")]
    if args.sweep == "warmup":
        plans = {n: [Setting(1, w, plan="fidelity") for w in WARM_UPS] for n in devices}
    if args.sweep == "refresh":
        plans = {n: [Setting(1, w, plan="fidelity") for w in (1, 2, 3, 4)] +
                 [Setting(1, 1, plan="fidelity", refresh_error=float(e)) for e in args.refresh_errors.split(",")]
                 for n in devices}
    predicted: dict[tuple[int, int, str], float] = {}
    layouts: dict[tuple[int, str], str] = {}
    if args.sweep == "plans":
        made = sweep_plans([n for n in devices if n <= 3], args.steps, args.model)
        plans = {n: [Setting(1, w, plan=kind, plan_json=text) for w in (1, 2) for kind, text, _, _, _ in made[n]]
                 for n in made}
        predicted = {(n, w, kind): drift[w] for n in made for kind, _, _, drift, _ in made[n] for w in drift}
        layouts = {(n, kind): layout for n in made for kind, _, _, _, layout in made[n]}
    for n, settings in plans.items():
        for setting, images, seconds, refreshes, depth, used in launch(sweep_worker, n, settings, args.steps,
                                                                       args.seeds, args.model)[0]:
            stages = [len(s) for s in json.loads(used)["stages"]]
            rows.append({"devices": n, **asdict(setting), "warm_up_steps": warm_up_steps(setting.warm_up, args.steps),
                         "refreshes": refreshes, "seconds": seconds, "depth": depth,
                         "stages": stages, "speedup": reference_s / seconds,
                         "predicted_drift": predicted.get((n, setting.warm_up, setting.plan)),
                         "layout": layouts.get((n, setting.plan), "contiguous"),
                         **digit_metrics(images), **deviation(images, reference),
                         "same_digit": float((classify(images)[0] == classify(reference)[0]).float().mean())})
            row = rows[-1]
            print(f"N={n} {setting} depth {depth}: confidence {row['confidence']:.3f} classes {row['classes']} "
                  f"frechet {row['frechet']:.2f} psnr {row['psnr']:.1f} dB max_abs {row['max_abs']:.3f} "
                  f"{seconds:.2f} s", flush=True)
    if args.sweep == "rule":
        _table(["devices", "warm-up", "compensate", "plan", "blocks per stage", "depth", "PSNR dB", "same digit",
                "confidence", "Fréchet", "speed-up"], "|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
               [[r["devices"], r["warm_up"], r["compensate"], r["plan"], "+".join(map(str, r["stages"])), r["depth"],
                 f"{r['psnr']:.1f}", f"{r['same_digit']:.3f}", f"{r['confidence']:.3f}", f"{r['frechet']:.1f}",
                 f"{r['speedup']:.2f}x"] for r in rows[1:]])
    if args.sweep == "refresh":
        _table(["devices", "warm-up", "refresh_error", "sequential steps", "blocks per stage", "PSNR dB", "same digit",
                "confidence", "Fréchet", "speed-up"], "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
               [[r["devices"], r["warm_up"], r["refresh_error"] if r["refresh_error"] is not None else "-",
                 f"{r['warm_up_steps'] + r['refreshes']:.1f}", "+".join(map(str, r["stages"])), f"{r['psnr']:.1f}",
                 f"{r['same_digit']:.3f}", f"{r['confidence']:.3f}", f"{r['frechet']:.1f}", f"{r['speedup']:.2f}x"]
                for r in rows[1:]])
    if args.sweep == "warmup":
        _table(["devices", "warm-up", "sequential steps", "blocks per stage", "PSNR dB", "same digit", "confidence",
                "Fréchet", "speed-up"], "|---:|---|---:|---|---:|---:|---:|---:|---:|",
               [[r["devices"], r["warm_up"], r["warm_up_steps"], "+".join(map(str, r["stages"])), f"{r['psnr']:.1f}",
                 f"{r['same_digit']:.3f}", f"{r['confidence']:.3f}", f"{r['frechet']:.1f}", f"{r['speedup']:.2f}x"]
                for r in rows[1:]])
    if args.sweep == "plans":
        _table(["devices", "warm-up", "plan", "layout", "main-path depth", "predicted drift", "confidence", "Fréchet",
                "PSNR dB", "max abs", "seconds"], "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
               [[r["devices"], r["warm_up"], r["plan"], r["layout"], r["depth"], f"{r['predicted_drift']:.4f}",
                 f"{r['confidence']:.3f}", f"{r['frechet']:.2f}", f"{r['psnr']:.1f}", f"{r['max_abs']:.3f}",
                 f"{r['seconds']:.2f}"] for r in rows[1:]])
    print("\n| devices | stride | warm-up | time shift | refresh | transfer | compensate | confidence | classes | "
          "Fréchet | PSNR dB | same digit | max abs | seconds |")
    print("|---:|---:|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        refresh = f"every {r['refresh_every']}" if r["refresh_every"] else \
            f"drift {r['refresh_drift']} ({r['refreshes']:.1f} steps)" if r["refresh_drift"] is not None else "-"
        print(f"| {r['devices']} | {r['stride']} | {r['warm_up']} | {'on' if r['time_shift'] else 'off'} | "
              f"{refresh} | {r['transfer_dtype'] or 'float32'} | {r.get('compensate', 'none')} | "
              f"{r['confidence']:.3f} | {r['classes']} | {r['frechet']:.2f} | {r['psnr']:.1f} | "
              f"{r.get('same_digit', 1.0):.3f} | {r['max_abs']:.3f} | {r['seconds']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    if args.plot:
        _plot(rows, args.plot)


def _table(header: list[str], rule: str, cells: list[list[Any]]) -> None:
    """A markdown table: ``header``, its alignment ``rule``, a row per list of ``cells``."""
    print("\n| " + " | ".join(header) + " |")
    print(rule)
    for row in cells:
        print("| " + " | ".join(str(c) for c in row) + " |")


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for n, marker in ((2, "o"), (3, "s"), (4, "^")):
        for stride, style in ((1, "-"), (2, "--")):
            points = sorted((r["warm_up"], r["psnr"], r["frechet"]) for r in rows
                            if r["devices"] == n and r["stride"] == stride and not r["time_shift"]
                            and not r["refresh_every"] and r["refresh_drift"] is None)
            if points:
                warm, psnr, frechet = zip(*points)
                axes[0].plot(warm, psnr, style, marker=marker, label=f"N={n} stride {stride}")
                axes[1].plot(warm, frechet, style, marker=marker, label=f"N={n} stride {stride}")
    axes[1].axhline(rows[0]["frechet"], color="grey", linestyle=":", label="sequential")
    axes[0].set_xlabel("warm-up steps")
    axes[0].set_ylabel("PSNR against sequential (dB)")
    axes[1].set_xlabel("warm-up steps")
    axes[1].set_ylabel("Fréchet distance to real digits")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
