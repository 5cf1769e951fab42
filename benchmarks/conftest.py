"""Shared pieces of the microbenchmarks: a per-run record of baseline medians and of the tables
each benchmark prints, shown again at the end of the run (so ``-q`` without ``-s`` shows them).

Ratios are always against a baseline measured in the same run (STYLE.md, benchmarks): a
benchmark stores its median under a name with :meth:`RunRecord.keep`, a later one reads it back
with :meth:`RunRecord.ratio`. Benchmarks assert only the correctness of what they ran.

The multi-process benchmarks measure CPU processes on gloo, also on a machine with CUDA; the
NCCL ones set ``ASYNCDIFF_DEVICE=cuda`` for themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("ASYNCDIFF_DEVICE", "cpu")
_RECORD = pytest.StashKey["RunRecord"]()


class RunRecord:
    """Medians (seconds) by name, and the report lines of this run."""

    def __init__(self) -> None:
        self.medians: dict[str, float] = {}
        self.lines: list[str] = []

    @staticmethod
    def median(benchmark) -> float:
        """Median seconds per iteration of the benchmark that just ran."""
        return float(benchmark.stats.stats.median)

    def keep(self, name: str, seconds: float) -> float:
        self.medians[name] = seconds
        return seconds

    def ratio(self, seconds: float, baseline: str) -> float | None:
        """``seconds`` / the baseline's median, or None when the baseline did not run (``-k``)."""
        base = self.medians.get(baseline)
        return None if base is None else seconds / base

    def print(self, title: str, rows: list[str]) -> None:
        text = [f"-- {title}", *(f"   {r}" for r in rows)]
        print("\n" + "\n".join(text))
        self.lines.extend(text)


@pytest.fixture(scope="session")
def run_record(request: pytest.FixtureRequest) -> RunRecord:
    record = request.config.stash.get(_RECORD, None)
    if record is None:
        record = request.config.stash[_RECORD] = RunRecord()
    return record


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread, as each engine process uses (FACTS.md: 1 process x 1 thread per core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    record = config.stash.get(_RECORD, None)
    if record is not None and record.lines:
        terminalreporter.section("asyncdiff microbenchmarks: ratios and in-worker measurements")
        for line in record.lines:
            terminalreporter.write_line(line)
