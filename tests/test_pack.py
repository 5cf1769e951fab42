"""Packing boundary tensors into one transfer buffer (plain torch reference)."""

from __future__ import annotations

import pytest
import torch

from asyncdiff.kernels.pack import ALIGN, PackLayout, pack, unpack


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
