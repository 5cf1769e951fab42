"""``launch`` for the tests on persistent workers: one group per process count, kept for the
session (Note [persistent workers] in :mod:`asyncdiff.engine.workers`). Tests of failures that
``launch``'s torchrun launcher reports (``ChildFailedError``), or of a rank's deadline, use
:func:`asyncdiff.engine.launch.launch` itself."""

from __future__ import annotations

import atexit
from collections.abc import Callable
from typing import Any

from asyncdiff.engine.workers import WorkerGroup

KEPT = 2  # groups kept at once (the least recently used one is closed)

_groups: dict[tuple[int, int], WorkerGroup] = {}


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, threads: int = 1,
           timeout_s: float | None = None) -> dict[int, Any]:
    """As :func:`asyncdiff.engine.launch.launch`, on the session's group of ``nprocs`` workers
    (``timeout_s``: the call's deadline)."""
    key = (nprocs, threads)
    group = _groups.pop(key, None) or WorkerGroup(nprocs, threads=threads)
    _groups[key] = group  # now the most recently used
    while len(_groups) > KEPT:
        _groups.pop(next(iter(_groups))).close()
    return group.run(fn, *args, timeout_s=timeout_s)


@atexit.register
def close_all() -> None:
    while _groups:
        _groups.popitem()[1].close()
