"""Pack the tensors one rank sends to one peer in a step into one flat byte buffer.

One message per peer per step instead of one per tensor: on gloo each message costs ~0.1 ms of
fixed overhead, and fewer, larger messages overlap better. Tensors of any dtype share a buffer;
each starts at an offset aligned to ``ALIGN`` bytes so that unpacking returns views, not copies.

Optionally floating-point tensors travel in a narrower *wire* dtype: bfloat16 or float16 (half
the bytes of float32, rounded to nearest even), or float8 e4m3 with a per-tensor scale (Note
[fp8 scale]). The rounding cost is measured in BENCHMARKS.md.

This module is the plain torch reference, used on CPU and in tests; ``asyncdiff.kernels.triton_pack``
is the fused version used on CUDA (``pack(..., backend="auto")`` picks it there) and gives the
same bytes.

Note [fp8 scale]: a tensor sent as float8_e4m3fn is multiplied by ``1 / scale`` first, with
``scale = 2**k`` the smallest power of two such that ``amax / scale <= 448`` (float8 e4m3's
largest finite value), then clamped to +-448 and rounded to nearest even. A power of two makes
the scaling exact both ways, so the only error is float8's own rounding (relative 2**-4 at most
for normal values), and the reference and the accelerated kernel agree bit for bit. ``k`` comes
from ``frexp(amax) = (m, e)``: ``k = e - 9``, or ``e - 8`` when ``m > 0.875`` (448 = 0.875 * 2**9),
clamped to [-126, 127] so that the scale is a normal float32 (``k = 0`` when amax is not finite).
The scale travels as a float32 in the 16 bytes before the tensor. All of it stays on the device:
no host synchronisation. Non-finite values are not preserved (inf saturates to +-448 * scale).

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

__all__ = ["ALIGN", "BACKENDS", "FP8", "FP8_MAX", "WIRE_DTYPES", "PackLayout", "fp8_scale", "pack", "unpack"]

ALIGN = 16
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
WIRE_DTYPES = (torch.bfloat16, torch.float16, FP8)
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class PackLayout:
    """Where each tensor sits in the buffer. ``dtypes`` are the tensors' own; ``wire`` the dtypes
    they travel in; ``scales`` the byte offset of each float8 tensor's scale (-1: none)."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]  # byte offset of each tensor in the buffer
    nbytes: int
    wire: tuple[torch.dtype, ...] = ()
    scales: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.wire:
            object.__setattr__(self, "wire", self.dtypes)
        if not self.scales:
            object.__setattr__(self, "scales", (-1,) * len(self.dtypes))

    @classmethod
    def of(cls, specs: Sequence[tuple[Sequence[int], torch.dtype]],
           transfer_dtype: torch.dtype | None = None) -> PackLayout:
        """``transfer_dtype``: send floating-point tensors wider than it in it (one of ``WIRE_DTYPES``)."""
        if transfer_dtype is not None and transfer_dtype not in WIRE_DTYPES:
            raise ValueError(f"transfer_dtype={transfer_dtype} is not a wire dtype; use one of {WIRE_DTYPES} "
                             f"or None")
        offsets, wire, scales, cursor = [], [], [], 0
        for shape, dtype in specs:
            narrow = transfer_dtype is not None and dtype.is_floating_point and \
                dtype.itemsize > transfer_dtype.itemsize
            wire.append(transfer_dtype if narrow else dtype)
            scales.append(cursor if wire[-1] == FP8 else -1)
            cursor += ALIGN if wire[-1] == FP8 else 0
            offsets.append(cursor)
            cursor += _aligned(math.prod(shape) * wire[-1].itemsize)
        return cls(tuple(tuple(s) for s, _ in specs), tuple(d for _, d in specs), tuple(offsets), cursor,
                   tuple(wire), tuple(scales))

    def check(self, tensors: Sequence[torch.Tensor]) -> None:
        got = [(tuple(t.shape), t.dtype) for t in tensors]
        want = list(zip(self.shapes, self.dtypes))
        if got != want:
            raise ValueError(f"tensors to pack are {got}, but the transfer layout fixed at the first "
                             f"step is {want}; shapes and dtypes must not change within a pipeline call")


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The power-of-two scale of Note [fp8 scale] for a float32 ``amax`` (a tensor, on its device)."""
    m, e = torch.frexp(amax)
    k = (e - 9 + (m > 0.875).to(e.dtype)).clamp(-126, 127)
    return torch.ldexp(torch.ones_like(amax), torch.where(amax.isfinite(), k, 0))


def pack(tensors: Sequence[torch.Tensor], layout: PackLayout, out: torch.Tensor | None = None,
         backend: str = "auto") -> torch.Tensor:
    """Copy ``tensors`` into one ``uint8`` buffer (``out`` if given) laid out as ``layout``.

    ``backend``: ``"torch"`` (this reference), ``"triton"`` (one fused kernel launch per message;
    CUDA, or any device under ``TRITON_INTERPRET=1``), or ``"auto"`` (triton on CUDA when installed)."""
    layout.check(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    if out is None:
        out = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    if _use_triton(backend, device):
        from asyncdiff.kernels import triton_pack
        return triton_pack.pack(tensors, layout, out)
    for t, view, scale_at in zip(tensors, wire_views(out, layout), layout.scales):
        if scale_at < 0:
            view.copy_(t)  # casts (rounding to nearest even) where the wire dtype is narrower
            continue
        x = t.float()
        scale = fp8_scale(x.abs().amax() if x.numel() else x.new_zeros(()))
        _scale_view(out, scale_at).copy_(scale)
        view.copy_((x / scale).clamp(-FP8_MAX, FP8_MAX))
    return out


def unpack(buffer: torch.Tensor, layout: PackLayout, backend: str = "auto") -> list[torch.Tensor]:
    """The tensors of ``layout`` from ``buffer``: views (no copies) where they travelled in their
    own dtype, converted back to it where they travelled narrower."""
    if _use_triton(backend, buffer.device) and any(w != d for w, d in zip(layout.wire, layout.dtypes)):
        from asyncdiff.kernels import triton_pack
        return triton_pack.unpack(buffer, layout)
    out = []
    for view, dtype, scale_at in zip(wire_views(buffer, layout), layout.dtypes, layout.scales):
        if scale_at >= 0:
            out.append((view.float() * _scale_view(buffer, scale_at)).to(dtype))
        else:
            out.append(view if view.dtype == dtype else view.to(dtype))
    return out


def wire_views(buffer: torch.Tensor, layout: PackLayout) -> list[torch.Tensor]:
    """Each tensor's region of ``buffer``, viewed in its wire dtype and shape."""
    if buffer.dtype != torch.uint8 or buffer.numel() != layout.nbytes:
        raise ValueError(f"buffer of {buffer.numel()} {buffer.dtype} does not match a layout of "
                         f"{layout.nbytes} bytes")
    views = []
    for shape, dtype, offset in zip(layout.shapes, layout.wire, layout.offsets):
        size = math.prod(shape) * dtype.itemsize
        views.append(buffer[offset:offset + size].view(dtype).view(shape))
    return views


def _scale_view(buffer: torch.Tensor, offset: int) -> torch.Tensor:
    return buffer[offset:offset + 4].view(torch.float32)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    if backend == "triton":
        return True
    return backend == "auto" and device.type == "cuda" and _triton_available()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
