"""Pack the tensors one rank sends to one peer in a step into one flat byte buffer.

One message per peer per step instead of one per tensor: on gloo each message costs ~0.1 ms of
fixed overhead, and fewer, larger messages overlap better. Tensors of any dtype share a buffer;
each starts at an offset aligned to ``ALIGN`` bytes so that unpacking returns views, not copies.
Optionally floating-point tensors travel in a narrower dtype (bfloat16, float16), halving the
bytes at a rounding cost measured in BENCHMARKS.md. This plain torch version is the reference.

Example:
    >>> import torch
    >>> layout = PackLayout.of([((2, 3), torch.float32), ((4,), torch.float16)])
    >>> a, b = torch.randn(2, 3), torch.randn(4).half()
    >>> x, y = unpack(pack([a, b], layout), layout)
    >>> bool(torch.equal(x, a) and torch.equal(y, b))
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ALIGN", "PackLayout", "pack", "unpack"]

ALIGN = 16


@dataclass(frozen=True)
class PackLayout:
    """Where each tensor sits in the buffer. ``dtypes`` are the tensors' own; ``wire`` the dtypes
    they travel in (narrower floating point when a transfer dtype is set)."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]  # byte offset of each tensor in the buffer
    nbytes: int
    wire: tuple[torch.dtype, ...] = ()

    @classmethod
    def of(cls, specs: Sequence[tuple[Sequence[int], torch.dtype]],
           transfer_dtype: torch.dtype | None = None) -> PackLayout:
        """``transfer_dtype``: send floating-point tensors wider than it in it (e.g. bfloat16)."""
        offsets, wire, cursor = [], [], 0
        for shape, dtype in specs:
            narrow = transfer_dtype is not None and dtype.is_floating_point and \
                _itemsize(dtype) > _itemsize(transfer_dtype)
            wire.append(transfer_dtype if narrow else dtype)
            offsets.append(cursor)
            cursor += -(-math.prod(shape) * _itemsize(wire[-1]) // ALIGN) * ALIGN
        return cls(tuple(tuple(s) for s, _ in specs), tuple(d for _, d in specs), tuple(offsets), cursor,
                   tuple(wire))

    def check(self, tensors: Sequence[torch.Tensor]) -> None:
        got = [(tuple(t.shape), t.dtype) for t in tensors]
        want = list(zip(self.shapes, self.dtypes))
        if got != want:
            raise ValueError(f"tensors to pack are {got}, but the transfer layout fixed at the first "
                             f"step is {want}; shapes and dtypes must not change within a pipeline call")


def pack(tensors: Sequence[torch.Tensor], layout: PackLayout, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy ``tensors`` into one ``uint8`` buffer (``out`` if given) laid out as ``layout``."""
    layout.check(tensors)
    if out is None:
        device = tensors[0].device if tensors else torch.device("cpu")
        out = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    for t, view in zip(tensors, _wire_views(out, layout)):
        view.copy_(t)  # casts to the wire dtype where it is narrower
    return out


def unpack(buffer: torch.Tensor, layout: PackLayout) -> list[torch.Tensor]:
    """The tensors of ``layout`` from ``buffer``: views (no copies) where they travelled in their
    own dtype, converted back to it where they travelled narrower."""
    return [view if view.dtype == dtype else view.to(dtype)
            for view, dtype in zip(_wire_views(buffer, layout), layout.dtypes)]


def _wire_views(buffer: torch.Tensor, layout: PackLayout) -> list[torch.Tensor]:
    if buffer.dtype != torch.uint8 or buffer.numel() != layout.nbytes:
        raise ValueError(f"buffer of {buffer.numel()} {buffer.dtype} does not match a layout of "
                         f"{layout.nbytes} bytes")
    views = []
    for shape, dtype, offset in zip(layout.shapes, layout.wire or layout.dtypes, layout.offsets):
        size = math.prod(shape) * _itemsize(dtype)
        views.append(buffer[offset:offset + size].view(dtype).view(shape))
    return views


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize
