"""The planner: a pure function from block costs and tensor edges to stage cuts.

Given blocks in program order with costs ``c[i]`` and the values that flow between blocks
(``Value(producer, consumers, nbytes)``), choose ``n_stages`` contiguous runs of blocks that
minimise the modelled step time::

    step_time = max over stages s of ( sum(c[i] for i in s) + recv_bytes(s) / bandwidth )

``recv_bytes(s)`` counts each value produced before ``s`` and consumed in ``s`` once (a skip
connection is received once even if several blocks of the stage read it). The optimum over all
contiguous cuts is found by dynamic programming in O(n_stages * n_blocks^2).

Example:
    >>> best_contiguous([1, 1, 1, 1, 4], [], 2)
    (0, 4)
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Value", "best_contiguous", "stage_times"]


@dataclass(frozen=True)
class Value:
    """A tensor produced by block ``producer`` (-1: a call input) and read by ``consumers``."""

    producer: int
    consumers: tuple[int, ...]
    nbytes: int


def _recv_bytes(values: Sequence[Value], start: int, stop: int) -> int:
    return sum(v.nbytes for v in values
               if 0 <= v.producer < start and any(start <= c < stop for c in v.consumers))


class _RecvTable:
    """``recv(start, stop)`` in O(log V): for each ``start``, the values produced before it, sorted
    by their first consumer at or after ``start``, with prefix sums of their bytes."""

    def __init__(self, values: Sequence[Value], n: int) -> None:
        self.firsts: list[list[int]] = []
        self.sums: list[list[int]] = []
        for start in range(n + 1):
            pairs = sorted((min(c for c in v.consumers if c >= start), v.nbytes) for v in values
                           if 0 <= v.producer < start and any(c >= start for c in v.consumers))
            sums = [0]
            for _, nbytes in pairs:
                sums.append(sums[-1] + nbytes)
            self.firsts.append([first for first, _ in pairs])
            self.sums.append(sums)

    def __call__(self, start: int, stop: int) -> int:
        return self.sums[start][bisect.bisect_left(self.firsts[start], stop)]


def stage_times(costs: Sequence[float], values: Sequence[Value], starts: Sequence[int],
                bandwidth: float | None = None) -> list[float]:
    """Modelled time of each stage for the cut ``starts`` (index of each stage's first block)."""
    bounds = list(starts) + [len(costs)]
    times = []
    for start, stop in zip(bounds, bounds[1:]):
        t = float(sum(costs[start:stop]))
        if bandwidth:
            t += _recv_bytes(values, start, stop) / bandwidth
        times.append(t)
    return times


def best_contiguous(costs: Sequence[float], values: Sequence[Value], n_stages: int,
                    bandwidth: float | None = None) -> tuple[int, ...]:
    """First-block index of each stage for the contiguous cut minimising the slowest stage.

    ``bandwidth`` in bytes per cost unit; ``None`` ignores communication.
    """
    n = len(costs)
    if n_stages < 1:
        raise ValueError(f"n_stages={n_stages} must be >= 1")
    if n_stages > n:
        raise ValueError(
            f"stages={n_stages} but the traced denoiser has only {n} blocks; "
            f"use stages <= {n} or a finer block policy"
        )
    if any(c < 0 for c in costs):
        raise ValueError("block costs must be >= 0")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    recv = _RecvTable(values, n) if bandwidth else None

    def cost(i: int, j: int) -> float:
        t = prefix[j] - prefix[i]
        if recv is not None:
            t += recv(i, j) / bandwidth
        return t

    inf = float("inf")
    # best[k][j]: the slowest stage when blocks [0, j) form k stages; arg[k][j]: start of the last one.
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    arg = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for j in range(k, n - (n_stages - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                candidate = max(best[k - 1][i], cost(i, j))
                # ties go to the later cut: it keeps the last stage (which also sends the output) lighter
                if candidate <= best[k][j]:
                    best[k][j], arg[k][j] = candidate, i
    starts, j = [], n
    for k in range(n_stages, 0, -1):
        starts.append(arg[k][j])
        j = arg[k][j]
    return tuple(reversed(starts))
