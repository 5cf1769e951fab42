"""Memory per rank when a saved pipeline is loaded whole, stage-only, and stage-only with the text
encoders on rank 0 only (issue 13; Notes [stage-only loading] and [encoders on one rank]).

    python -m benchmarks.loading_memory [--pipelines sd15,sdxl] [--devices 1,2,3] [--folder DIR] [--json PATH]

Each pipeline is built once at full size with seeded random weights in float16 and saved with
``save_pretrained`` (safetensors). Then, in fresh processes (``launch``, one thread each), it is
loaded: with 1 process by ``DiffusionPipeline.from_pretrained`` (the whole pipeline, the
baseline); with N >= 2 by ``AsyncDiff.from_pretrained`` (each rank reads only its stage of the
denoiser), with the stages balanced in FLOPs (the default) and in weight bytes (``cost="bytes"``),
and the latter once more with ``text_encoders="rank0"``.
Nothing is generated: what is measured is what a rank holds once loaded (denoiser and text
encoder bytes) and its peak resident set size (``VmHWM``: the whole process, libraries
included, which is why a few hundred MB never go away), after reading every weight it holds once
(safetensors maps files lazily: an untouched weight is not resident yet, a used one is).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from asyncdiff.engine.launch import launch
from asyncdiff.memory import peak_rss_bytes

__all__ = ["main"]


def _held(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _load(folder: str, devices: int, text_encoders: str, cost: str = "flops") -> dict[str, Any]:
    """One rank's load of ``folder``: what it holds and its peak RSS."""
    import torch.distributed as dist

    from asyncdiff.adapters.encoders import text_encoders as encoders_of

    if devices == 1:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16)
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
    else:
        from asyncdiff import AsyncDiff

        async_diff = AsyncDiff.from_pretrained(folder, model_n=dist.get_world_size(), warm_up=1,
                                               torch_dtype=torch.float16, text_encoders=text_encoders, cost=cost)
        pipe, denoiser = async_diff.pipeline, async_diff.denoiser
    for module in (denoiser, *encoders_of(pipe).values()):  # a run reads every weight: make them resident
        for t in (*module.parameters(), *module.buffers()):
            t.float().sum() if t.numel() else None
    return {"denoiser_bytes": _held(denoiser),
            "text_encoder_bytes": sum(_held(e) for e in encoders_of(pipe).values()),
            "peak_rss_bytes": peak_rss_bytes()}


def _save(name: str, folder: Path) -> None:
    """Build the full-size built-in ``name`` in float16 and save it to ``folder`` (once)."""
    if (folder / "model_index.json").is_file():
        return
    from asyncdiff.models.builders import system

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # never hold a full-size model in float32
    try:
        pipe = system(name).build("full", 0)
    finally:
        torch.set_default_dtype(default)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", default="sd15,sdxl")
    parser.add_argument("--devices", default="1,2,3")
    parser.add_argument("--folder", default="/tmp/asyncdiff-full", help="where the saved pipelines go")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    rows = []
    print("| pipeline | processes | loading | denoiser MB per rank | text encoder MB per rank | peak RSS MB per rank |")
    print("|---|---:|---|---|---|---|")
    for name in args.pipelines.split(","):
        folder = Path(args.folder) / name
        _save(name, folder)
        for devices in (int(d) for d in args.devices.split(",")):
            modes = ("whole",) if devices == 1 else ("stage-only (FLOP plan)", "stage-only (byte plan)",
                                                     "stage-only (byte plan), text encoders on rank 0")
            for mode in modes:
                ranks = launch(_load, devices, str(folder), devices, "rank0" if "rank 0" in mode else "every",
                               "bytes" if "byte" in mode else "flops", timeout_s=1800)
                per_rank = [ranks[r] for r in sorted(ranks)]
                row = {"pipeline": name, "devices": devices, "loading": mode,
                       **{k: [r[k] for r in per_rank] for k in per_rank[0]}}
                rows.append(row)
                mb = {k: " / ".join(f"{v / 1e6:.0f}" for v in row[k]) for k in per_rank[0]}
                print(f"| {name} | {devices} | {mode} | {mb['denoiser_bytes']} | {mb['text_encoder_bytes']} | "
                      f"{mb['peak_rss_bytes']} |", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
