"""Everything one GPU can prove about asyncdiff, in one command (a compact table + full JSON).

    python -m benchmarks.gpu_check [--out DIR] [--budget-s 300] [--models sd15,sdxl,sd3,flux]

Sections, in order (each writes its rows to ``DIR/gpu_check.json`` as soon as it ends, so a run
cut short still leaves what it measured):

1. ``tests``: ``pytest -m gpu`` plus the pack tests, which run the compiled Triton kernels on
   CUDA (bit for bit against the torch reference, float8 included).
2. ``overhead``: ``AsyncEngine(model_n=1)`` against the plain denoiser, full-size SD 1.5 (512 px)
   and SDXL (1024 px) UNets in float16, CFG batch 2; calls alternate, CUDA events, medians.
3. ``profile``: per-block CUDA times for full-size SD 1.5, SDXL, SD3-Medium and a Flux.1-size
   DiT; the plans for 2/4/8 stages that measured times give against FLOP-balanced plans
   (imbalance in measured time), and the step-time model's speed-ups on NVLink and PCIe.
4. ``compile``: the stage programs of a 2-stage SD 1.5 plan under ``torch.compile`` (default
   and ``reduce-overhead``, i.e. CUDA graphs): does a stage compile, is it the same, what it gains.
5. ``memory``: per stage of 2-stage SDXL and Flux plans, the weights a rank keeps and the peak
   CUDA memory of running that stage alone; ``loading``: a saved full-size SD 1.5 pipeline loaded
   by the stage-only loader (Note [stage-only loading]) for each stage of 2, and loaded on the CPU
   then given to what ``AsyncDiff(pipeline)`` does on a GPU (``stage_in_memory``: plan, move only
   the stage), against loading the whole pipeline: the denoiser bytes each holds on the device and
   the peak CUDA memory of the load.

Without CUDA the same sections run in a reduced form (``tiny`` sizes, float32, CPU, the
``aot_eager`` compile backend, no pytest) so that CI keeps the script working. Sections are
skipped, and say so, once ``--budget-s`` is spent.

Weights are random (seeded): times do not depend on weight values. UNets run in float16 as
served; SD3 and Flux in bfloat16. Attention is diffusers' default (SDPA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from asyncdiff.engine.runtime import AsyncEngine, EngineConfig
from asyncdiff.partition.auto import auto_plan, plan_layout
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.profile import BlockCost, profile_blocks
from asyncdiff.partition.report import LINKS, build_report
from asyncdiff.partition.split import SplitDenoiser, split_graph
from asyncdiff.partition.trace import trace_denoiser
from asyncdiff.partition.traced import TracedDenoiser

__all__ = ["MODELS", "main"]

STAGES = (2, 4, 8)


# -- the denoisers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Denoiser:
    """A denoiser built on ``device`` with random weights, and one call of it as its pipeline makes it."""

    name: str
    module: torch.nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    latent: str
    what: str


def _randn(*shape: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype)


def _built(make: Callable[[], torch.nn.Module], device: str, dtype: torch.dtype) -> torch.nn.Module:
    """``make()`` with its weights created on ``device`` in ``dtype`` (a 12 B model never exists in float32)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = make()
    finally:
        torch.set_default_dtype(default)
    return module.to(dtype).eval().requires_grad_(False)


def sd15(full: bool, device: str, dtype: torch.dtype) -> Denoiser:
    from asyncdiff.models import sd

    spec = sd.SIZES["full" if full else "tiny"]
    unet = _built(lambda: sd.sd15_unet(spec), device, dtype)
    s = spec.resolution // 8
    args = (_randn(2, 4, s, s, device=device, dtype=dtype), torch.tensor(501, device=device))
    kwargs = {"encoder_hidden_states": _randn(2, 77, spec.text_width, device=device, dtype=dtype),
              "return_dict": False}
    return Denoiser("sd15", unet, args, kwargs, "sample", f"SD 1.5 UNet, {spec.resolution} px, CFG batch 2")


def sdxl(full: bool, device: str, dtype: torch.dtype) -> Denoiser:
    from asyncdiff.models import sdxl as xl

    spec = xl.SIZES["full" if full else "tiny"]
    unet = _built(lambda: xl.sdxl_unet(spec), device, dtype)
    s = spec.resolution // spec.vae_scale
    added = {"text_embeds": _randn(2, spec.text_widths[1], device=device, dtype=dtype),
             "time_ids": torch.tensor([[spec.resolution, spec.resolution, 0, 0, spec.resolution, spec.resolution]] * 2,
                                      device=device, dtype=dtype)}
    args = (_randn(2, 4, s, s, device=device, dtype=dtype), torch.tensor(501, device=device))
    kwargs = {"encoder_hidden_states": _randn(2, 77, sum(spec.text_widths), device=device, dtype=dtype),
              "added_cond_kwargs": added, "return_dict": False}
    return Denoiser("sdxl", unet, args, kwargs, "sample", f"SDXL UNet, {spec.resolution} px, CFG batch 2")


def sd3(full: bool, device: str, dtype: torch.dtype) -> Denoiser:
    from asyncdiff.models import sd3 as m

    spec = m.SIZES["full" if full else "tiny"]
    transformer = _built(lambda: m.sd3_transformer(spec), device, dtype)
    s = spec.resolution // 8
    tokens = 77 + 256 if full else 77  # CLIP + T5 tokens, as the pipeline concatenates them
    kwargs = {"hidden_states": _randn(2, m.LATENT_CHANNELS, s, s, device=device, dtype=dtype),
              "encoder_hidden_states": _randn(2, tokens, spec.joint_attention_dim, device=device, dtype=dtype),
              "pooled_projections": _randn(2, sum(spec.text_widths), device=device, dtype=dtype),
              "timestep": torch.full((2,), 501.0, device=device), "return_dict": False}
    return Denoiser("sd3", transformer, (), kwargs, "hidden_states",
                    f"SD3-Medium transformer, {spec.resolution} px, CFG batch 2")


def flux(full: bool, device: str, dtype: torch.dtype) -> Denoiser:
    """FLUX.1-dev's transformer shape (12 B parameters; guidance distilled: batch 1, no CFG)."""
    from diffusers import FluxTransformer2DModel

    if full:
        config = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                      joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
        resolution, text_tokens = 1024, 512
    else:
        config = dict(num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
                      joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
        resolution, text_tokens = 64, 16
    transformer = _built(lambda: FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True, **config),
                         device, dtype)
    side = resolution // 16  # VAE /8, then 2x2 latent patches packed into 64 channels
    image_ids = torch.zeros(side, side, 3, device=device)
    image_ids[..., 1] = torch.arange(side, device=device)[:, None]
    image_ids[..., 2] = torch.arange(side, device=device)[None, :]
    kwargs = {"hidden_states": _randn(1, side * side, 64, device=device, dtype=dtype),
              "encoder_hidden_states": _randn(1, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype),
              "pooled_projections": _randn(1, config["pooled_projection_dim"], device=device, dtype=dtype),
              "timestep": torch.full((1,), 0.5, device=device), "img_ids": image_ids.reshape(-1, 3),
              "txt_ids": torch.zeros(text_tokens, 3, device=device), "guidance": torch.full((1,), 3.5, device=device),
              "return_dict": False}
    return Denoiser("flux", transformer, (), kwargs, "hidden_states",
                    f"FLUX.1-dev-shaped transformer, {resolution} px, batch 1")


MODELS: dict[str, tuple[Callable[[bool, str, torch.dtype], Denoiser], torch.dtype]] = {
    "sd15": (sd15, torch.float16), "sdxl": (sdxl, torch.float16),
    "sd3": (sd3, torch.bfloat16), "flux": (flux, torch.bfloat16),
}


# -- timing ---------------------------------------------------------------------------------------
class Timer:
    """Wall time of ``fn()`` on ``device``: CUDA events on a GPU, ``perf_counter`` on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def interleaved_medians(a: Callable[[], Any], b: Callable[[], Any], timer: Timer, rounds: int,
                        warmup: int = 2) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, run in alternating order (ab, ba, ...) after ``warmup`` pairs."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + rounds):
        order = ((0, a), (1, b)) if i % 2 == 0 else ((1, b), (0, a))
        for k, fn in order:
            s = timer(fn)
            if i >= warmup:
                times[k].append(s)
    return statistics.median(times[0]), statistics.median(times[1])


# -- sections -------------------------------------------------------------------------------------
@dataclass
class Context:
    device: str
    full: bool
    models: tuple[str, ...]
    deadline: float
    rounds: int
    out: Path
    results: dict[str, Any]

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def build(self, name: str) -> Denoiser:
        make, dtype = MODELS[name]
        return make(self.full, self.device, dtype if self.device == "cuda" else torch.float32)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))


def run_tests(ctx: Context) -> list[dict[str, Any]]:
    """pytest -m gpu, and the pack tests (compiled Triton kernels on CUDA)."""
    if ctx.device != "cuda":
        return [{"suite": "pytest", "status": "skipped: no CUDA (CI runs the CPU tests)"}]
    rows = []
    root = Path(__file__).resolve().parents[1]
    for name, selection in (("pytest -m gpu", ["-m", "gpu", "tests"]),
                            ("pack + Triton kernels", ["tests/test_pack.py", "tests/test_triton_pack.py"])):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", "-rfEs", "--tb=short", *selection],
                              cwd=root, capture_output=True, text=True, timeout=max(30.0, ctx.remaining()))
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        rows.append({"suite": name, "returncode": proc.returncode, "summary": lines[-1] if lines else "",
                     "seconds": round(time.perf_counter() - start, 1),
                     "failures": [line for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED"))][:20],
                     "tail": proc.stdout[-3000:] + proc.stderr[-2000:] if proc.returncode else ""})
    return rows


def run_overhead(ctx: Context) -> list[dict[str, Any]]:
    """AsyncEngine(model_n=1) against the plain denoiser, alternating calls, medians."""
    rows = []
    timer = Timer(ctx.device)
    for name in ("sd15", "sdxl"):
        d = ctx.build(name)
        engine = AsyncEngine(d.module, EngineConfig(model_n=1, cost="flops"), latent=d.latent)
        with torch.no_grad():
            reference = d.module(*d.args, **d.kwargs)[0]
            start = time.perf_counter()
            first = engine(*d.args, **d.kwargs)[0]
            first_s = time.perf_counter() - start
            plain_s, engine_s = interleaved_medians(lambda: d.module(*d.args, **d.kwargs),
                                                    lambda: engine(*d.args, **d.kwargs), timer, ctx.rounds)
        rows.append({"model": name, "what": d.what, "dtype": str(d.args[0].dtype).removeprefix("torch."),
                     "engine": "eager", "plain_ms": plain_s * 1e3, "engine_ms": engine_s * 1e3,
                     "ratio": engine_s / plain_s, "same_output": bool(torch.equal(first, reference)),
                     "max_abs_diff": float((first.float() - reference.float()).abs().max()),
                     "first_call_s": first_s, "rounds": ctx.rounds})
        if name == "sd15" and ctx.device == "cuda" and ctx.remaining() > 120:  # EngineConfig(compile=True)
            engine = AsyncEngine(d.module, EngineConfig(model_n=1, cost="flops", compile=True), latent=d.latent)
            with torch.no_grad():
                start = time.perf_counter()
                first = engine(*d.args, **d.kwargs)[0]
                first_s = time.perf_counter() - start
                plain_s, engine_s = interleaved_medians(lambda: d.module(*d.args, **d.kwargs),
                                                        lambda: engine(*d.args, **d.kwargs), timer, ctx.rounds)
            rows.append({**rows[-1], "engine": "compile=True", "plain_ms": plain_s * 1e3, "engine_ms": engine_s * 1e3,
                         "ratio": engine_s / plain_s, "same_output": bool(torch.equal(first, reference)),
                         "max_abs_diff": float((first.float() - reference.float()).abs().max()),
                         "first_call_s": first_s})
        d = engine = reference = first = None  # free this model before building the next
        _free(ctx.device)
    return rows


def _measured(plan: Plan, traced: TracedDenoiser, costs: dict[str, BlockCost]) -> Plan:
    """``plan``'s stages with their measured seconds as costs."""
    seconds = tuple(sum(costs[b].seconds for b in stage) for stage in plan.stages)
    return Plan(stages=plan.stages, costs=seconds, cost_unit="s", notes=plan.notes)


def run_profile(ctx: Context) -> list[dict[str, Any]]:
    """Per-block times, plans for 2/4/8 stages by time and by FLOPs, modelled speed-ups per link."""
    rows = []
    timer = Timer(ctx.device)
    for name in ctx.models:
        if ctx.remaining() < 30:
            rows.append({"model": name, "status": "skipped: out of budget"})
            continue
        start = time.perf_counter()
        d = ctx.build(name)
        build_s = time.perf_counter() - start
        traced = trace_denoiser(d.module, d.args, d.kwargs, latent=d.latent)
        with torch.no_grad():
            costs = profile_blocks(traced, d.module, d.args, d.kwargs, repeats=3, warmup=1)
            whole_s = statistics.median(timer(lambda: d.module(*d.args, **d.kwargs)) for _ in range(5))
        row: dict[str, Any] = {
            "model": name, "what": d.what, "params_b": sum(p.numel() for p in d.module.parameters()) / 1e9,
            "blocks": len(traced.blocks), "whole_ms": whole_s * 1e3,
            "sum_of_blocks_ms": sum(costs[b].seconds for b in traced.blocks) * 1e3,
            "tflop_per_call": sum(costs[b].flops for b in traced.blocks) / 1e12, "build_s": build_s,
            "block_ms": {b: round(costs[b].seconds * 1e3, 4) for b in traced.blocks},
            "plans": [],
        }
        row["achieved_tflops"] = row["tflop_per_call"] / whole_s
        for n in STAGES:
            if n > len(traced.blocks):
                continue
            flop_plan = _measured(auto_plan(traced, costs, n, cost="flops"), traced, costs)
            for link in ("nvlink", "pcie"):
                plan = auto_plan(traced, costs, n, cost="time", bandwidth=LINKS[link].planner_bandwidth("s"))
                report = build_report(name, traced, costs, plan, split_graph(traced, plan), LINKS[link])
                flop_report = build_report(name, traced, costs, flop_plan, split_graph(traced, flop_plan), LINKS[link])
                row["plans"].append({
                    "stages": n, "link": link, "layout": plan_layout(traced, plan), "imbalance": plan.imbalance,
                    "speedup": report.speedup, "flop_plan_layout": plan_layout(traced, flop_plan),
                    "flop_plan_imbalance": flop_plan.imbalance, "flop_plan_speedup": flop_report.speedup,
                    "recv_mb_max": max(s.recv_bytes for s in report.stages) / 1e6,
                    "stage_ms": [round(c * 1e3, 3) for c in plan.costs],
                    "cuts": [[s[0], s[-1]] for s in plan.stages]})
        rows.append(row)
        if name in ("sdxl", "flux"):
            ctx.results.setdefault("memory", []).extend(run_memory(ctx, d, traced, costs))
        d = traced = costs = None  # free this model before building the next
        _free(ctx.device)
        ctx.results["profile"] = rows
        ctx.save()
    return rows


def _segment_inputs(split: SplitDenoiser, d: Denoiser, traced: TracedDenoiser) -> dict[int, list[torch.Tensor]]:
    """Every segment's tensors (call tensors, then received values), running the split in order."""
    tensors = traced.flatten_call(d.args, d.kwargs)
    values: dict[str, Any] = {}
    inputs = {}
    with torch.no_grad():
        for seg in split.segments:
            inputs[seg.index] = [*tensors, *[values[v] for v in seg.inputs]]
            outputs, _ = seg.module(d.module)(*inputs[seg.index])
            values.update(zip(seg.outputs, outputs))
    return inputs


def _stage_runner(modules: list[Callable[..., Any]], inputs: list[list[torch.Tensor]]) -> Callable[[], Any]:
    def run() -> Any:
        return [m(*x) for m, x in zip(modules, inputs)]
    return run


def run_compile(ctx: Context) -> list[dict[str, Any]]:
    """Each stage of a 2-stage SD 1.5 plan, eager and under torch.compile: compiles?, same output?, speed."""
    timer = Timer(ctx.device)
    d = ctx.build("sd15")
    traced = trace_denoiser(d.module, d.args, d.kwargs, latent=d.latent)
    with torch.no_grad():
        costs = profile_blocks(traced, d.module, d.args, d.kwargs, repeats=3, warmup=1)
    plan = auto_plan(traced, costs, 2, cost="time", layouts=("contiguous",))
    split = split_graph(traced, plan)
    inputs = _segment_inputs(split, d, traced)
    modes = ("default", "reduce-overhead") if ctx.device == "cuda" else ("aot_eager",)
    rows = []
    for program in split.stages:
        eager = [seg.module(d.module) for seg in program.segments]
        seg_inputs = [inputs[seg.index] for seg in program.segments]
        with torch.no_grad():
            want = _stage_runner(eager, seg_inputs)()
        for mode in modes:
            if ctx.remaining() < 45:
                rows.append({"model": d.name, "stage": program.index, "mode": mode, "status": "skipped: out of budget"})
                continue
            row: dict[str, Any] = {"model": d.name, "stage": program.index, "mode": mode, "blocks": len(program.blocks)}
            try:
                torch._dynamo.reset()
                options = {"backend": mode} if mode == "aot_eager" else {"mode": mode}
                compiled = [torch.compile(m, fullgraph=False, **options) for m in eager]
                run = _stage_runner(compiled, seg_inputs)
                start = time.perf_counter()
                with torch.no_grad():
                    got = run()
                    got = run()  # reduce-overhead records its CUDA graph on the second call
                    _sync(ctx.device)
                row["compile_s"] = time.perf_counter() - start
                row["max_abs_diff"] = max(float((g.float() - w.float()).abs().max())
                                          for gs, ws in zip(got, want) for g, w in zip(_leaves(gs), _leaves(ws)))
                with torch.no_grad():
                    eager_s, compiled_s = interleaved_medians(_stage_runner(eager, seg_inputs), run, timer, ctx.rounds)
                row.update({"eager_ms": eager_s * 1e3, "compiled_ms": compiled_s * 1e3,
                            "speedup": eager_s / compiled_s, "graph_breaks": _graph_breaks(), "status": "ok"})
            except Exception as err:  # a finding, not a crash: report it and go on
                row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            rows.append(row)
    return rows


def _leaves(value: Any) -> list[torch.Tensor]:
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _graph_breaks() -> int:
    counters = torch._dynamo.utils.counters
    return int(sum(counters["graph_break"].values()))


def run_memory(ctx: Context, d: Denoiser, traced: TracedDenoiser, costs: dict[str, BlockCost]) -> list[dict[str, Any]]:
    """Per stage of a 2-stage plan: weights it keeps, and the peak memory of running it alone."""
    if ctx.remaining() < 20:
        return [{"model": d.name, "status": "skipped: out of budget"}]
    plan = auto_plan(traced, costs, 2, cost="time", bandwidth=LINKS["nvlink"].planner_bandwidth("s"))
    split = split_graph(traced, plan)
    inputs = _segment_inputs(split, d, traced)
    total = sum(p.numel() * p.element_size() for p in d.module.parameters())
    rows = []
    for program in split.stages:
        modules = [seg.module(d.module) for seg in program.segments]
        kept = {id(p): p for m in modules for p in m.parameters()}
        weights = sum(p.numel() * p.element_size() for p in kept.values())
        row = {"model": d.name, "stage": program.index, "weights_gb": weights / 1e9, "model_weights_gb": total / 1e9}
        if ctx.device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                _stage_runner(modules, [inputs[s.index] for s in program.segments])()
            torch.cuda.synchronize()
            row["activation_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
            row["stage_peak_gb"] = row["weights_gb"] + row["activation_peak_gb"]
        rows.append(row)
    return rows


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# -- the table ------------------------------------------------------------------------------------
def table(results: dict[str, Any]) -> str:
    lines = [f"# asyncdiff GPU check on {results['device_name']} (torch {results['torch']}, "
             f"{results['seconds']:.0f} s)"]
    for row in results.get("tests", []):
        lines.append(f"tests    {row['suite']:<24} {row.get('summary') or row.get('status')}")
    for row in results.get("overhead", []):
        lines.append(f"overhead {row['model']:<5} plain {row['plain_ms']:8.2f} ms  engine N=1 {row['engine']:<12} "
                     f"{row['engine_ms']:8.2f} ms  ratio {row['ratio']:.3f}  same output {row['same_output']} "
                     f"(max diff {row['max_abs_diff']:.1e}, first call {row['first_call_s']:.1f} s)")
    for row in results.get("profile", []):
        if "plans" not in row:
            lines.append(f"profile  {row['model']:<5} {row.get('status')}")
            continue
        lines.append(f"profile  {row['model']:<5} {row['params_b']:.2f} B params, {row['blocks']} blocks, "
                     f"whole {row['whole_ms']:.1f} ms, blocks summed {row['sum_of_blocks_ms']:.1f} ms, "
                     f"{row['tflop_per_call']:.1f} TFLOP/call = {row['achieved_tflops']:.0f} TFLOP/s")
        for p in row["plans"]:
            lines.append(f"  N={p['stages']} {p['link']:<6} time plan {p['layout']:<10} imbalance {p['imbalance']:.3f}"
                         f" speed-up {p['speedup']:.2f}x | FLOP plan {p['flop_plan_layout']:<10} imbalance "
                         f"{p['flop_plan_imbalance']:.3f} speed-up {p['flop_plan_speedup']:.2f}x")
    for row in results.get("compile", []):
        if row.get("status") != "ok":
            lines.append(f"compile  {row['model']} stage {row['stage']} {row['mode']:<15} {row.get('status')}")
            continue
        lines.append(f"compile  {row['model']} stage {row['stage']} {row['mode']:<15} eager {row['eager_ms']:.2f} ms "
                     f"compiled {row['compiled_ms']:.2f} ms ({row['speedup']:.2f}x, compile {row['compile_s']:.0f} s, "
                     f"max diff {row['max_abs_diff']:.2e}, graph breaks {row['graph_breaks']})")
    for row in results.get("memory", []):
        if "weights_gb" not in row:
            lines.append(f"memory   {row['model']} {row.get('status')}")
            continue
        peak = f", peak running alone {row['stage_peak_gb']:.2f} GB" if "stage_peak_gb" in row else ""
        lines.append(f"memory   {row['model']} stage {row['stage']} keeps {row['weights_gb']:.3f} of "
                     f"{row['model_weights_gb']:.3f} GB weights{peak}")
    for row in results.get("loading", []):
        peak = f", peak CUDA memory of the load {row['peak_gb']:.2f} GB" if "peak_gb" in row else ""
        lines.append(f"loading  {row['model']} {row['load']:<22} denoiser {row['denoiser_gb']:.3f} GB held{peak} "
                     f"({row['seconds']:.1f} s)")
    for section, error in results.get("errors", {}).items():
        lines.append(f"ERROR    {section}: {error}")
    return "\n".join(lines)


def run_loading(ctx: Context) -> list[dict[str, Any]]:
    """A saved SD 1.5 pipeline loaded whole and stage-only (2 stages): denoiser bytes held, peak memory."""
    import tempfile

    from diffusers import DiffusionPipeline

    from asyncdiff.adapters.loading import load_stage_only, stage_in_memory
    from asyncdiff.models.sd import build_sd15

    dtype = torch.float16 if ctx.device == "cuda" else torch.float32
    device = torch.device(ctx.device)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        build_sd15("full" if ctx.full else "tiny", 0, dtype=dtype).save_pretrained(folder)
        saved_s = time.perf_counter() - start
        for stage, in_memory in ((None, False), (0, False), (1, False), (0, True), (1, True)):
            _free(ctx.device)
            base = torch.cuda.memory_allocated() if ctx.device == "cuda" else 0
            if ctx.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            if stage is None:
                pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
            elif in_memory:  # what AsyncDiff(pipeline) does with a pipeline on the CPU
                pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
                stage_in_memory(pipe, "unet", latent="sample", model_n=2, stage=stage, device=device)
            else:
                pipe = load_stage_only(folder, denoiser_attr=None, latent="sample", model_n=2, stage=stage,
                                       device=device, torch_dtype=dtype).pipeline
            load = "whole" if stage is None else f"{'in memory, ' if in_memory else ''}stage {stage} of 2"
            row: dict[str, Any] = {"model": "sd15", "load": load,
                                   "seconds": time.perf_counter() - start, "build_and_save_s": saved_s,
                                   "denoiser_gb": sum(t.numel() * t.element_size() for t in
                                                      (*pipe.unet.parameters(), *pipe.unet.buffers())) / 1e9}
            if ctx.device == "cuda":
                torch.cuda.synchronize()
                row["peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
            rows.append(row)
            pipe = None  # free before the next load
    return rows


SECTIONS: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
    "tests": run_tests, "overhead": run_overhead, "profile": run_profile, "compile": run_compile,
    "loading": run_loading}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")) / "gpu_check")
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip what would start after this")
    parser.add_argument("--models", default=",".join(MODELS), help=f"profile these, of {','.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds per comparison (0: 20 on CUDA, 3 on CPU)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"some of {','.join(SECTIONS)} (profile also measures memory on SDXL and Flux)")
    args = parser.parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"--models {','.join(sorted(unknown))}: not a model here; use some of {','.join(MODELS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.monotonic()
    ctx = Context(device=device, full=device == "cuda", models=models, deadline=start + args.budget_s,
                  rounds=args.rounds or (20 if device == "cuda" else 3), out=args.out,
                  results={"device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU (reduced form)",
                           "torch": torch.__version__, "seconds": 0.0, "errors": {}})
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    for name in args.sections.split(","):
        if ctx.remaining() < 20:
            ctx.results["errors"][name] = "skipped: out of budget"
            continue
        print(f"[gpu_check] {name} ({ctx.remaining():.0f} s left)", flush=True)
        try:
            ctx.results[name] = SECTIONS[name](ctx)
        except Exception as err:  # report and go on: the other sections still say something
            import traceback

            ctx.results["errors"][name] = f"{type(err).__name__}: {err}"[:1000]
            traceback.print_exc()
        ctx.results["seconds"] = time.monotonic() - start
        ctx.save()
    print(table(ctx.results), flush=True)
    return ctx.results


if __name__ == "__main__":
    main()
