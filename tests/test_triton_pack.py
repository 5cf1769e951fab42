"""The Triton pack/unpack kernels against the plain torch reference, bit for bit.

With CUDA the kernels run compiled on the GPU; without it on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, set in conftest.py before Triton is imported).
"""

from __future__ import annotations

import os

import pytest
import torch

from asyncdiff.kernels.pack import FP8, PackLayout, pack, unpack

# triton is in the dev extras for Linux x86-64 (where CI runs); elsewhere it may not install
pytest.importorskip("triton", reason="Triton is not installable on this platform (dev extras: Linux x86-64)")
from asyncdiff.kernels import triton_pack  # noqa: E402

WIRES = (None, torch.bfloat16, torch.float16, FP8)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_kernels_run_compiled_on_cuda_or_interpreted_on_cpu():
    assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _tensors(device: str = DEVICE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 300, generator=g) * torch.exp2(torch.randint(-30, 30, (4, 300), generator=g).float())
    edges = torch.tensor([2 ** -10, 3 * 2 ** -10, 7.5 * 2 ** -9, 2 ** -6 * 0.99, 447.9, 300.0, -0.0, 1e-42,
                          1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -4, 1 + 3 * 2 ** -4])  # ties and boundaries
    tensors = [wide, torch.randn(7, 11, generator=g).half() * 100, torch.zeros(5), torch.arange(9),
               torch.randn(33, generator=g).bfloat16(), edges, torch.randn(3, 4, generator=g).t()]
    return [t.to(device) for t in tensors]


def _both(tensors: list[torch.Tensor], wire: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, PackLayout]:
    layout = PackLayout.of([(t.shape, t.dtype) for t in tensors], wire)
    zeros = lambda: torch.zeros(layout.nbytes, dtype=torch.uint8, device=tensors[0].device)  # noqa: E731
    return pack(tensors, layout, zeros(), backend="torch"), triton_pack.pack(tensors, layout, zeros()), layout


def _check_same_bytes_and_values(tensors: list[torch.Tensor]) -> None:
    for wire in WIRES:
        reference, fused, layout = _both(tensors, wire)
        assert torch.equal(reference, fused), f"wire {wire}: bytes differ at {(reference != fused).nonzero()[:8].tolist()}"
        for want, got in zip(unpack(reference, layout, backend="torch"), triton_pack.unpack(reference, layout)):
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # float16 wire: both sides give inf
def test_kernels_give_the_reference_bytes():
    _check_same_bytes_and_values(_tensors())


def test_more_tensors_than_one_launch_holds():
    tensors = [(torch.randn(i + 1) * (i + 1)).to(DEVICE) for i in range(triton_pack.MAX_TENSORS + 3)]
    _check_same_bytes_and_values(tensors)


def test_non_finite_values():
    x = torch.tensor([1.0, float("nan"), -2.0, float("inf")], device=DEVICE)
    for wire in (torch.bfloat16, FP8):
        reference, fused, layout = _both([x], wire)
        want, got = unpack(reference, layout, backend="torch")[0], triton_pack.unpack(fused, layout)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(got[1])


def test_dispatch_uses_the_kernels_when_asked():
    tensors = _tensors()
    layout = PackLayout.of([(t.shape, t.dtype) for t in tensors], FP8)
    buffer = pack(tensors, layout, torch.zeros(layout.nbytes, dtype=torch.uint8, device=DEVICE), backend="triton")
    for want, got in zip(unpack(buffer, layout, backend="torch"), unpack(buffer, layout, backend="triton")):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="backend='cuda' must be one of"):
        pack(tensors, layout, backend="cuda")
