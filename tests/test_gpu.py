"""What one CUDA device proves (``pytest -m gpu``; skipped without CUDA, run by benchmarks/gpu_check.py).

The wire format must not depend on the device: float8 and bfloat16 messages packed on the GPU
(torch reference and the compiled Triton kernels) are byte for byte the messages the CPU packs.
The engine and the split programs, run on the GPU, reproduce the denoiser they came from.
"""

from __future__ import annotations

import pytest
import torch

from asyncdiff.engine.runtime import AsyncEngine, EngineConfig
from asyncdiff.kernels.pack import FP8, PackLayout, pack, unpack
from asyncdiff.partition.auto import auto_plan
from asyncdiff.partition.profile import profile_blocks
from asyncdiff.partition.split import split_graph
from asyncdiff.partition.trace import trace_denoiser
from asyncdiff.partition.verify import run_split

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _values() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 64, 64, generator=g) * 7, torch.randn(2, 77, 768, generator=g).half(),
            torch.randn(1000, generator=g).bfloat16() * 1e-3, torch.tensor([0.0, -0.0, 447.9, 1e-9, 3e4])]


@pytest.mark.parametrize("wire", [None, torch.bfloat16, torch.float16, FP8])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_messages_packed_on_cuda_are_the_cpu_bytes(wire, backend):
    values = _values()
    layout = PackLayout.of([(t.shape, t.dtype) for t in values], wire)
    # zeroed buffers: the alignment padding between tensors is never written
    on_cpu = pack(values, layout, torch.zeros(layout.nbytes, dtype=torch.uint8), backend="torch")
    on_gpu = pack([t.cuda() for t in values], layout, torch.zeros(layout.nbytes, dtype=torch.uint8, device="cuda"),
                  backend=backend)
    assert on_gpu.is_cuda
    assert torch.equal(on_gpu.cpu(), on_cpu)
    for want, got in zip(unpack(on_cpu, layout, backend="torch"), unpack(on_gpu, layout, backend=backend)):
        assert torch.equal(got.cpu(), want)


def _tiny_unet_call(dtype: torch.dtype):
    from asyncdiff.models.sd import SIZES, sd15_unet

    torch.manual_seed(0)
    unet = sd15_unet(SIZES["tiny"]).cuda().to(dtype).eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    args = (torch.randn(2, 4, 8, 8, device="cuda", generator=g, dtype=dtype), torch.tensor(981, device="cuda"))
    kwargs = {"encoder_hidden_states": torch.randn(2, 77, 32, device="cuda", generator=g, dtype=dtype),
              "return_dict": False}
    return unet, args, kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_engine_at_one_stage_on_cuda_is_the_denoiser(dtype):
    unet, args, kwargs = _tiny_unet_call(dtype)
    engine = AsyncEngine(unet, EngineConfig(model_n=1, cost="time"))
    with torch.no_grad():
        want = unet(*args, **kwargs)[0]
        for _ in range(3):  # the first call traces, profiles on the GPU and plans
            got = engine(*args, **kwargs)[0]
    assert got.is_cuda and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_engine_on_cuda_is_the_denoiser_to_float_noise(monkeypatch):
    # cuDNN convolutions default to TF32 (10-bit mantissa): eager and compiled kernels would then
    # differ by TF32 rounding (5e-3 seen on an H200), not float32 noise
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    unet, args, kwargs = _tiny_unet_call(torch.float32)
    engine = AsyncEngine(unet, EngineConfig(model_n=1, cost="flops", compile=True))
    with torch.no_grad():
        want = unet(*args, **kwargs)[0]
        got = engine(*args, **kwargs)[0]
    assert type(engine._compiled[next(iter(engine._compiled))].modules[0]).__name__ == "OptimizedModule"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stages", [2, 3])
def test_split_programs_on_cuda_reproduce_the_denoiser(stages):
    unet, args, kwargs = _tiny_unet_call(torch.float32)
    traced = trace_denoiser(unet, args, kwargs)
    with torch.no_grad():
        costs = profile_blocks(traced, unet, args, kwargs, repeats=2)
        assert all(c.seconds > 0 for c in costs.values())  # timed on the GPU with synchronisation
        split = split_graph(traced, auto_plan(traced, costs, stages, cost="time"))
        got = traced.unflatten_output(run_split(split, unet, traced.flatten_call(args, kwargs)))[0]
        want = unet(*args, **kwargs)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
