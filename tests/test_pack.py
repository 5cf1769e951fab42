"""Packing boundary tensors into one transfer buffer (plain torch reference)."""

from __future__ import annotations

import math

import pytest
import torch

from asyncdiff.kernels.pack import ALIGN, FP8, FP8_MAX, PackLayout, fp8_scale, pack, unpack


def test_round_trip_mixed_dtypes_returns_views():
    tensors = [torch.randn(3, 5), torch.randn(7).half(), torch.arange(5, dtype=torch.int64), torch.randn(2, 2, 2)]
    layout = PackLayout.of([(t.shape, t.dtype) for t in tensors])
    assert all(offset % ALIGN == 0 for offset in layout.offsets)
    buffer = pack(tensors, layout)
    assert buffer.dtype == torch.uint8 and buffer.numel() == layout.nbytes
    views = unpack(buffer, layout)
    for original, view in zip(tensors, views):
        torch.testing.assert_close(view, original, rtol=0, atol=0)
        assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def test_non_contiguous_inputs_pack_correctly():
    base = torch.randn(4, 6)
    tensors = [base.t(), base[:, ::2]]
    layout = PackLayout.of([(t.shape, t.dtype) for t in tensors])
    for original, view in zip(tensors, unpack(pack(tensors, layout), layout)):
        torch.testing.assert_close(view, original, rtol=0, atol=0)


def test_layout_mismatch_is_an_error():
    layout = PackLayout.of([((2, 3), torch.float32)])
    with pytest.raises(ValueError, match="fixed at the first step"):
        pack([torch.randn(3, 2)], layout)
    with pytest.raises(ValueError, match="does not match a layout"):
        unpack(torch.empty(5, dtype=torch.uint8), layout)


def test_narrow_transfer_halves_floating_point_bytes_only():
    tensors = [torch.randn(4, 8), torch.arange(6, dtype=torch.int64), torch.randn(3).half()]
    full = PackLayout.of([(t.shape, t.dtype) for t in tensors])
    narrow = PackLayout.of([(t.shape, t.dtype) for t in tensors], torch.bfloat16)
    assert narrow.wire[1] == torch.int64
    assert narrow.wire[0] == torch.bfloat16 and narrow.wire[2] == torch.float16  # fp16 is not wider than bf16
    assert narrow.nbytes < full.nbytes
    got = unpack(pack(tensors, narrow), narrow)
    assert [g.dtype for g in got] == [t.dtype for t in tensors]  # back in their own dtypes
    torch.testing.assert_close(got[0], tensors[0], rtol=2 ** -8, atol=1e-6)  # bfloat16 rounding
    assert not torch.equal(got[0], tensors[0])
    torch.testing.assert_close(got[1], tensors[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2], tensors[2], rtol=0, atol=0)


def test_float8_transfer_scales_by_a_power_of_two_per_tensor():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(64, 64, generator=g) * 1e3, torch.randn(100, generator=g).half() * 1e-3,
               torch.zeros(6), torch.empty(0, 3), torch.arange(4)]
    layout = PackLayout.of([(t.shape, t.dtype) for t in tensors], FP8)
    assert layout.wire[:4] == (FP8,) * 4 and layout.wire[4] == torch.int64
    assert all(at >= 0 and at % ALIGN == 0 and at + ALIGN == off
               for at, off in zip(layout.scales[:4], layout.offsets[:4]))
    assert layout.scales[4] == -1
    buffer = pack(tensors, layout)
    got = unpack(buffer, layout)
    assert [g.dtype for g in got] == [t.dtype for t in tensors]
    for t, at in zip(tensors[:2], layout.scales):
        scale = buffer[at:at + 4].view(torch.float32).item()
        assert math.frexp(scale)[0] == 0.5, f"scale {scale} is not a power of two"
        assert 224 < t.abs().max().item() / scale <= FP8_MAX  # the largest value lands in e4m3's top binade
    for t, g in zip(tensors[:2], got[:2]):
        # e4m3 keeps 3 mantissa bits: relative error at most 2**-4 for values in its normal range
        big = t.float().abs() > t.float().abs().max() * 2 ** -7
        rel = ((g.float() - t.float()).abs() / t.float().abs())[big]
        assert 0 < rel.max() <= 2 ** -4
    torch.testing.assert_close(got[2], tensors[2], rtol=0, atol=0)
    assert got[3].shape == (0, 3)
    torch.testing.assert_close(got[4], tensors[4], rtol=0, atol=0)


def test_float8_transfer_is_exact_for_values_on_its_grid():
    x = torch.tensor([448.0, -448.0, 1.0, 1.125, 2 ** -6, 2 ** -9, -3 * 2 ** -9, 0.0]) * 2.0 ** 5
    layout = PackLayout.of([(x.shape, x.dtype)], FP8)
    torch.testing.assert_close(unpack(pack([x], layout), layout)[0], x, rtol=0, atol=0)


@pytest.mark.parametrize("amax, k", [(448.0, 0), (449.0, 1), (1.0, -8), (0.0, -9), (float("inf"), 0), (1e-45, -126)])
def test_fp8_scale_exponent(amax, k):
    assert fp8_scale(torch.tensor(amax)).item() == 2.0 ** k


def test_unknown_wire_dtype_is_an_error():
    with pytest.raises(ValueError, match="is not a wire dtype"):
        PackLayout.of([((2,), torch.float32)], torch.int8)
