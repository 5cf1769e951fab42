"""Run records: what every rank executed at every step, as JSON lines.

Note [run records]: with ``AsyncDiff(..., record=PATH)`` (``generate --record FILE``) every rank
appends one JSON object per denoiser call it runs to ``PATH``, each one ``os.write`` of a whole
line to a file opened for appending (the lines of several ranks do not interleave): the
pipeline call (``call``, counted per engine), the ``denoiser`` it split, the denoiser call's
``index`` in the pipeline call, ``rank``, ``stage``, ``step`` and ``branch``, the step's ``timestep`` (the scheduler's value its stage computed with),
the call ``signature`` (a short hash), the decided ``kind`` and ``why`` (Note [step decision]),
the ``program`` exactly as ``asyncdiff inspect`` prints it, the ``bytes_sent`` and
``bytes_received`` by its messages, its wall ``seconds``, and a checksum of each boundary value
its stage read (``inputs``: this step's received values in a sequential step, the stale, maybe
compensated, ones in an asynchronous step) and of its ``output``, and the ``plan`` (its stages' block names) on
the first entry of each rank and wherever it changed. Two runs that computed the
same thing have the same checksums, step by step, so the first line where they differ says
where a run went another way. Recording copies each boundary value to the CPU once per step:
for inspection, not for timing.

Example:
    >>> import torch
    >>> checksum(torch.zeros(2)) == checksum(torch.zeros(2)), checksum(torch.zeros(2)) == checksum(torch.ones(2))
    (True, False)
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from asyncdiff.engine.schedule import Exchange, Recv, Send, StepDecision, StepKind, StepProgram

__all__ = ["Recorder", "checksum", "read_record", "read_run", "step_bytes", "step_entry", "write_header"]


def checksum(value: Any) -> str | None:
    """A short hash of a tensor's dtype, shape and bytes (None for anything else)."""
    if not isinstance(value, torch.Tensor):
        return None
    data = value.detach().contiguous().cpu()
    digest = hashlib.sha1(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def read_checksums(state: Any, kind: StepKind) -> dict[str, str | None] | None:
    """Before an asynchronous step: the checksums of the stale values it is about to read. They
    are views into receive buffers that the step's own ``Exchange`` receives into next (without a
    transfer dtype the sequential steps' buffers too), so after the step they may already hold
    the next step's values. None before a sequential step (it reads what it receives)."""
    return None if kind.synchronous else {name: checksum(value) for name, value in sorted(state.stale.items())}


def step_entry(engine: Any, compiled: Any, state: Any, program: StepProgram, decision: StepDecision, branch: int,
               output: Any, read: dict[str, str | None] | None, seconds: float) -> dict[str, Any]:
    """The record of one denoiser call an :class:`~asyncdiff.engine.runtime.AsyncEngine` ran
    (Note [run records]): ``read``, :func:`read_checksums` before the step; after a sequential
    ``run_stage``, ``state.stale`` holds the values the step received and read."""
    import torch.utils._pytree as pytree

    sent, received = step_bytes(program, state.channel)
    timestep = engine.timesteps(program.timestep) if engine.timesteps is not None else None
    return {
        "call": engine._calls, "denoiser": type(engine.denoiser).__name__, "index": len(engine.call.seconds),
        "rank": engine.global_rank, "stage": engine.stage, "step": decision.step, "branch": branch,
        "timestep": None if timestep is None else float(timestep), "signature": compiled.signature,
        "kind": str(decision.kind), "why": decision.why, "program": str(program), "bytes_sent": sent,
        "bytes_received": received, "seconds": round(seconds, 6),
        "inputs": read if read is not None else {name: checksum(value) for name, value in sorted(state.stale.items())},
        "output": [checksum(leaf) for leaf in pytree.tree_leaves(output)],
        "plan": [list(stage) for stage in compiled.split.plan.stages]}


def step_bytes(program: StepProgram, channel: Any) -> tuple[int, int]:
    """The bytes ``program``'s messages send and receive over ``channel`` (its layouts: exact
    dtypes for synchronous sends and receives, the transfer dtype for an asynchronous exchange)."""
    sent = received = 0
    for action in program.actions:
        if isinstance(action, Send):
            sent += sum(channel.exact_layouts[m].nbytes * len(channel.destinations[channel.send_groups[m][0].dst])
                        for m in action.messages)
        elif isinstance(action, Recv):
            received += sum(channel.exact_layouts[m].nbytes for m in action.messages)
        elif isinstance(action, Exchange):
            sent += sum(channel.layouts[m].nbytes * len(channel.destinations[channel.send_groups[m][0].dst])
                        for m in action.sends)
            received += sum(channel.layouts[m].nbytes for m in action.recvs)
    return sent, received


class Recorder:
    """Appends records to ``path`` (Note [run records])."""

    def __init__(self, path: str | os.PathLike) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"record={str(path)!r}: the folder {folder!r} does not exist; create it or record elsewhere")
        self.path = os.fspath(path)
        self._plan: Any = None  # the plan of the last entry written
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, entry: dict[str, Any]) -> None:
        """Append ``entry``; its ``plan`` only where it is not the plan this recorder wrote last."""
        if "plan" in entry:
            if entry["plan"] == self._plan:
                entry = {k: v for k, v in entry.items() if k != "plan"}
            else:
                self._plan = entry["plan"]
        os.write(self._fd, (json.dumps(entry, sort_keys=True) + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def write_header(path: str | os.PathLike, run: dict[str, Any]) -> None:
    """Start the record ``path`` with the ``run`` it records (``asyncdiff generate``'s settings),
    what ``asyncdiff inspect --replay`` runs again (Note [replay])."""
    with open(path, "w") as f:
        f.write(json.dumps({"run": run}, sort_keys=True) + "\n")


def read_record(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The step records of ``path``, ordered by call, denoiser, index and rank."""
    return read_run(path)[1]


def read_run(path: str | os.PathLike) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """``path``'s run header (None where it has none) and its step records, ordered by call,
    denoiser, index and rank."""
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    header = next((line["run"] for line in lines if "run" in line), None)
    entries = [line for line in lines if "run" not in line]
    return header, sorted(entries, key=lambda e: (e["call"], e["denoiser"], e["index"], e["rank"]))
