"""Point-to-point transfer of a stage's boundary values: one packed message per peer per step.

Only the values a peer needs travel, and only to that peer (no broadcast of every block's
output). Layouts (shapes and dtypes per peer) are fixed from the traced specs before the first
step, so both sides agree on message sizes without a handshake; a mismatch is an error.

Example (not run here: needs a process group):
    channel = StageChannel(program, ranks=[0, 1], group=group, device=torch.device("cpu"))
    works = channel.isend({name: tensor, ...})
    pending = channel.irecv()
    received = channel.wait(pending)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from asyncdiff.kernels.pack import PackLayout, pack, unpack
from asyncdiff.partition.split import StageProgram, Transfer

__all__ = ["PendingRecv", "StageChannel"]


@dataclass
class PendingRecv:
    works: list[dist.Work]
    buffers: dict[int, torch.Tensor]  # source stage -> receive buffer


class StageChannel:
    def __init__(self, program: StageProgram, ranks: list[int], group: dist.ProcessGroup | None,
                 device: torch.device) -> None:
        self.program, self.ranks, self.group, self.device = program, ranks, group, device
        self.recv_from = {src: [t for t in program.recv if t.src == src] for src in program.peers("recv")}
        self.send_to = {dst: [t for t in program.send if t.dst == dst] for dst in program.peers("send")}
        self.recv_layout = {src: _layout(ts) for src, ts in self.recv_from.items()}
        self.send_layout = {dst: _layout(ts) for dst, ts in self.send_to.items()}
        # One receive buffer per peer suffices: a step's received views are consumed by its
        # compute before the next receive is posted (Note [stale inputs] in schedule.py).
        self.recv_buffers = {src: torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
                             for src, layout in self.recv_layout.items()}

    @property
    def bytes_sent_per_step(self) -> int:
        return sum(layout.nbytes for layout in self.send_layout.values())

    def isend(self, values: dict[str, torch.Tensor]) -> list[tuple[dist.Work, torch.Tensor]]:
        """Send this step's values; keep the returned pairs (work, buffer) alive until waited."""
        sent = []
        for dst, transfers in self.send_to.items():
            buffer = pack([values[t.value] for t in transfers], self.send_layout[dst])
            sent.append((dist.isend(buffer, self.ranks[dst], group=self.group), buffer))
        return sent

    def irecv(self) -> PendingRecv:
        works = [dist.irecv(self.recv_buffers[src], self.ranks[src], group=self.group)
                 for src in self.recv_from]
        return PendingRecv(works, self.recv_buffers)

    def wait(self, pending: PendingRecv) -> dict[str, torch.Tensor]:
        for work in pending.works:
            work.wait()
        values: dict[str, torch.Tensor] = {}
        for src, transfers in self.recv_from.items():
            for t, view in zip(transfers, unpack(pending.buffers[src], self.recv_layout[src])):
                values[t.value] = view
        return values


def _layout(transfers: list[Transfer]) -> PackLayout:
    return PackLayout.of([(t.spec.shape, t.spec.torch_dtype) for t in transfers])
