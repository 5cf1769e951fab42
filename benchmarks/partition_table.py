"""Partition quality on full-size configs (FLOPs on meta tensors, CFG batch 2), for BENCHMARKS.md.

    python benchmarks/partition_table.py

For each model and stage count: the imbalance (slowest stage / mean, compute only) of asyncdiff's
plan against the reference implementation's hand-written split (numbers from issue 3), the layout
the planner chose, and the modelled speed-up of the communication-aware plan on NVLink and PCIe.
"""

from __future__ import annotations

import time

from asyncdiff.inspection import load_for_inspection, pipeline_report
from asyncdiff.models.builders import example_inputs

# slowest stage / mean stage FLOPs of the reference's split table (2, 3, 4 stages)
REFERENCE = {"sd15": (1.120, 1.144, 1.256), "sd21": (1.053, 1.152, 1.098), "sdxl": (1.126, 1.045, 1.160)}


def layout(report) -> str:
    stage_of = [s for _, _, s in report.blocks]
    return "wrapped" if stage_of[0] == stage_of[-1] and len(set(stage_of)) > 1 else "contiguous"


def main() -> None:
    print("| model | stages | imbalance (asyncdiff) | imbalance (reference) | layout | speed-up NVLink | speed-up PCIe | plan s |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for name in ("sd15", "sd21", "sdxl", "sd3"):
        pipe = load_for_inspection(name, "full", None, on_meta=True)
        call = {"prompt": "a photo of a cat", **example_inputs(name, "full")}
        for i, n in enumerate((2, 3, 4)):
            start = time.perf_counter()
            _, balanced = pipeline_report(pipe, model_n=n, cost="flops", link="none", **call)
            seconds = time.perf_counter() - start
            _, nvlink = pipeline_report(pipe, model_n=n, cost="flops", link="nvlink", **call)
            _, pcie = pipeline_report(pipe, model_n=n, cost="flops", link="pcie", **call)
            reference = f"{REFERENCE[name][i]:.3f}" if name in REFERENCE else "n/a"
            print(f"| {name} | {n} | {balanced.imbalance:.3f} | {reference} | {layout(balanced)} | "
                  f"{nvlink.speedup:.2f}x ({layout(nvlink)}) | {pcie.speedup:.2f}x ({layout(pcie)}) | {seconds:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
