"""Persistent workers: one process group that runs many calls (the shape of vLLM's worker loop).

Note [persistent workers]: :func:`~asyncdiff.engine.launch.launch` starts, imports and joins its
processes for every call, which costs seconds per call on a small machine (7.7 s for two
processes that import diffusers, on 2 cores) before any work. A :class:`WorkerGroup` starts its
processes once. The driver (the process that made the group) submits one call, a module-level
function and its arguments, to every rank; each rank's loop runs it and replies with its result
or its error (traceback text). A call starts as in a fresh process: torch's default generator at
its initial seed, warning filters as they were. At the first error reply, or a rank that died,
the driver stops every rank (one may wait in a collective the failed rank never joined) and
raises :class:`WorkerError` naming that rank; the next call starts a fresh group, because a
failed call may leave messages in flight that the next call would receive. A call that outlives
``timeout_s`` stops the group the same way.

A call can report while it runs: :func:`emit` on a rank puts an event (any picklable value) on
the group's event queue, which the driver reads with :meth:`WorkerGroup.events` (a server's
progress of a video job, its per-step times).

Example (starts processes, so not run as a doctest)::

    with WorkerGroup(2) as workers:
        workers.run(torch.distributed.get_world_size)   # {0: 2, 1: 2}
        workers.run(torch.distributed.get_rank)         # {0: 0, 1: 1}, the same processes
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.distributed as dist

from asyncdiff.engine.launch import init_from_env

__all__ = ["WorkerError", "WorkerGroup", "emit"]

log = logging.getLogger(__name__)

_EVENTS: Any = None  # in a worker: its group's event queue


def emit(event: Any) -> None:
    """Put ``event`` on the driver's event queue (nothing outside a worker group)."""
    if _EVENTS is not None:
        _EVENTS.put(event)


class WorkerError(RuntimeError):
    """A call failed on ``rank`` (``details``: its traceback, or why it stopped)."""

    def __init__(self, rank: int, details: str) -> None:
        last = details.strip().splitlines()[-1] if details.strip() else "failed"
        super().__init__(f"[rank {rank}] {last}\n{details}")
        self.rank, self.details = rank, details


class WorkerGroup:
    """``nprocs`` local processes in one process group (gloo on the CPU, NCCL on GPUs), started at
    the first :meth:`run` and kept until :meth:`close` (Note [persistent workers])."""

    def __init__(self, nprocs: int, *, threads: int = 1, timeout_s: float = 300.0) -> None:
        if nprocs < 1:
            raise ValueError(f"nprocs={nprocs} must be >= 1")
        self.nprocs, self.threads, self.timeout_s = nprocs, threads, timeout_s
        self._procs: list[mp.process.BaseProcess] = []
        self._inboxes: list[Any] = []
        self._outbox: Any = None
        self._events: Any = None
        self.starts = 0  # groups started so far

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None,
            failure: Callable[[Any], str | None] | None = None, grace_s: float = 2.0) -> dict[int, Any]:
        """``fn(*args)`` on every rank; ``{rank: result}``. ``fn`` must be importable by the workers;
        ``timeout_s``: this call's deadline (default: the group's). ``failure``: tells a result
        that reports a failure (its message; None for success): once one arrives the other ranks
        have ``grace_s`` to reply (a failure every rank met), else the group stops as for an error."""
        if not self.alive:
            self._start()
        payload = pickle.dumps((fn, args))
        for inbox in self._inboxes:
            inbox.put(payload)
        replies, failed = self._collect(time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s),
                                        failure, grace_s)
        if failed is not None:
            self.close()
            raise WorkerError(*failed)
        return {rank: pickle.loads(data) for rank, data in sorted(replies.items())}

    def close(self) -> None:
        """Stop every rank (a stuck one is killed); a later :meth:`run` starts a fresh group."""
        for inbox in self._inboxes:
            inbox.put(None)
        for p in self._procs:
            p.join(2.0)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for q in (*self._inboxes, *[q for q in (self._outbox, self._events) if q is not None]):
            q.close()
            q.join_thread()
        self._procs, self._inboxes, self._outbox, self._events = [], [], None, None

    def events(self) -> list[Any]:
        """The events the ranks emitted since the last look (:func:`emit`), in arrival order."""
        found = []
        while self._events is not None:
            try:
                found.append(self._events.get_nowait())
            except (queue.Empty, OSError, ValueError):
                break
        return found

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if self._procs:
            self.close()

    # -- helpers ----------------------------------------------------------------------------
    def _start(self) -> None:
        self.close()
        context = mp.get_context("spawn")
        port = _free_port()
        self._outbox, self._events = context.Queue(), context.Queue()
        self._inboxes = [context.Queue() for _ in range(self.nprocs)]
        self._procs = [context.Process(target=_loop, name=f"asyncdiff-worker-{rank}", daemon=True,
                                       args=(rank, self.nprocs, port, self._inboxes[rank], self._outbox,
                                             self._events, self.threads, self.timeout_s))
                       for rank in range(self.nprocs)]
        for p in self._procs:
            p.start()
        self.starts += 1
        ready, failed = self._collect(time.monotonic() + self.timeout_s)
        if failed is not None:
            self.close()
            raise WorkerError(*failed)
        log.info("started %d workers (group %d) on port %d", self.nprocs, self.starts, port)

    def _collect(self, deadline: float, failure: Callable[[Any], str | None] | None = None,
                 grace_s: float = 2.0) -> tuple[dict[int, bytes], tuple[int, str] | None]:
        """Every rank's reply, or the first failure: ``(rank, details)``."""
        replies: dict[int, bytes] = {}
        failed: tuple[int, str] | None = None
        reported: tuple[int, str] | None = None  # the first result that reports a failure
        while len(replies) < self.nprocs and failed is None:
            left = deadline - time.monotonic()
            if left <= 0:
                if reported is not None:
                    return replies, self._died() or reported
                silent = sorted(set(range(self.nprocs)) - set(replies))
                return replies, (silent[0], f"no reply from rank(s) {silent} by the call's deadline "
                                            f"(timeout_s); every rank was stopped")
            try:
                rank, ok, data = self._outbox.get(timeout=min(left, 0.2))
            except queue.Empty:
                failed = self._died(exclude=replies)
                continue
            if ok:
                replies[rank] = data
                message = failure(pickle.loads(data)) if failure is not None and reported is None else None
                if message is not None:
                    reported = (rank, message)
                    deadline = min(deadline, time.monotonic() + grace_s)
            else:  # a rank whose peer died fails too (a lost connection): the dead rank is the cause
                failed = self._died(wait_s=0.5) or (rank, data)
        return replies, failed

    def _died(self, exclude: Collection[int] = (), wait_s: float = 0.0) -> tuple[int, str] | None:
        """The first rank (not in ``exclude``) whose process has exited, waiting up to ``wait_s`` for one."""
        until = time.monotonic() + wait_s
        while True:
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in exclude]
            if dead or time.monotonic() >= until:
                break
            time.sleep(0.05)
        if not dead:
            return None
        return dead[0], f"rank {dead[0]} exited with code {self._procs[dead[0]].exitcode} during the call"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loop(rank: int, world: int, port: int, inbox: Any, outbox: Any, events: Any, threads: int,
          timeout_s: float) -> None:
    """A rank's loop: join the group, then run each submitted call and reply, until told to stop."""
    global _EVENTS
    _EVENTS = events
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    try:
        init_from_env(timeout_s)
    except Exception:
        outbox.put((rank, False, traceback.format_exc()))
        return
    seed = torch.initial_seed()
    outbox.put((rank, True, b""))
    while (payload := inbox.get()) is not None:
        torch.manual_seed(seed)
        try:
            fn, args = pickle.loads(payload)
            with warnings.catch_warnings():
                reply = (rank, True, pickle.dumps(fn(*args)))
        except Exception:
            reply = (rank, False, traceback.format_exc())
        outbox.put(reply)
    dist.destroy_process_group()
