"""Pack the tensors one rank sends to one peer in a step into one flat byte buffer.

One message per peer per step instead of one per tensor: on gloo each message costs ~0.1 ms of
fixed overhead, and fewer, larger messages overlap better. Tensors of any dtype share a buffer;
each starts at an offset aligned to ``ALIGN`` bytes so that unpacking returns views, not copies.

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
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]  # byte offset of each tensor in the buffer
    nbytes: int

    @classmethod
    def of(cls, specs: Sequence[tuple[Sequence[int], torch.dtype]]) -> PackLayout:
        offsets, cursor = [], 0
        for shape, dtype in specs:
            offsets.append(cursor)
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            cursor += -(-size // ALIGN) * ALIGN
        return cls(tuple(tuple(s) for s, _ in specs), tuple(d for _, d in specs), tuple(offsets), cursor)

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
    for t, view in zip(tensors, unpack(out, layout)):
        view.copy_(t)
    return out


def unpack(buffer: torch.Tensor, layout: PackLayout) -> list[torch.Tensor]:
    """Views into ``buffer``, one per tensor of ``layout``; no copies."""
    if buffer.dtype != torch.uint8 or buffer.numel() != layout.nbytes:
        raise ValueError(f"buffer of {buffer.numel()} {buffer.dtype} does not match a layout of "
                         f"{layout.nbytes} bytes")
    views = []
    for shape, dtype, offset in zip(layout.shapes, layout.dtypes, layout.offsets):
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        views.append(buffer[offset:offset + size].view(dtype).view(shape))
    return views
