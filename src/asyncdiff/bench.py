"""End-to-end speed and fidelity: the sequential reference against parallel settings.

Every setting runs the same pipeline, seed and prompt in fresh processes; speed-up is the
sequential loop time over the setting's loop time (both measured on rank 0 in this run);
deviation compares the final latents with the sequential ones.

Example:
    asyncdiff bench --size bench --devices 1,2 --steps 50 --warm-up 2 --json bench.json
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from asyncdiff.engine.config import stages_for
from asyncdiff.generate import GenerateSpec, run

__all__ = ["SLICES", "BenchRow", "bench", "format_rows", "plot_rows"]


@dataclass(frozen=True)
class BenchRow:
    devices: int
    stride: int
    warm_up: int
    seconds: float
    speedup: float
    deviation: float  # |x - x_seq| / |x_seq| over the final latents
    max_abs: float
    bytes_sent_per_step: int
    step_s: float = 0.0  # median wall time of a step after warm-up (rank 0)
    predicted_step_s: float = 0.0  # the step-time model: slowest profiled stage + received bytes / gloo bandwidth
    denoiser_mb: float = 0.0  # the most denoiser weights any rank holds
    peak_mb: float = 0.0  # the highest peak memory of any rank (peak RSS on CPU, CUDA max allocated on GPU)
    mesh: str = "stages"  # the setting asked for: "stages", "GxB" slices (Note [hybrid mesh]) or "auto"
    guidance: int = 1  # the degrees that ran (parallel="auto" chooses them)
    batch: int = 1
    stages: int = 1


SLICES = ("1x1", "2x1", "1x2", "2x2", "auto")  # guidance x batch settings bench knows


def _settings(n: int, stride: int, slices: list[str]) -> list[dict[str, Any]]:
    """The generate settings of ``n`` processes with ``stride`` for each of ``slices`` that fits."""
    found = []
    for mesh in slices:
        if mesh == "auto":
            found.append(dict(parallel="auto"))
            continue
        guidance, batch = (int(v) for v in mesh.split("x"))
        data = guidance * batch
        if n % data == 0 and stages_for(n, stride, data) >= (2 if data == 1 else 1):
            found.append(dict(guidance=guidance, batch=batch))
    return found


def bench(base: GenerateSpec, devices: list[int], strides: list[int], slices: list[str] | None = None) -> list[BenchRow]:
    """Run the sequential reference, then every valid (devices, stride, slices) setting of ``base``
    (``slices``: guidance x batch settings of :data:`SLICES`; default stages only)."""
    warm_up = base.config.warm_up
    reference = run(replace(base, devices=1, out=None, engine={**base.engine, "stride": 1}))
    sequential_step = reference["denoise_s"] / base.steps  # a step may be several calls (Note [branches])
    rows = [BenchRow(1, 1, warm_up, reference["denoise_s"], 1.0, 0.0, 0.0, 0, sequential_step, 0.0,
                     max(reference["denoiser_mb"]), max(reference["peak_mb"]), "sequential")]
    for n in sorted(set(devices) - {1}):
        for stride, setting in ((s, m) for s in strides for m in _settings(n, s, slices or ["1x1"])):
            result = run(replace(base, devices=n, out=None, engine={**base.engine, "stride": stride, **setting}))
            mesh = setting.get("parallel") or f"{setting['guidance']}x{setting['batch']}"
            delta = result["latents"].float() - reference["latents"].float()
            rows.append(BenchRow(
                n, stride, warm_up, result["denoise_s"], reference["denoise_s"] / result["denoise_s"],
                (delta.norm() / reference["latents"].float().norm()).item(), delta.abs().max().item(),
                result.get("bytes_sent_per_step", 0), result.get("step_s", 0.0), result.get("predicted_step_s", 0.0),
                max(result["denoiser_mb"]), max(result["peak_mb"]), "stages" if mesh == "1x1" else mesh,
                result["guidance"], result["batch"], result["stages"],
            ))
    return rows


def format_rows(rows: list[BenchRow]) -> str:
    lines = ["| devices | mesh (guidance x batch x stages) | stride | warm-up | seconds | speed-up | deviation (rel. L2) | max abs | MB sent/step (rank 0) "
             "| step s | model step s | denoiser MB/rank (max) | peak MB/rank (max) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        model = f"{r.predicted_step_s:.3f}" if r.predicted_step_s else "-"
        mesh = f"{r.guidance} x {r.batch} x {r.stages}" + (" (auto)" if r.mesh == "auto" else "")
        lines.append(f"| {r.devices} | {mesh} | {r.stride} | {r.warm_up} | {r.seconds:.2f} | {r.speedup:.2f}x | "
                     f"{r.deviation:.4f} | {r.max_abs:.4f} | {r.bytes_sent_per_step / 1e6:.2f} | {r.step_s:.3f} | {model} | "
                     f"{r.denoiser_mb:.1f} | {r.peak_mb:.0f} |")
    return "\n".join(lines)


def plot_rows(rows: list[BenchRow], path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot draws with matplotlib, an extra: pip install 'asyncdiff[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for stride, mesh in sorted({(r.stride, r.mesh) for r in rows if r.devices > 1}):
        points = sorted((r.devices, r.speedup) for r in rows if (r.stride, r.mesh) == (stride, mesh) or r.devices == 1)
        ax.plot(*zip(*points), marker="o", label=f"stride {stride}" + ("" if mesh == "stages" else f", {mesh}"))
    top = max(r.devices for r in rows)
    ax.plot([1, top], [1, top], linestyle=":", color="grey", label="ideal")
    ax.set_xlabel("devices (processes)")
    ax.set_ylabel("speed-up of the denoising loop")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_json(rows: list[BenchRow], spec: GenerateSpec) -> str:
    setting: dict[str, Any] = {k: v for k, v in asdict(spec).items() if k not in ("engine", "out", "devices")}
    setting.update((k, v) for k, v in spec.engine.items() if k != "stride")
    return json.dumps({"setting": setting, "torch_threads": torch.get_num_threads(),
                       "rows": [asdict(r) for r in rows]}, indent=1)
