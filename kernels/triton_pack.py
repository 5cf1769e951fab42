"""Triton versions of ``pack``/``unpack`` (asyncdiff.kernels.pack is the reference): one kernel
launch per message instead of one copy per tensor, with the cast to the wire dtype fused into the
copy, and for float8 the scale computed on the device (Note [fp8 scale]): two launches in all
(amax, then scale-round-store), no temporaries, no host synchronisation.

Every rounding is written in integer arithmetic on the float32 bits (Note [exact rounding]), so
the bytes equal the reference's on a GPU and under Triton's CPU interpreter (``TRITON_INTERPRET=1``),
which is how tests/test_triton_pack.py checks them on a machine without one.

Note [exact rounding]: for a float32 with bits ``b``, rounding to nearest even at bit ``s`` is
``(b + (1 << (s - 1)) - 1 + ((b >> s) & 1)) >> s``; a carry out of the mantissa moves into the
exponent, which is exactly the next representable value. bfloat16 keeps the top 16 bits
(``s = 16``). float8 e4m3 keeps 3 mantissa bits (``s = 20``) for normal values (>= 2**-6), whose
code is then ``(rounded >> 20) - (120 << 3)`` (the exponent bias goes from 127 to 7); below
2**-6 the value is a multiple of 2**-9, rounded from the 24-bit significand. Subnormal code 8
equals the first normal value's code, so rounding up across the boundary needs no special case.
Triton's own ``.to(float8)`` is not used: the interpreter's conversion does not carry a rounded-up
mantissa into the exponent. float16 uses ``.to(tl.float16)`` (round to nearest even on the GPU
and in the interpreter, which converts with numpy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from asyncdiff.kernels.pack import FP8, PackLayout, wire_views

__all__ = ["pack", "unpack"]

COPY, BF16, CAST, F8 = 0, 1, 2, 3  # how a tensor goes onto the wire
BLOCK = 1024
MAX_TENSORS = 16  # per launch; the kernels are unrolled over the tensors of a launch


@triton.jit
def _fp8_scale_exponent(amax_bits):
    """k of Note [fp8 scale] from the float32 bits of a non-negative amax."""
    e = (amax_bits >> 23) & 0xFF
    k = e - 135 + ((amax_bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    k = tl.where(e == 0, tl.where(amax_bits == 0, -9, -126), k)
    k = tl.where(e == 255, 0, k)
    return tl.minimum(tl.maximum(k, -126), 127)


@triton.jit
def _round_bits(b, s: tl.constexpr):
    return (b + ((1 << (s - 1)) - 1) + ((b >> s) & 1)) >> s


@triton.jit
def _to_fp8_code(q):
    """float8 e4m3fn code (uint8) of a float32 ``q`` already clamped to [-448, 448] (Note [exact rounding])."""
    b = q.to(tl.uint32, bitcast=True)
    sign = (b >> 24) & 0x80
    a = b & 0x7FFFFFFF
    e = a >> 23
    normal = _round_bits(a, 20) - 960
    shift = tl.minimum(141 - e, 31)  # subnormal: a * 2**9 = significand * 2**(e - 141)
    significand = (a & 0x7FFFFF) | 0x800000
    sub = (significand + ((1 << (shift - 1)) - 1) + ((significand >> shift) & 1)) >> shift
    code = tl.where(e >= 121, normal, tl.where(e < 110, 0, sub))
    code = tl.where(a > 0x7F800000, 0x7F, code)  # NaN
    return (code | sign).to(tl.uint8)


@triton.jit
def _from_fp8_code(c):
    c = c.to(tl.uint32)
    e = (c >> 3) & 15
    m = (c & 7).to(tl.float32)
    magnitude = tl.where(e == 0, m * 0.001953125,  # 2**-9
                         (m + 8.0) * ((e + 117) << 23).to(tl.float32, bitcast=True))  # 2**(e - 10)
    value = tl.where((c & 0x80) != 0, -magnitude, magnitude)
    return tl.where((c & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def _amax_kernel(srcs, numels, amax_bits, N: tl.constexpr, BLOCK: tl.constexpr):
    pid, which = tl.program_id(0), tl.program_id(1)
    for i in tl.static_range(N):
        if which == i:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(srcs[i] + offs, mask=offs < numels[i], other=0.0).to(tl.float32)
            bits = tl.abs(x).to(tl.int32, bitcast=True)  # non-negative floats order like their bits
            tl.atomic_max(amax_bits + i, tl.max(bits, axis=0))


@triton.jit
def _pack_kernel(srcs, dsts, scales, numels, amax_bits, KINDS: tl.constexpr, N: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid, which = tl.program_id(0), tl.program_id(1)
    for i in tl.static_range(N):
        if which == i:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            mask = offs < numels[i]
            x = tl.load(srcs[i] + offs, mask=mask)
            if KINDS[i] == 0:  # COPY
                y = x
            elif KINDS[i] == 1:  # BF16: the top half of the bits, rounded
                b = x.to(tl.float32).to(tl.uint32, bitcast=True)
                y = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, _round_bits(b, 16)).to(tl.uint16)
            elif KINDS[i] == 2:  # CAST
                y = x.to(dsts[i].dtype.element_ty)
            else:  # F8
                k = _fp8_scale_exponent(tl.load(amax_bits + i))
                inverse = ((127 - k) << 23).to(tl.float32, bitcast=True)
                q = tl.minimum(tl.maximum(x.to(tl.float32) * inverse, -448.0), 448.0)
                q = tl.where(x != x, x.to(tl.float32), q)  # keep NaN through the clamp
                y = _to_fp8_code(q)
                if pid == 0:
                    tl.store(scales[i], ((k + 127) << 23).to(tl.float32, bitcast=True))
            tl.store(dsts[i] + offs, y, mask=mask)


@triton.jit
def _unpack_kernel(srcs, dsts, scales, numels, KINDS: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr):
    pid, which = tl.program_id(0), tl.program_id(1)
    for i in tl.static_range(N):
        if which == i:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            mask = offs < numels[i]
            x = tl.load(srcs[i] + offs, mask=mask)
            if KINDS[i] == 1:  # BF16
                y = (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
            elif KINDS[i] == 3:  # F8
                y = _from_fp8_code(x) * tl.load(scales[i])
            else:
                y = x.to(tl.float32)
            tl.store(dsts[i] + offs, y.to(dsts[i].dtype.element_ty), mask=mask)


def pack(tensors: Sequence[torch.Tensor], layout: PackLayout, out: torch.Tensor) -> torch.Tensor:
    """``asyncdiff.kernels.pack.pack`` with fused kernels (``layout`` already checked)."""
    views = wire_views(out, layout)
    items = [(_flat(t), _kernel_view(view, kind), _scale(out, at), kind)
             for t, view, at, kind in zip(tensors, views, layout.scales, _kinds(layout)) if t.numel()]
    for chunk in _chunks(items):
        srcs, dsts, scales, kinds = (tuple(column) for column in zip(*chunk))
        numels = tuple(s.numel() for s in srcs)
        grid = (triton.cdiv(max(numels), BLOCK), len(chunk))
        amax = torch.zeros(len(chunk), dtype=torch.int32, device=out.device)
        if F8 in kinds:
            _amax_kernel[grid](srcs, numels, amax, N=len(chunk), BLOCK=BLOCK)
        _pack_kernel[grid](srcs, dsts, scales, numels, amax, KINDS=kinds, N=len(chunk), BLOCK=BLOCK)
    return out


def unpack(buffer: torch.Tensor, layout: PackLayout) -> list[torch.Tensor]:
    """``asyncdiff.kernels.pack.unpack`` with one fused kernel for the tensors that travelled narrower."""
    views = wire_views(buffer, layout)
    result = list(views)
    items = []
    for index, (view, dtype, at, kind) in enumerate(zip(views, layout.dtypes, layout.scales, _kinds(layout))):
        if kind == COPY:
            continue
        result[index] = torch.empty(view.shape, dtype=dtype, device=buffer.device)
        if view.numel():
            items.append((_kernel_view(view, kind).reshape(-1), result[index].view(-1), _scale(buffer, at), kind))
    for chunk in _chunks(items):
        srcs, dsts, scales, kinds = (tuple(column) for column in zip(*chunk))
        numels = tuple(s.numel() for s in srcs)
        grid = (triton.cdiv(max(numels), BLOCK), len(chunk))
        _unpack_kernel[grid](srcs, dsts, scales, numels, KINDS=kinds, N=len(chunk), BLOCK=BLOCK)
    return result


def _kinds(layout: PackLayout) -> list[int]:
    kinds = []
    for dtype, wire in zip(layout.dtypes, layout.wire):
        if wire == dtype:
            kinds.append(COPY)
        elif wire == FP8:
            kinds.append(F8)
        elif wire == torch.bfloat16 and dtype == torch.float32:
            kinds.append(BF16)
        else:
            kinds.append(CAST)
    return kinds


def _kernel_view(view: torch.Tensor, kind: int) -> torch.Tensor:
    """The wire region as the kernels address it: float8 and bfloat16 as their raw bits."""
    flat = view.view(-1)
    if kind == F8:
        return flat.view(torch.uint8)
    if kind == BF16:
        return flat.view(torch.int16).view(torch.uint16)
    return flat


def _scale(buffer: torch.Tensor, offset: int) -> torch.Tensor:
    # a float8 tensor's scale slot; other tensors get a slot the kernels never touch
    return buffer[max(offset, 0):max(offset, 0) + 4].view(torch.float32)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1)


def _chunks(items: list) -> list[list]:
    return [items[i:i + MAX_TENSORS] for i in range(0, len(items), MAX_TENSORS)]
