"""Which mix of guidance, batch and stage parallelism to run on a number of devices.

Note [choosing the mesh]: with W processes, a call whose denoiser batch is n can split that
batch over d slices (d divides both W and n; Note [hybrid mesh] in :mod:`asyncdiff.engine.mesh`)
and cut the denoiser into stages over the W / d processes of each slice. Splitting the batch is
exact; every stage boundary on the main path makes the output one step staler (Note [staleness]
in :mod:`asyncdiff.partition.planner`). So the choice is the planner's own rule one level up:
model each option's step (the slowest stage on one slice's share of the batch, plus the stage
transfers, the output's broadcast in the slice and its all-gather over the slices) and take the
least stale option within ``max_slowdown`` of the fastest; among equally stale ones, the fewest
stages, then the fastest. Exact dimensions come first and stages are added only where they pay.

Where the pipeline batches classifier-free guidance (the batch is 2B: unconditional, then
conditional), an even split names its first factor ``guidance`` (the halves are the two
guidance branches); the rest is ``batch``. Where it does not (or it is not known), every split
is ``batch``. A guided pipeline whose batch is odd makes its guidance two calls per step (Note
[two-call guidance] in :mod:`asyncdiff.engine.mesh`): then ``guidance=2`` puts one call on each of
two slices, and a step of the other options is two calls. This module is pure: the engine
profiles, these functions decide.

Example:
    >>> parallel_degrees(world=4, stride=1, n=2, guided=True)
    [(1, 1, 4), (2, 1, 2)]
    >>> parallel_degrees(world=4, stride=1, n=1, guided=True)  # two calls per step
    [(1, 1, 4), (2, 1, 2)]
    >>> options = [ParallelOption(1, 1, 2, step=0.55, depth=1), ParallelOption(2, 1, 1, step=0.56, depth=0)]
    >>> choose_parallel(options).guidance
    2
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from asyncdiff.partition.planner import MAX_SLOWDOWN

__all__ = ["ParallelOption", "choose_parallel", "format_options", "parallel_degrees", "two_calls"]


@dataclass(frozen=True)
class ParallelOption:
    """One way to use the processes: degrees, modelled step (in the plan's cost unit) and
    main-path depth (0: exact), with the stage plan as JSON where there are stages."""

    guidance: int
    batch: int
    stages: int
    step: float
    depth: int
    plan: str | None = None

    @property
    def name(self) -> str:
        return f"guidance {self.guidance} x batch {self.batch} x stages {self.stages}"


def two_calls(n: int, guided: bool | None) -> bool:
    """Whether a pipeline call with denoiser batch ``n`` makes its guidance two calls per step."""
    return bool(guided) and n % 2 == 1


def parallel_degrees(world: int, stride: int, n: int, guided: bool | None) -> list[tuple[int, int, int]]:
    """Every ``(guidance, batch, stages)`` that runs a batch of ``n`` on ``world`` processes with
    ``stride``, fewest slices first (Note [choosing the mesh])."""
    two = two_calls(n, guided)
    found = []
    for data in range(1, world + 1):
        if world % data or (data > 2 if two else n % data):
            continue
        stages = world // data - stride + 1
        if stages < 1 or (stride == 2 and stages < 2):
            continue
        guidance = 2 if guided and data % 2 == 0 else 1
        found.append((guidance, data // guidance, stages))
    if not found:
        raise ValueError(f"no way to run a batch of {n} on {world} processes with stride={stride}; "
                         f"use stride=1 or another number of processes")
    return found


def choose_parallel(options: Sequence[ParallelOption], max_slowdown: float = MAX_SLOWDOWN) -> ParallelOption:
    """The least stale option within ``max_slowdown`` of the fastest modelled step; then the
    fewest stages; then the fastest."""
    fastest = min(o.step for o in options)
    limit = fastest * (1 + max_slowdown) * (1 + 1e-12)
    return min((o for o in options if o.step <= limit), key=lambda o: (o.depth, o.stages, o.step))


def format_options(options: Sequence[ParallelOption], chosen: ParallelOption | None = None, unit: str = "s") -> str:
    """One line per option: degrees, modelled step (and its ratio to the slowest), staleness."""
    slowest = max(o.step for o in options)
    lines = []
    for o in options:
        mark = "*" if o == chosen else " "
        stale = "exact" if o.depth == 0 else f"main path {o.depth} step(s) stale"
        lines.append(f"{mark} {o.name}: step {o.step:.4g} {unit} ({slowest / o.step:.2f}x the slowest), {stale}")
    return "\n".join(lines)
