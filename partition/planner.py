"""The planner: a pure function from block costs and tensor edges to a stage per block.

Given blocks in program order with costs ``c[i]`` and the values that flow between blocks
(``Value(producer, consumers, nbytes)``), assign every block to one of ``model_n`` stages so as to
minimise the modelled step time::

    step_time = max over stages s of ( sum(c[i] for i in s) + recv_bytes(s) / bandwidth )

``recv_bytes(s)`` counts each value produced on another stage and read in ``s`` once (a skip
connection is received once even if several blocks of the stage read it).

Two layouts are searched, both exactly, by dynamic programming over a cost matrix:

- *contiguous*: stage k runs the k-th run of blocks;
- *wrapped*: stage 0 runs the first blocks and the last blocks, the other stages split the middle.
  A UNet's long skip connections (``conv_in`` to the last up block) then stay on one device, as
  the reference implementation's hand-written SDXL split does.

Note [staleness]: after warm-up, a stage reads values that other stages computed in the previous
step. A value's *age* is how many steps behind the latent it is: a block's output is as old as
its oldest input, plus one step for each input produced on another stage. The *main-path depth*
of a plan is the age of the output, i.e. the number of stage crossings on the longest path from
the call inputs to the output. A contiguous N-stage plan has depth N - 1; a wrapped plan N (the
main path leaves stage 0 and comes back), so at equal speed the wrapped plan is one step staler,
as stale as a contiguous plan with one more stage. The planner therefore takes, among the plans
whose modelled step is within ``max_slowdown`` of the fastest, the one with the smallest depth
(then the faster one; then contiguous). Measured on the trained digits model (issue 10), the
wrapped 2-stage plan lost about twice the fidelity of a contiguous one. This *depth rule* is the
fallback; where the engine can measure, the fidelity rule decides (Note [fidelity rule]).

Note [fidelity rule]: depth counts stage crossings, not how much the values that cross move
between steps or how much the output cares. So where the engine can measure, the default plan is
the one with the lowest *predicted error* among the plans whose modelled step is within
``max_slowdown`` (default 15 %, :data:`FIDELITY_SLOWDOWN`) of the fastest: the best plan of each
layout and the contiguous plans whose cuts lie up to :data:`NEARBY_SHIFT` units from the best
contiguous cut (at most :data:`MAX_CANDIDATES`, fastest first). The error is measured on the real
call by the engine's own one-process execution (Note [predicted error] in
:mod:`asyncdiff.engine.drift`); ties (within 1e-9, relatively) go to the faster plan. The
choice is a pure function of the candidates and their errors (:func:`choose_faithful`).

Example:
    >>> best_contiguous([1, 1, 1, 1, 4], [], 2)
    (0, 4)
    >>> best_assignment([4, 1, 1, 1, 1, 4], [], 3)
    (0, 1, 1, 1, 1, 2)
    >>> chain = [Value(i, (i + 1,), 1) for i in range(5)]
    >>> main_path_depth(chain, (0, 1, 1, 2, 2, 0)), main_path_depth(chain, (0, 0, 1, 1, 2, 2))
    (3, 2)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["FIDELITY_SLOWDOWN", "LAYOUTS", "MAX_CANDIDATES", "MAX_SLOWDOWN", "NEARBY_SHIFT", "Candidate", "Value",
           "best_assignment", "best_contiguous", "best_wrapped", "candidates", "choose", "choose_faithful",
           "main_path_depth", "nearby_candidates", "stage_times"]

LAYOUTS = ("contiguous", "wrapped")
MAX_SLOWDOWN = 0.05  # depth rule: a less stale plan may be up to 5 % slower (modelled) than the fastest
FIDELITY_SLOWDOWN = 0.15  # fidelity rule: a more faithful plan may be up to 15 % slower (Note [fidelity rule])
NEARBY_SHIFT = 2  # fidelity rule: contiguous cuts up to this many units from the best one are candidates
MAX_CANDIDATES = 6  # fidelity rule: the fastest this many candidates are measured


@dataclass(frozen=True)
class Value:
    """A tensor produced by block ``producer`` (-1: a call input) and read by ``consumers``."""

    producer: int
    consumers: tuple[int, ...]
    nbytes: int


def stage_times(costs: Sequence[float], values: Sequence[Value], assignment: Sequence[int],
                bandwidth: float | None = None) -> list[float]:
    """Modelled time of each stage when block ``i`` runs on stage ``assignment[i]``."""
    model_n = max(assignment) + 1
    times = [0.0] * model_n
    for cost, stage in zip(costs, assignment):
        times[stage] += float(cost)
    if bandwidth:
        for v in values:
            if v.producer < 0:
                continue
            for stage in {assignment[c] for c in v.consumers} - {assignment[v.producer]}:
                times[stage] += v.nbytes / bandwidth
    return times


def _check(costs: Sequence[float], model_n: int) -> None:
    n = len(costs)
    if model_n < 1:
        raise ValueError(f"model_n={model_n} must be >= 1")
    if model_n > n:
        raise ValueError(f"stages={model_n} but the traced denoiser has only {n} blocks; "
                         f"use stages <= {n} or a finer block policy")
    if any(c < 0 for c in costs):
        raise ValueError("block costs must be >= 0")


def _span_costs(costs: Sequence[float], values: Sequence[Value], bandwidth: float | None) -> np.ndarray:
    """``C[i, j]``: modelled time of a stage running blocks ``[i, j)`` (``inf`` unless i < j)."""
    n = len(costs)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])
    span = prefix[None, :] - prefix[:, None]
    if bandwidth:
        # recv[i, j]: values produced before i whose first consumer at or after i is before j.
        # Per value, rows i in (c_{k-1}, c_k] see first consumer c_k: add over columns j > c_k.
        diff = np.zeros((n + 2, n + 2))
        for v in values:
            if v.producer < 0:
                continue
            previous = v.producer
            for c in sorted(set(c for c in v.consumers if c > v.producer)):
                diff[previous + 1, c + 1] += v.nbytes
                diff[c + 1, c + 1] -= v.nbytes
                previous = c
        recv = diff.cumsum(axis=0).cumsum(axis=1)[: n + 1, : n + 1]
        span = span + recv / bandwidth
    rows, cols = np.indices(span.shape)
    span[rows >= cols] = np.inf
    return span


def _dp(span: np.ndarray, start: int, model_n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Best slowest-stage time of ``model_n`` stages covering ``[start, j)``, for every ``j``."""
    size = span.shape[0]
    best = np.full(size, np.inf)
    best[start] = 0.0
    args = []
    for _ in range(model_n):
        grid = np.maximum(best[:, None], span)
        # ties go to the later cut: it keeps the last stage (which also sends the output) lighter
        arg = size - 1 - grid[::-1].argmin(axis=0)
        best = grid[arg, np.arange(size)]
        args.append(arg)
    return best, args


def _starts(args: list[np.ndarray], stop: int) -> list[int]:
    starts, j = [], stop
    for arg in reversed(args):
        j = int(arg[j])
        starts.append(j)
    return list(reversed(starts))


def best_contiguous(costs: Sequence[float], values: Sequence[Value], model_n: int,
                    bandwidth: float | None = None) -> tuple[int, ...]:
    """First-block index of each stage for the contiguous cut minimising the slowest stage.

    ``bandwidth`` in bytes per cost unit; ``None`` ignores communication.
    """
    _check(costs, model_n)
    _, args = _dp(_span_costs(costs, values, bandwidth), 0, model_n)
    return tuple(_starts(args, len(costs)))


def _wrapped_recv(values: Sequence[Value], n: int) -> np.ndarray:
    """``R[a, b]``: bytes stage 0 receives when it runs ``[0, a)`` and ``[b, n)``: values
    produced in ``[a, b)`` and read at or after ``b``."""
    diff = np.zeros((n + 2, n + 2))
    for v in values:
        last = max(v.consumers, default=-1)
        if v.producer < 0 or last <= v.producer:
            continue
        # a in [0, producer], b in [producer + 1, last]
        diff[0, v.producer + 1] += v.nbytes
        diff[0, last + 1] -= v.nbytes
        diff[v.producer + 1, v.producer + 1] -= v.nbytes
        diff[v.producer + 1, last + 1] += v.nbytes
    return diff.cumsum(axis=0).cumsum(axis=1)[: n + 1, : n + 1]


def best_wrapped(costs: Sequence[float], values: Sequence[Value], model_n: int,
                 bandwidth: float | None = None) -> tuple[float, tuple[int, ...]] | None:
    """The best wrapped layout: ``(slowest stage time, stage per block)``; None if impossible
    (fewer than 2 stages or 3 blocks)."""
    _check(costs, model_n)
    n = len(costs)
    if model_n < 2 or n < model_n + 1:
        return None
    span = _span_costs(costs, values, bandwidth)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])
    recv0 = _wrapped_recv(values, n) / bandwidth if bandwidth else np.zeros((n + 1, n + 1))
    bound = float(_dp(span, 0, model_n)[0][n])  # a head slower than the best contiguous plan cannot win
    best: tuple[float, int, int, list[np.ndarray]] | None = None
    for a in range(1, n - model_n + 1):
        if prefix[a] > bound:
            break
        middle, args = _dp(span, a, model_n - 1)
        tails = np.arange(a + model_n - 1, n)  # the tail [b, n) is not empty
        stage0 = prefix[a] + prefix[n] - prefix[tails] + recv0[a, tails]
        worst = np.maximum(middle[tails], stage0)
        k = int(worst.argmin())
        if best is None or worst[k] < best[0]:
            best = (float(worst[k]), a, int(tails[k]), args)
    if best is None:
        return None
    time, a, b, args = best
    assignment = [0] * n
    starts = _starts(args, b) + [b]
    for stage, (i, j) in enumerate(zip(starts, starts[1:]), start=1):
        assignment[i:j] = [stage] * (j - i)
    return time, tuple(assignment)


@dataclass(frozen=True)
class Candidate:
    """The best plan of one layout: stage per block, modelled step time, main-path depth."""

    layout: str
    assignment: tuple[int, ...]
    step: float
    depth: int


def main_path_depth(values: Sequence[Value], assignment: Sequence[int]) -> int:
    """Note [staleness]: stage crossings on the longest path from the call inputs to the output
    (the last block), following ``values``."""
    age = [0] * len(assignment)
    inputs: list[list[int]] = [[] for _ in assignment]
    for v in values:
        for c in v.consumers:
            if 0 <= v.producer < c:
                inputs[c].append(v.producer)
    for i, producers in enumerate(inputs):
        for p in producers:
            age[i] = max(age[i], age[p] + (assignment[p] != assignment[i]))
    return age[-1] if age else 0


def candidates(costs: Sequence[float], values: Sequence[Value], model_n: int, bandwidth: float | None = None,
               layouts: Sequence[str] = LAYOUTS) -> list[Candidate]:
    """The best plan of each layout in ``layouts`` that admits one, in ``LAYOUTS`` order."""
    unknown = set(layouts) - set(LAYOUTS)
    if unknown or not layouts:
        raise ValueError(f"layouts={tuple(layouts)!r}: use a non-empty subset of {LAYOUTS}")
    _check(costs, model_n)
    found: list[tuple[str, tuple[int, ...]]] = []
    if "contiguous" in layouts:
        starts = list(best_contiguous(costs, values, model_n, bandwidth)) + [len(costs)]
        found.append(("contiguous", tuple(k for k, (i, j) in enumerate(zip(starts, starts[1:])) for _ in range(i, j))))
    if "wrapped" in layouts:
        wrapped = best_wrapped(costs, values, model_n, bandwidth)
        if wrapped is not None:
            found.append(("wrapped", wrapped[1]))
    if not found:
        raise ValueError(f"no plan with layouts {tuple(layouts)} for {len(costs)} blocks and {model_n} stages")
    return [Candidate(layout, a, max(stage_times(costs, values, a, bandwidth)), main_path_depth(values, a))
            for layout, a in found]


def choose(found: Sequence[Candidate], max_slowdown: float = MAX_SLOWDOWN) -> Candidate:
    """Note [staleness]: the least stale of the candidates within ``max_slowdown`` of the fastest
    modelled step (``max_slowdown=0``: the fastest; ``inf``: the least stale)."""
    if max_slowdown < 0:
        raise ValueError(f"max_slowdown={max_slowdown!r} must be >= 0 (0: the fastest plan)")
    fastest = min(c.step for c in found)
    limit = fastest * (1 + max_slowdown) * (1 + 1e-12)
    eligible = [c for c in found if c.step <= limit]
    return min(eligible, key=lambda c: (c.depth, c.step, LAYOUTS.index(c.layout)))


def nearby_candidates(costs: Sequence[float], values: Sequence[Value], model_n: int, bandwidth: float | None = None,
                      layouts: Sequence[str] = LAYOUTS, max_slowdown: float = FIDELITY_SLOWDOWN,
                      limit: int = MAX_CANDIDATES) -> list[Candidate]:
    """Note [fidelity rule]: the plans to measure, fastest first: the best plan of each layout and
    the contiguous plans with every cut moved by up to :data:`NEARBY_SHIFT` units, those within
    ``max_slowdown`` of the fastest modelled step, at most ``limit``."""
    best = candidates(costs, values, model_n, bandwidth, layouts)
    found = {c.assignment: c for c in best}
    contiguous = next((c for c in best if c.layout == "contiguous"), None)
    if contiguous is not None and model_n > 1:
        n = len(costs)
        cuts = [i for i in range(1, n) if contiguous.assignment[i] != contiguous.assignment[i - 1]]
        shifts = range(-NEARBY_SHIFT, NEARBY_SHIFT + 1)
        for moved in itertools.product(shifts, repeat=len(cuts)):
            new = [c + d for c, d in zip(cuts, moved)]
            if any(b <= a for a, b in zip([0, *new], [*new, n])):
                continue  # an empty stage
            starts = [0, *new, n]
            assignment = tuple(k for k, (i, j) in enumerate(zip(starts, starts[1:])) for _ in range(i, j))
            if assignment not in found:
                found[assignment] = Candidate("contiguous", assignment,
                                              max(stage_times(costs, values, assignment, bandwidth)),
                                              main_path_depth(values, assignment))
    fastest = min(c.step for c in found.values())
    limit_step = fastest * (1 + max_slowdown) * (1 + 1e-12)
    eligible = sorted((c for c in found.values() if c.step <= limit_step),
                      key=lambda c: (c.step, LAYOUTS.index(c.layout), c.assignment))
    return eligible[:limit]


def choose_faithful(steps: Sequence[float], errors: Sequence[float]) -> int:
    """Note [fidelity rule]: the index of the candidate with the lowest predicted error among
    candidates with modelled ``steps`` (all within the window); near-ties (1e-9 relative) go to
    the faster one.

    >>> choose_faithful([1.0, 1.1, 1.05], [0.02, 0.01, 0.01])
    2
    """
    if len(steps) != len(errors) or not steps:
        raise ValueError(f"{len(steps)} candidates but {len(errors)} predicted errors")
    least = min(errors)
    tied = [i for i, e in enumerate(errors) if e <= least * (1 + 1e-9) + 1e-30]
    return min(tied, key=lambda i: (steps[i], i))


def best_assignment(costs: Sequence[float], values: Sequence[Value], model_n: int,
                    bandwidth: float | None = None, layouts: Sequence[str] = LAYOUTS,
                    max_slowdown: float = MAX_SLOWDOWN) -> tuple[int, ...]:
    """Stage per block of the plan :func:`choose` takes among :func:`candidates`."""
    return choose(candidates(costs, values, model_n, bandwidth, layouts), max_slowdown).assignment
