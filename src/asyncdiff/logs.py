"""Logging: the standard :mod:`logging` module, one logger per module (``asyncdiff.<package>.<module>``).

Note [log lines]: every line says where it was written, ``[rank r | stage s | step t]``: the
rank from the process group (where there is one), the stage and step from :func:`where`, which the
engine enters around each step (``asyncdiff.engine.errors.located``). Levels: WARNING by default
(quiet: only what a user must know); INFO says what was traced, planned, loaded and checked and
how long each took; DEBUG adds each transfer and each step's program. The level comes from
``ASYNCDIFF_LOG`` (``debug``, ``info``, ``warning``, ``error``) or a command's ``--log-level``.
The library writes no ``print``; the commands print their results (JSON, tables) on stdout and
log on stderr.

``configure`` gives the ``asyncdiff`` logger one stderr handler with that format (idempotent).
Importing ``asyncdiff`` calls it only where ``ASYNCDIFF_LOG`` is set, so an application that
configures logging itself keeps its own handlers (the records propagate to them as usual).

Example::

    >>> with where(stage=1, step=7):
    ...     context()
    '[stage 1 | step 7]'
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Iterator

__all__ = ["LEVELS", "configure", "context", "where"]

LEVELS = ("debug", "info", "warning", "error")
_WHERE: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("asyncdiff_where", default=None)
_HANDLER_NAME = "asyncdiff"


@contextlib.contextmanager
def where(stage: int, step: int) -> Iterator[None]:
    """Inside: log lines (and errors, :func:`context`) name this stage and step."""
    token = _WHERE.set((stage, step))
    try:
        yield
    finally:
        _WHERE.reset(token)


def context() -> str:
    """``[rank r | stage s | step t]``, with the parts that are known here (Note [log lines])."""
    parts = []
    rank = _rank()
    if rank is not None:
        parts.append(f"rank {rank}")
    at = _WHERE.get()
    if at is not None:
        parts += [f"stage {at[0]}", f"step {at[1]}"]
    return f"[{' | '.join(parts)}]" if parts else ""


def _rank() -> int | None:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except (ImportError, RuntimeError, ValueError):
        pass
    rank = os.environ.get("RANK")
    return int(rank) if rank is not None and rank.isdigit() else None


class _Where(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.where = context()
        return True


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written (a test's capture, a
    redirected stream), not the one it was when the handler was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: ANN201 -- logging.StreamHandler's attribute
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def level_of(text: str | None, field: str = "ASYNCDIFF_LOG") -> int:
    """The logging level ``text`` names (None: WARNING); a clear error for another word."""
    if text is None or text == "":
        return logging.WARNING
    if text.lower() not in LEVELS:
        raise ValueError(f"{field}={text!r} is not a log level: use one of {', '.join(LEVELS)}")
    return getattr(logging, text.upper())


def configure(level: str | None = None) -> None:
    """Log ``asyncdiff.*`` at ``level`` (default: ``ASYNCDIFF_LOG``, else WARNING) to stderr, one
    line each, ``LEVEL asyncdiff.engine.comm [rank 1 | stage 1 | step 7] message``. Sets
    ``ASYNCDIFF_LOG`` too, so processes started from here (the ranks) log alike."""
    chosen = level if level is not None else os.environ.get("ASYNCDIFF_LOG")
    numeric = level_of(chosen, "--log-level" if level is not None else "ASYNCDIFF_LOG")
    if chosen:
        os.environ["ASYNCDIFF_LOG"] = chosen.lower()
    logger = logging.getLogger("asyncdiff")
    logger.setLevel(numeric)
    if not any(getattr(h, "name", None) == _HANDLER_NAME for h in logger.handlers):
        handler = _Stderr()
        handler.name = _HANDLER_NAME
        handler.addFilter(_Where())
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(where)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False  # one line per record, not a second one from the root's handler

