"""The coverage matrix: every coverage case on 2 processes (exact at full warm-up, async at
warm-up 1), the stride-2 subset on 3 processes, as a markdown table.

    python benchmarks/coverage_matrix.py                 # every case; writes results/coverage.md
    python benchmarks/coverage_matrix.py flux sd15       # some cases, printed only

Set ASYNCDIFF_COVERAGE_TRACEBACK=1 to print every rank's traceback of each failing case.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from asyncdiff.engine.launch import launch
from asyncdiff.models.coverage import CASES
from asyncdiff.models.coverage.check import check_cases

STEPS = 3
TIMEOUT_S = 120  # a stuck case fails within this (its ranks raise), and the next case runs
OUT = Path(__file__).resolve().parent.parent / "results" / "coverage.md"


def matrix(names: list[str]) -> str:
    two = {r.name: r for r in launch(check_cases, 2, names, STEPS, 1, timeout_s=TIMEOUT_S)[0]}
    strided = [n for n in names if CASES[n].stride2 and two[n].status == "exact"]
    three = {r.name: r for r in launch(check_cases, 3, strided, STEPS, 2, timeout_s=TIMEOUT_S)[0]} if strided else {}
    lines = ["| family | case | pipeline | denoiser | 2 processes, full warm-up | warm-up 1 | stride 2, 3 processes |",
             "|---|---|---|---|---|---|---|"]
    for name in sorted(names, key=lambda n: (CASES[n].family.lower(), n)):
        c, r = CASES[name], two[name]
        exact = "exact" if r.status == "exact" else r.cell
        stale = "" if r.status != "exact" else ("runs" if r.stale_ok else "fails")
        stride = three[name].cell if name in three else ""
        lines.append(f"| {c.family} | {name} | {c.pipeline} | {r.denoiser} | {exact} | {stale} | {stride} |")
    families = {}
    for name in names:
        families.setdefault(CASES[name].family, []).append(two[name].status == "exact")
    exact_families = sum(all(v) for v in families.values())
    summary = (f"{sum(r.status == 'exact' for r in two.values())} of {len(names)} cases exact; "
               f"{exact_families} of {len(families)} families exact in every case")
    return "\n".join(lines) + f"\n\n{summary}\n"


def main() -> None:
    os.environ.setdefault("ASYNCDIFF_PLAN_CACHE", "off")  # every case plans afresh, as on a first run
    names = sys.argv[1:] or list(CASES)
    start = time.perf_counter()
    table = matrix(names)
    print(table)
    print(f"{time.perf_counter() - start:.0f} s")
    if not sys.argv[1:]:
        OUT.write_text(f"Coverage matrix (`python benchmarks/coverage_matrix.py`, {os.cpu_count()} CPUs)\n\n{table}")


if __name__ == "__main__":
    main()
