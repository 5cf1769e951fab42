"""Process groups and local launch, on top of torch.distributed and torchrun's launcher.

``launch(fn, nprocs, *args)`` starts ``nprocs`` local workers through torchrun's own launcher
(``torch.distributed.launcher``); under ``torchrun`` itself, use :func:`init_from_env` directly.
For several machines, start the program with ``torchrun --nnodes ...``: nothing here is
single-machine except :func:`launch`.

Note [one line per failure]: a rank whose ``fn`` raises returns a
:class:`~asyncdiff.engine.errors.Failure` (rank, where, type, message, innermost frames, and
the peer failure that caused it, if one did) instead of dying with a traceback; it leaves the
process group, so its peers' waits end at once (Note [failures reach every rank]). ``launch``
then raises one :class:`RankFailed` whose message is the root failure's line, e.g.
``[rank 1 | stage 1 | step 3] RuntimeError: injected failure`` (where every rank failed on a
bad-input ``ValueError``, a ``ValueError`` with that line: the commands' exit status 2). Each
rank's full traceback is logged at DEBUG (``ASYNCDIFF_LOG=debug``). A rank that dies without an exception (a signal)
ends the run through torchrun's launcher, reported in one line too.

Example (starts processes, so not run as a doctest)::

    results = launch(torch.distributed.get_world_size, 2)
    results   # {0: 2, 1: 2}
"""

from __future__ import annotations

import datetime
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from asyncdiff.engine.errors import Failure

__all__ = ["RankFailed", "init_from_env", "launch", "local_device", "root_failure", "under_torchrun"]

log = logging.getLogger(__name__)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def local_device() -> torch.device:
    """This process's device: its own GPU (``LOCAL_RANK``) where CUDA is present, else the CPU.
    ``ASYNCDIFF_DEVICE=cpu`` runs CPU processes on gloo even where CUDA is present."""
    choice = os.environ.get("ASYNCDIFF_DEVICE", "auto")
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"ASYNCDIFF_DEVICE={choice!r} must be 'auto', 'cpu' or 'cuda'")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(f"local rank {local_rank} has no GPU: this machine has {count} CUDA device(s); "
                           f"run at most {count} process(es) per machine (--devices / --nproc_per_node), "
                           f"or set ASYNCDIFF_DEVICE=cpu to run CPU processes")
    return torch.device("cuda", local_rank)


def init_from_env(timeout_s: float = 300.0) -> None:
    """Join the process group torchrun described in the environment (NCCL on CUDA, else gloo)."""
    if dist.is_initialized():
        return
    if not under_torchrun():
        raise RuntimeError("no process group: start this program with torchrun --nproc_per_node=N "
                           "(or asyncdiff generate --devices N)")
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))


class RankFailed(RuntimeError):
    """A launched run failed: the message is the root failure's one line (Note [one line per
    failure]); ``failures``: every rank's :class:`~asyncdiff.engine.errors.Failure` (or exit)."""

    def __init__(self, message: str, failures: dict[int, Any]) -> None:
        super().__init__(message)
        self.failures = failures


@record  # a rank that dies without a Python exception still reaches the launcher's error
def _worker(fn: Callable[..., Any], threads: int, timeout_s: float, args: tuple[Any, ...]) -> Any:
    torch.set_num_threads(threads)
    init_from_env(timeout_s)
    try:
        return fn(*args)
    except BaseException as err:  # noqa: BLE001 -- Note [one line per failure]
        failure = Failure.of(err, dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0)))
        log.debug("%s", failure.line(), exc_info=err)
        return failure
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, threads: int = 1,
           timeout_s: float = 300.0) -> dict[int, Any]:
    """Run ``fn(*args)`` on ``nprocs`` local processes in one process group; ``{rank: result}``.

    ``fn`` must be importable (a module-level function). Each process uses ``threads`` threads.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nprocs < 1:
        raise ValueError(f"nprocs={nprocs} must be >= 1")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
        start_method="spawn", local_addr="localhost",
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        results = elastic_launch(config, _worker)(fn, threads, timeout_s, args)
    except ChildFailedError as err:  # a rank died without a Python exception (a signal, os._exit)
        rank, failure = min(err.failures.items())
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        raise RankFailed(f"[rank {rank}] exited with {how} (pid {failure.pid}) before finishing",
                         err.failures) from None
    failures = {rank: r for rank, r in results.items() if isinstance(r, Failure)}
    if failures:
        root = root_failure(failures)
        if all(f.origin == "ValueError" for f in failures.values()):
            raise ValueError(root.cause())  # bad input that every rank found: the command's rc 2
        raise RankFailed(root.cause(), failures)
    return results


def root_failure(failures: dict[int, Failure]) -> Failure:
    """Note [one line per failure]: the failure at the origin, a rank's own (not one it met
    through a peer), the lowest such rank; else the lowest rank's."""
    own = [f for _, f in sorted(failures.items()) if not f.root]
    return own[0] if own else failures[min(failures)]
