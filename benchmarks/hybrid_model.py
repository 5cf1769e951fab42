"""The step model's predictions for every guidance x batch x stages way to use 2, 4 and 8 GPUs.

    python -m benchmarks.hybrid_model [--models sdxl,sd3,flux] [--devices 2,4,8] [--json PATH]

Full-size denoisers are built on the ``meta`` device (no weights, no GPU), their FLOPs counted
per block for each share of the batch, and each way to use the devices modelled as the engine's
``parallel="auto"`` does (Note [choosing the mesh] in ``partition/hybrid.py``): the slowest
stage on one slice's share, plus stage transfers, the output's broadcast and its all-gather over
the slices, on NVLink and PCIe (the link presets of ``partition/report.py``: FLOPs at 250
TFLOP/s). FLOPs scale linearly with the batch, so this favours splitting the batch more than a
real GPU would where a half batch leaves it underused; the per-block CUDA times of the GPU check
are the better clock where they exist. One row per option; ``*`` marks the one auto takes.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from asyncdiff.engine.mesh import model_option
from asyncdiff.partition.hybrid import choose_parallel, parallel_degrees
from asyncdiff.partition.report import LINKS
from benchmarks.gpu_check import MODELS

__all__ = ["main"]


def flux_two_images(full: bool, device: str, dtype: torch.dtype):  # noqa: ANN201 (a gpu_check Denoiser)
    """The Flux-size DiT with two images per prompt: a batch of 2 without guidance."""
    import dataclasses

    one = MODELS["flux"][0](full, device, dtype)
    kwargs = {k: torch.cat([v, v]) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections",
                                           "timestep", "guidance") else v for k, v in one.kwargs.items()}
    return dataclasses.replace(one, name="flux x2", kwargs=kwargs, what=one.what.replace("batch 1", "2 images"))


SETTINGS = {"sdxl": (MODELS["sdxl"][0], True), "sd3": (MODELS["sd3"][0], True), "flux": (MODELS["flux"][0], False),
            "flux2": (flux_two_images, False)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sdxl,sd3,flux,flux2")
    parser.add_argument("--devices", default="2,4,8")
    parser.add_argument("--size", default="full", choices=("full", "tiny"))
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    rows = []
    print("| model | devices | link | guidance x batch x stages | modelled step ms | speed-up | staleness |")
    print("|---|---:|---|---|---:|---:|---|")
    for name in args.models.split(","):
        build, guided = SETTINGS[name]
        model = build(args.size == "full", "meta", torch.bfloat16)
        n = next(v for k, v in (*zip(range(len(model.args)), model.args), *model.kwargs.items())
                 if k in (0, model.latent)).shape[0]
        profiles: dict[int, object] = {}
        for link in ("nvlink", "pcie"):
            unit_bw = LINKS[link].planner_bandwidth("flop")
            one = model_option(model.module, model.args, model.kwargs, (1, 1, 1), n, latent=model.latent,
                               cost="flops", bandwidth=unit_bw, profiles=profiles)
            for devices in (int(d) for d in args.devices.split(",")):
                options = [model_option(model.module, model.args, model.kwargs, d, n, latent=model.latent,
                                        cost="flops", bandwidth=unit_bw, profiles=profiles)
                           for d in parallel_degrees(devices, 1, n, guided)]
                chosen = choose_parallel(options)
                for o in options:
                    row = {"model": model.what, "devices": devices, "link": link, "guidance": o.guidance,
                           "batch": o.batch, "stages": o.stages, "step_ms": LINKS[link].seconds(o.step, "flop") * 1e3,
                           "speedup": one.step / o.step, "depth": o.depth, "auto": o == chosen}
                    rows.append(row)
                    stale = "exact" if o.depth == 0 else f"{o.depth} step(s)"
                    print(f"| {model.what} | {devices} | {link} | {'*' if o == chosen else ''}{o.guidance} x {o.batch} "
                          f"x {o.stages} | {row['step_ms']:.1f} | {row['speedup']:.2f}x | {stale} |", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
