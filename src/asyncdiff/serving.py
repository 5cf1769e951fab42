"""The server's side of the worker group: a bounded queue, dynamic batches, restarts, metrics.

Note [dynamic batching]: one thread owns the :class:`~asyncdiff.engine.workers.WorkerGroup`
(Note [serving loop] in service.py). It takes the oldest queued request and, for up to
``batch_wait_ms`` after that request arrived, the next ones with the same
:func:`~asyncdiff.request.batch_key` while the batch stays within ``max_batch`` images; they run
as one pipeline call, each image with its own seed's generator (Note [one request record]). A
failure of the group (a rank that died, a call past ``worker_timeout``, a failure not every rank
met) fails that batch with 503, restarts the group (at most ``max_restarts`` times in a row) and
the queue runs on; a clean failure (every rank, nothing in flight) fails the batch with 500 and
the group serves on. A request whose client gave up (``request_timeout``) is dropped from the
queue, or its result is dropped when it comes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from asyncdiff.engine.workers import WorkerError, WorkerGroup
from asyncdiff.generate import GenerateSpec
from asyncdiff.request import GenerationRequest, batch_key

__all__ = ["Busy", "Failed", "Metrics", "Ticket", "Unavailable", "Workers"]

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """The queue is full (HTTP 429)."""


class Unavailable(RuntimeError):
    """The workers are not ready, restarting, or draining, or died under this request (HTTP 503)."""


class Failed(RuntimeError):
    """The pipeline call failed on the workers (HTTP 500); they serve on."""


@dataclass(eq=False)
class Ticket:
    request: GenerationRequest
    job: str | None = None  # a video job's id: its progress arrives as events
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # its client gave up


class Metrics:
    """Prometheus metrics of one server (its own registry): requests by status, queue depth,
    batch sizes, request latency and per-step time."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("asyncdiff_requests", "HTTP generation requests by status code", ["status"],
                                registry=self.registry)
        self.queue = Gauge("asyncdiff_queue_depth", "requests waiting for the workers", registry=self.registry)
        self.batch = Histogram("asyncdiff_batch_images", "images per pipeline call", registry=self.registry,
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.latency = Histogram("asyncdiff_request_seconds", "a generation request's time, queue included",
                                 registry=self.registry, buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
        self.step = Histogram("asyncdiff_step_seconds", "one denoising step of a pipeline call",
                              registry=self.registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.restarts = Counter("asyncdiff_worker_restarts", "worker group restarts", registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Workers:
    """The worker group of ``spec`` behind a queue (Note [dynamic batching]); ``state``: starting,
    ready, restarting, failed (restarts used up), draining or stopped."""

    def __init__(self, spec: GenerateSpec, *, max_batch: int = 4, batch_wait_ms: float = 10.0, max_queue: int = 64,
                 worker_timeout: float = 300.0, max_restarts: int = 3, metrics: Metrics | None = None) -> None:
        self.spec, self.max_batch, self.batch_wait = spec, max_batch, batch_wait_ms / 1000
        self.max_queue, self.worker_timeout, self.max_restarts = max_queue, worker_timeout, max_restarts
        self.metrics = metrics or Metrics()
        self.state, self.restarts, self.reason, self.info = "starting", 0, "", {}
        self.jobs: dict[str, dict[str, Any]] = {}  # a video job's progress: steps done and total
        self._queue: collections.deque[Ticket] = collections.deque()
        self._cv = threading.Condition()
        self._group = WorkerGroup(spec.devices, threads=spec.threads_per_device, timeout_s=worker_timeout)
        self._thread = threading.Thread(target=self._serve, name="asyncdiff-batcher", daemon=True)
        self._events = threading.Thread(target=self._read_events, name="asyncdiff-events", daemon=True)
        self._stopping = False

    # -- the HTTP side ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._events.start()

    def submit(self, request: GenerationRequest, job: str | None = None) -> Ticket:
        with self._cv:
            if self.state in ("failed", "draining", "stopped"):
                raise Unavailable(f"the workers are {self.state}" + (f": {self.reason}" if self.reason else ""))
            if len(self._queue) >= self.max_queue:
                raise Busy(f"the queue is full ({self.max_queue} requests waiting, --max-queue); retry later")
            ticket = Ticket(request, job)
            self._queue.append(ticket)
            self.metrics.queue.set(len(self._queue))
            self._cv.notify_all()
        return ticket

    def abandon(self, ticket: Ticket) -> None:
        with self._cv:
            ticket.abandoned = True
            if ticket in self._queue:
                self._queue.remove(ticket)
                self.metrics.queue.set(len(self._queue))

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def pids(self) -> list[int]:
        return self._group.pids

    def drain(self) -> None:
        """Take no more requests; the queued ones still run."""
        with self._cv:
            if self.state != "stopped":
                self.state = "draining"

    def close(self, timeout_s: float = 50.0) -> None:
        """Finish the queued requests (up to ``timeout_s``), then stop every rank."""
        self.drain()
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._queue and time.monotonic() < deadline and self._thread.is_alive():
                self._cv.wait(0.1)
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._group.close()
        self.state = "stopped"
        for ticket in list(self._queue):
            _fail(ticket, Unavailable("the server stopped before this request ran"))

    # -- the batcher thread -----------------------------------------------------------------
    def _serve(self) -> None:
        failures = 0
        while not self._stopping:
            if not self._group.alive:
                if not self._load(failures):
                    failures += 1
                    if failures > self.max_restarts:
                        self._give_up()
                        return
                    continue
                failures = 0
            batch = self._next_batch()
            if batch:
                self._run(batch)

    def _load(self, failures: int) -> bool:
        from asyncdiff import service

        if self.state != "starting":
            self.state = "restarting" if self.state != "draining" else self.state
        try:
            self.info = self._group.run(service.load, self.spec)[0]
        except WorkerError as err:
            self.reason = str(err).splitlines()[0]
            log.error("loading the workers failed (%d of %d tries): %s", failures + 1, self.max_restarts + 1,
                      self.reason)
            return False
        if self.state in ("starting", "restarting"):
            self.state = "ready"
        log.info("%d worker(s) ready: %s (pids %s)", self.spec.devices, self.info.get("pipeline"), self.pids)
        return True

    def _give_up(self) -> None:
        with self._cv:
            self.state = "failed"
            waiting, self._queue = list(self._queue), collections.deque()
        for ticket in waiting:
            _fail(ticket, Unavailable(f"the workers could not start: {self.reason}"))

    def _next_batch(self) -> list[Ticket]:
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait(0.2)
            if not self._queue:
                return []
            first = self._queue.popleft()
            batch, key = [first], batch_key(first.request)
            images = first.request.images
            until = first.queued + self.batch_wait
            while key is not None and images < self.max_batch:
                alike = next((t for t in self._queue if batch_key(t.request) == key and t.job is None
                              and images + t.request.images <= self.max_batch), None)
                if alike is not None:
                    self._queue.remove(alike)
                    batch.append(alike)
                    images += alike.request.images
                    continue
                left = until - time.monotonic()
                if left <= 0 or self._stopping:
                    break
                self._cv.wait(left)
            self.metrics.queue.set(len(self._queue))
            self._cv.notify_all()  # close() waits for the queue to empty
        return batch

    def _run(self, batch: list[Ticket]) -> None:
        from asyncdiff import service

        requests = tuple(t.request for t in batch)
        job = batch[0].job
        if job is not None:
            self.jobs[job].update(status="running")
        self.metrics.batch.observe(sum(r.images for r in requests))
        try:
            replies = self._group.run(service.generate, requests, job, timeout_s=self.worker_timeout,
                                      failure=_error_of)
        except WorkerError as err:
            line = str(err).splitlines()[0]
            log.error("the workers failed under a batch of %d request(s): %s; restarting them", len(batch), line)
            self.restarts += 1
            self.metrics.restarts.inc()
            self.reason = line
            for ticket in batch:
                _fail(ticket, Unavailable(f"{line}; the workers restart"))
            return
        except Exception as err:  # noqa: BLE001 -- the driver's own failure (say, a request it cannot send)
            log.exception("a batch of %d request(s) failed in the driver", len(batch))
            self._group.close()
            for ticket in batch:
                _fail(ticket, Failed(f"{type(err).__name__}: {err}"))
            return
        errors = {rank: reply for rank, reply in replies.items() if reply.error}
        if errors:
            rank, reply = min(errors.items())
            clean = len(errors) == len(replies) and all(r.clean for r in errors.values())
            log.warning("a batch failed%s: %s", "" if clean else " (transfers in flight: restarting the workers)",
                        reply.error)
            for ticket in batch:
                _fail(ticket, Failed(reply.error))
            if not clean:
                self.restarts += 1
                self.metrics.restarts.inc()
                self._group.close()
            return
        first = replies[0]
        for ticket, files in zip(batch, first.outputs):
            if not ticket.abandoned and not ticket.future.done():
                ticket.future.set_result((files, first.media_type))

    def _read_events(self) -> None:
        while self.state != "stopped":
            for event in self._group.events():
                if event[0] == "step":
                    _, job, done, total, seconds = event
                    self.metrics.step.observe(seconds)
                    if job in self.jobs:
                        self.jobs[job].update(done=done, total=total)
            time.sleep(0.05)


def _error_of(reply: Any) -> str | None:
    return reply.error  # a service.Reply (module-level: the group's early stop reads it)


def _fail(ticket: Ticket, err: Exception) -> None:
    if not ticket.future.done():
        ticket.future.set_exception(err)
