"""Errors from inside the engine, and which rank's error is the real one (Note [first error])."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

__all__ = ["StageError", "first_error", "located"]


class StageError(RuntimeError):
    """An error inside the engine, prefixed with where it happened: ``[stage k | step t]``."""


@contextlib.contextmanager
def located(stage: int, step: int, call: int | str) -> Iterator[None]:
    """Raise anything but a :class:`StageError` as one prefixed ``[stage k | step t]``, with the
    first failure of pipeline call ``call`` on any rank beside it (Note [first error])."""
    try:
        yield
    except StageError:
        raise
    except Exception as err:
        raise StageError(first_error(f"[stage {stage} | step {step}] {type(err).__name__}: {err}", call)) from err


def first_error(mine: str, call: int | str) -> str:
    """Note [first error]: when a stage fails, its peers fail too, with a lost connection, and
    the launcher may report either. So every failing rank records its error in the process
    group's store unless one is there already, and reports that first one beside its own.
    The stage that really failed records first: its peers only notice once it has gone."""
    store = _default_store()
    if store is None:
        return mine
    try:
        first = store.compare_set(f"asyncdiff/first_error/{call}", "", mine).decode()
    except Exception:  # the store left with the rank that hosted it
        return mine
    same = first.split("] ", 1)[-1] == mine.split("] ", 1)[-1]  # one error all ranks raise (a broadcast one)
    return mine if first == mine or same else f"{mine}; the first failure was {first}"


def _default_store() -> dist.Store | None:
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None
