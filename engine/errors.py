"""Errors from inside the engine, how they reach every rank, and which rank's error is the real one.

Note [failures reach every rank]: a rank never waits for a peer that has failed. Three paths:

- a decision rank 0 takes for all (the plan, the checks, the mesh, an encoder's output) runs
  under :func:`decided`: whatever it raises (any exception, ``KeyboardInterrupt`` included) is
  broadcast in place of the result, and every rank raises it: a ``ValueError`` (bad input) with
  its message unchanged, so the error reads the same at any device count, anything else as
  :class:`PeerFailed` naming the rank, the type and the message (rank 0 raises its own);
- a failure inside a step (:func:`located`) or in the pipeline between steps (:func:`announce`,
  from the adapter's call wrapper) is recorded in the process group's store (Note [first
  error]); the failed process exits (``launch``, torchrun, a worker group's driver stops the
  group at the first error reply), its peers' waits end with a lost connection, and they report
  the recorded cause beside their own error, all within a second or two;
- a peer that is alive but silent (stalled, or a failure its own code caught and survived) is
  met by the deadline of every wait (Note [deadlines] in config.py, at least 30 s): gloo cannot
  end a pending receive early without closing the connection, so nothing shorter is safe.

Example::

    >>> try:
    ...     decided(lambda: 1 / 0, src=0, group=None, rank=0)
    ... except ZeroDivisionError as err:
    ...     print(Failure.of(err, 0).line())
    [rank 0] ZeroDivisionError: division by zero
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from asyncdiff.logs import context, where

__all__ = ["Failure", "PeerFailed", "StageError", "announce", "decided", "located"]

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """An error inside the engine, prefixed with where it happened: ``[rank r | stage k | step t]``;
    ``root``: the first failure of the call on any rank (this one's own line if it was first)."""

    def __init__(self, message: str, root: str | None = None) -> None:
        super().__init__(message)
        self.root = root if root is not None else message


@dataclass(frozen=True)
class Failure:
    """An exception on one rank, in a form every rank can receive (picklable whatever raised it)."""

    rank: int
    where: str  # ``[rank r | stage k | step t]``, as much as is known (Note [log lines])
    kind: str  # the exception's type name
    message: str
    trace: str  # the innermost frames, ``file:line in function``, innermost last
    root: str = ""  # the line of the failure that caused this one (a peer's), "" where it is its own
    origin: str = ""  # the type of the exception at the bottom (a StageError's cause's)

    @classmethod
    def of(cls, err: BaseException, rank: int) -> Failure:
        frames = traceback.extract_tb(err.__traceback__)[-4:]
        trace = " -> ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}" for f in frames)
        where = context() or f"[rank {rank}]"
        if isinstance(err, StageError):  # its message says where already
            origin = err.__cause__.failure.origin if isinstance(err.__cause__, PeerFailed) else \
                type(err.__cause__ or err).__name__
            return cls(rank, "", "", str(err), trace, "" if err.root == str(err) else err.root, origin)
        if isinstance(err, PeerFailed):
            return cls(rank, where, type(err).__name__, str(err), trace, err.failure.cause(), err.failure.origin)
        return cls(rank, where, type(err).__name__, str(err), trace, "", type(err).__name__)

    def line(self) -> str:
        return " ".join(part for part in (self.where, f"{self.kind}:" if self.kind else "", self.message) if part)

    def cause(self) -> str:
        """The line of the failure at the origin: a peer's, or this one."""
        return self.root or self.line()


class PeerFailed(RuntimeError):
    """Raised on the other ranks when rank ``failure.rank`` failed in work they wait for."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.line())
        self.failure = failure


def decided(compute: Callable[[], Any], *, src: int, group: dist.ProcessGroup | None, rank: int) -> Any:
    """``compute()`` on rank ``src``, its result on every rank of ``group`` (None: this rank alone);
    what it raises is raised on every rank (Note [failures reach every rank])."""
    result, failure, original = None, None, None
    if rank == src:
        try:
            result = compute()
        except ValueError as err:
            failure, original = ("ValueError", str(err)), err
        except BaseException as err:  # noqa: BLE001 -- every rank must hear of it, whatever it is
            failure, original = ("other", Failure.of(err, rank)), err
            log.debug("failed: %s", failure[1].line(), exc_info=err)
    if group is not None:
        box = [(result, failure)]
        dist.broadcast_object_list(box, src=src, group=group)
        result, failure = box[0]
    if original is not None:
        raise original
    if failure is not None:
        kind, what = failure
        raise ValueError(what) if kind == "ValueError" else PeerFailed(what)
    return result


@contextlib.contextmanager
def located(stage: int, step: int, call: int | str) -> Iterator[None]:
    """Raise anything but a :class:`StageError` as one prefixed ``[rank r | stage k | step t]``,
    with the first failure of pipeline call ``call`` on any rank beside it (Note [first error]);
    inside, log lines name the stage and step (Note [log lines])."""
    with where(stage, step):
        try:
            yield
        except StageError:
            raise
        except Exception as err:
            # a peer's failure reads as that peer wrote it, so every rank reports the same line
            text = str(err) if isinstance(err, PeerFailed) else f"{context()} {type(err).__name__}: {err}"
            log.debug("failed", exc_info=err)
            first = _record_first(text, call)
            same = first.split("] ", 1)[-1] == text.split("] ", 1)[-1]  # one error all ranks raise (a broadcast one)
            root = err.failure.cause() if isinstance(err, PeerFailed) else text if same else first
            raise StageError(text if same else f"{text}; the first failure was {first}", root) from err


def _record_first(mine: str, call: int | str) -> str:
    """Note [first error]: when a stage fails, its peers fail too, with a lost connection, and
    the launcher may report either. So every failing rank records its error in the process
    group's store unless one is there already, and reports that first one beside its own.
    The stage that really failed records first: its peers only notice once it has gone.
    Returns the first recorded error (``mine`` where there is no store)."""
    store = _default_store()
    if store is None:
        return mine
    try:
        return store.compare_set(_key(call), "", mine).decode()
    except Exception:  # noqa: BLE001 -- the store left with the rank that hosted it
        return mine


def announce(call: int | str, err: BaseException) -> None:
    """Record ``err``, raised by this rank outside a step of pipeline call ``call``, as the call's
    first failure unless one is recorded (Note [failures reach every rank])."""
    if not isinstance(err, StageError):
        _record_first(f"{context()} {type(err).__name__}: {err} (in the pipeline, between denoiser steps)", call)


def _key(call: int | str) -> str:
    return f"asyncdiff/first_error/{call}"


def _default_store() -> dist.Store | None:
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None
