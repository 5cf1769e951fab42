"""Point-to-point transfer of a stage's boundary values: one packed message per segment pair per step.

Only the values a peer needs travel, and only to that peer (no broadcast of every block's
output). All values one segment sends to one other segment in a step share one message (one per
peer per step for a contiguous plan). Layouts (shapes and dtypes per message) are fixed from the
traced specs before the first step, so both sides agree on sizes without a handshake; a mismatch
is an error. Each message has its own tag, so messages between the same two ranks never mix.
Operations are posted with ``batch_isend_irecv``, which NCCL needs when two ranks send to each
other in the same step.

Note [overlap]: in an asynchronous step a stage posts its sends and the receives for the next
step right after its compute, and waits for them only at the start of the next step, so the
transfer runs during the pipeline's scheduler step and the output broadcast. On CPU, gloo moves
the bytes on its own threads (which needs a free core: with one busy process per core the
transfer costs CPU time instead of overlapping, see BENCHMARKS.md). On CUDA a channel has its own
communication stream beside the compute stream:

    compute stream:  step t compute --(event)--+                 wait(step t+1 works) -> compute
    comm stream:                               +-> pack -> isend/irecv (NCCL) ...^

``post`` makes the comm stream wait for an event recorded on the compute stream after step t's
compute (so packing reads finished values, and a receive never overwrites a buffer that queued
compute still reads), then packs and posts the NCCL operations from the comm stream; the values
it packed are marked as used there (``record_stream``) so the caching allocator cannot hand their
memory to the compute stream early. ``wait`` calls ``Work.wait()`` from the compute stream, which
makes that stream, not the host, wait for the transfer. Receive buffers are allocated once. No
host synchronisation happens inside the step loop except the pipeline's own.

Note [exact warm-up]: with a transfer dtype, only asynchronous steps send in it. Warm-up and
refresh steps (sequential: every stage waits for this step's values) send values in their own
dtype, so an all-warm-up run equals the sequential model whatever the transfer dtype, and a
refresh really resets the drift. Both sides know which kind a step is from the schedule, so each
message has two layouts and two receive buffers (one, when there is no transfer dtype).

Note [strides on the wire]: a value crossing stages arrives as a new tensor, and if it arrived
contiguous where the sender's was not (an attention output transposed back to (B, N, C) order,
a channels-last activation), the receiver's next matmul or convolution would read it with other
strides, take another kernel path and round differently: measured on DeepFloyd IF's UNet,
1-2e-6 per call for 6 of 17 cut points, 3e-5 after three steps, while the same cuts run in one
process are bit for bit the unsplit graph. So the trace records each dense value's memory order
(``TensorSpec.order``); the sender sends the value permuted into that order (a view, contiguous
when the value is laid out as traced, so packing reads memory in order), and the receiver
permutes the received view back: the same shape and strides as the sender's tensor, no copy.
Values that are not dense (slices) travel contiguous, as before.

Example (not run here: needs a process group):
    channel = StageChannel(program, n_segments, {0: [0], 1: [1]}, group=group, device=torch.device("cpu"))
    pending = channel.post(sends={key: values}, recvs=channel.recv_keys)
    received = channel.wait(pending)
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx

from asyncdiff.engine.config import DEADLINE_FACTOR, DEADLINE_FLOOR_S
from asyncdiff.kernels.pack import PackLayout, pack, unpack
from asyncdiff.partition.split import StageProgram, Transfer
from asyncdiff.partition.specs import TensorSpec
from asyncdiff.partition.traced import TracedDenoiser

__all__ = ["Pending", "StageChannel", "output_template", "posted", "share_output", "unpack_output"]

log = logging.getLogger(__name__)

_POSTED = [0]  # transfers this process has posted so far (Note [serving loop] in asyncdiff/service.py)


def posted() -> int:
    """How many point-to-point transfers this process has posted: a call that failed before
    posting any left nothing in flight."""
    return _POSTED[0]

Key = tuple[int, int]  # (source segment, destination segment)


@dataclass
class Pending:
    works: list[dist.Work] = field(default_factory=list)
    recvs: list[Key] = field(default_factory=list)
    keep_alive: list[torch.Tensor] = field(default_factory=list)  # send buffers in flight
    exact: bool = False


def finish(works: Iterable[dist.Work], deadline: datetime.timedelta | None) -> None:
    """Wait for ``works``; past ``deadline``, a ``TimeoutError`` that says a peer failed or stalled.

    The deadline is told by the clock, not by the backend's message (gloo raises a plain
    ``RuntimeError`` for its timeout and for a lost connection alike): a wait that fails once the
    deadline has passed is the deadline; one that fails earlier is the backend's own error."""
    start = time.monotonic()
    try:
        for work in works:
            work.wait() if deadline is None else work.wait(deadline)
    except RuntimeError as err:
        if deadline is None or time.monotonic() - start < 0.95 * deadline.total_seconds():
            raise
        raise TimeoutError(f"a peer stage sent nothing within {deadline.total_seconds():.0f} s (Note [deadlines]: "
                           f"{DEADLINE_FACTOR:g}x the median step time, at least {DEADLINE_FLOOR_S:g} s, at most "
                           "timeout_s): it failed or stalled") from err


class StageChannel:
    """The point-to-point :class:`~asyncdiff.engine.stage.Transport` (Note [one interpreter] in stage.py)."""

    def __init__(self, program: StageProgram, n_segments: int, destinations: Mapping[int, list[int]],
                 group: dist.ProcessGroup | None, device: torch.device,
                 transfer_dtype: torch.dtype | None = None, branch: int = 0,
                 collective: dist.ProcessGroup | None = None) -> None:
        """``destinations[stage]``: the ranks that run ``stage`` (the first one sends its values);
        ``transfer_dtype``: narrower dtype floating-point values travel in (None: their own);
        ``branch``: which call of a step this channel serves (own tags and buffers, Note [branches]
        in runtime.py); ``collective``: the group the step's output is broadcast over."""
        self.destinations, self.group, self.device, self.n_segments = destinations, group, device, n_segments
        self.branch, self.collective = branch, collective
        self.recv_groups = _grouped(program.recv)
        self.send_groups = _grouped(program.send)
        specs = {key: [(_wire_shape(t.spec), t.spec.torch_dtype) for t in ts]
                 for key, ts in {**self.recv_groups, **self.send_groups}.items()}
        # Note [exact warm-up]: two layouts per message, for asynchronous and for sequential steps.
        self.layouts = {key: PackLayout.of(spec, transfer_dtype) for key, spec in specs.items()}
        self.exact_layouts = {key: PackLayout.of(spec) for key, spec in specs.items()}
        # One receive buffer per message and layout suffices: a step's received views are consumed
        # by its compute before the next receive into the same buffer is posted (Note [stale inputs]).
        self.buffers: dict[tuple[Key, bool], torch.Tensor] = {}
        for key in self.recv_groups:
            self.buffers[key, True] = torch.empty(self.exact_layouts[key].nbytes, dtype=torch.uint8, device=device)
            self.buffers[key, False] = self.buffers[key, True] if transfer_dtype is None else \
                torch.empty(self.layouts[key].nbytes, dtype=torch.uint8, device=device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # Note [overlap]
        self.deadline: datetime.timedelta | None = None  # how long a wait may take (Note [deadlines] in config.py)

    @property
    def recv_keys(self) -> list[Key]:
        return list(self.recv_groups)

    @property
    def bytes_sent_per_step(self) -> int:
        return sum(self.layouts[key].nbytes * len(self.destinations[ts[0].dst])
                   for key, ts in self.send_groups.items())

    def sends_from(self, segment: int) -> list[Key]:
        return [key for key in self.send_groups if key[0] == segment]

    def recvs_into(self, segment: int) -> list[Key]:
        return [key for key in self.recv_groups if key[1] == segment]

    def post(self, values: Mapping[str, torch.Tensor], sends: Iterable[Key], recvs: Iterable[Key],
             exact: bool = False) -> Pending:
        """Start sending ``sends`` (packed from ``values``) and receiving ``recvs``; ``exact``: in
        the values' own dtypes, not the transfer dtype (Note [exact warm-up])."""
        ops, pending, sends = [], Pending(exact=exact), list(sends)
        layouts = self.exact_layouts if exact else self.layouts
        with self._comm_stream():
            for key in sends:
                buffer = self._pack(values, key, layouts)
                for rank in self.destinations[self.send_groups[key][0].dst]:
                    ops.append(dist.P2POp(dist.isend, buffer, rank, self.group, self._tag(key)))
                pending.keep_alive.append(buffer)
            for key in recvs:
                src = self.destinations[self.recv_groups[key][0].src][0]
                ops.append(dist.P2POp(dist.irecv, self.buffers[key, exact], src, self.group, self._tag(key)))
                pending.recvs.append(key)
            if ops:
                _POSTED[0] += len(ops)
                pending.works = dist.batch_isend_irecv(ops)
        if ops and log.isEnabledFor(logging.DEBUG):
            sent = [f"send {a}>{b} ({layouts[a, b].nbytes} B) to rank(s) "
                    f"{self.destinations[self.send_groups[a, b][0].dst]}" for a, b in sends]
            received = [f"receive {a}>{b} ({layouts[a, b].nbytes} B) from rank "
                        f"{self.destinations[self.recv_groups[a, b][0].src][0]}" for a, b in pending.recvs]
            log.debug("posted %s", ", ".join(sent + received))
        return pending

    def ready(self, pending: Pending) -> bool:
        """Whether :meth:`wait` can return without waiting for a peer: a point-to-point wait
        blocks instead, so always (Note [one interpreter] in stage.py)."""
        return True

    def wait(self, pending: Pending) -> dict[str, torch.Tensor]:
        """Finish ``pending``; the received values, as views into the receive buffers."""
        finish(pending.works, self.deadline)
        return self._values(pending, {key: self.buffers[key, pending.exact] for key in pending.recvs})

    def shared(self, owner: int) -> bool:
        """Whether :meth:`share` can return without waiting for ``owner``: always (it blocks)."""
        return True

    def share(self, compiled: Any, leaves: tuple[Any, ...], owner: int, me: int) -> Any:
        """The step's output on every rank of the collective group, from ``owner`` (global ranks)."""
        return share_output(compiled, leaves, owner, me, self.collective, self.deadline)

    def _pack(self, values: Mapping[str, Any], key: Key, layouts: Mapping[Key, PackLayout]) -> torch.Tensor:
        """Message ``key``'s values as one buffer, each in its memory order (Note [strides on the wire])."""
        tensors = [_to_wire(values[t.value] if t.part < 0 else values[t.value][t.part], t.spec.order)
                   for t in self.send_groups[key]]
        buffer = pack(tensors, layouts[key])
        if self.stream is not None:
            for t in tensors:
                t.record_stream(self.stream)
        return buffer

    def _values(self, pending: Pending, buffers: Mapping[Key, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The values of ``pending``'s messages, received in ``buffers``: views with the sender's strides."""
        values: dict[str, torch.Tensor] = {}
        layouts = self.exact_layouts if pending.exact else self.layouts
        for key in pending.recvs:
            parts: dict[str, list[torch.Tensor]] = {}
            for t, wire in zip(self.recv_groups[key], unpack(buffers[key], layouts[key])):
                view = _from_wire(wire, t.spec.order)
                if t.part < 0:
                    values[t.value] = view
                else:  # a tuple's elements travel in order, in one message
                    parts.setdefault(t.value, []).append(view)
            values.update((name, tuple(views)) for name, views in parts.items())
        return values

    def _comm_stream(self) -> contextlib.AbstractContextManager:
        """Note [overlap]: on CUDA, the comm stream, after the compute enqueued so far; else nothing."""
        if self.stream is None:
            return contextlib.nullcontext()
        self.stream.wait_event(torch.cuda.current_stream(self.device).record_event())
        return torch.cuda.stream(self.stream)

    def _tag(self, key: Key) -> int:
        return (self.branch * self.n_segments + key[0]) * self.n_segments + key[1]


def share_output(compiled: Any, leaves: tuple[Any, ...], owner: int, me: int,
                 group: dist.ProcessGroup | None, deadline: datetime.timedelta | None = None) -> Any:
    """The step's output on every rank of ``group``: ``owner`` (a global rank) has it as ``leaves``;
    ``deadline``: how long to wait for it (Note [deadlines] in config.py)."""
    mine = me == owner
    if mine:
        buffer = pack([x for x in leaves if isinstance(x, torch.Tensor)], compiled.output_layout)
    else:
        buffer = torch.empty(compiled.output_layout.nbytes, dtype=torch.uint8, device=compiled.device)
    finish([dist.broadcast(buffer, src=owner, group=group, async_op=True)], deadline)
    if mine:
        return compiled.traced.unflatten_output(list(leaves))
    return unpack_output(compiled, buffer)


def unpack_output(compiled: Any, buffer: torch.Tensor) -> Any:
    """The step's output from the owner's packed output tensors (``compiled.output_layout``), with
    the constants of the traced output in their places."""
    received = iter(unpack(buffer, compiled.output_layout))
    return compiled.traced.unflatten_output(
        [next(received) if isinstance(x, torch.fx.Node) else x for x in output_template(compiled.traced)])


def output_template(traced: TracedDenoiser) -> tuple[Any, ...]:
    output = next(n for n in traced.graph.nodes if n.op == "output")
    return tuple(output.args[0])


def _wire_shape(spec: TensorSpec) -> tuple[int, ...]:
    return tuple(spec.shape[d] for d in spec.order) if spec.order else spec.shape


def _to_wire(value: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Note [strides on the wire]: ``value`` with its dims in memory order (a view, contiguous
    where ``value`` is laid out as traced), so its bytes travel in the order they are stored."""
    return value.permute(order) if order else value


def _from_wire(wire: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """The received tensor with the sender's strides: a view of the receive buffer."""
    return wire.permute(sorted(range(len(order)), key=order.__getitem__)) if order else wire


def _grouped(transfers: Iterable[Transfer]) -> dict[Key, list[Transfer]]:
    groups: dict[Key, list[Transfer]] = {}
    for t in transfers:
        groups.setdefault((t.src_segment, t.dst_segment), []).append(t)
    return dict(sorted(groups.items()))
