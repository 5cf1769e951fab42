"""Pack/unpack throughput for the boundary tensors of the bench SD UNet, against plain copies.

The tensor set is what a cut at the mid block sends per step (every skip connection crosses it):
the conv_in output, the outputs of each down block's layers and downsamplers, fp32, CFG batch 2.
For ``build_sd15("bench")`` (widths 64/128/192/192, 24x24 latents) that is 12 tensors, 1.44 MB;
the 32x32 variant (256 px, as in FACTS.md) is 2.56 MB. The 2-stage plan the planner picks for
the bench UNet sends a subset of these (11 tensors, 0.87 MB, one way).

Baselines, measured in the same run: one ``Tensor.copy_`` of the same number of bytes (the
memory-bandwidth bound of any packing) and one ``torch.cat`` of the flattened tensors (the naive
way to make one message). One thread, as each engine process runs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from asyncdiff.kernels.pack import FP8, PackLayout, pack, unpack

WIDTHS = (64, 128, 192, 192)  # SIZES["bench"].unet_channels
BATCH = 2  # classifier-free guidance


def boundary_shapes(latent: int) -> list[tuple[int, ...]]:
    """Skip connections of an SD UNet with ``WIDTHS`` at ``latent`` x ``latent``, in program order."""
    shapes, side = [(BATCH, WIDTHS[0], latent, latent)], latent
    for i, width in enumerate(WIDTHS):
        shapes += [(BATCH, width, side, side)] * 2  # two layers (resnet, + attention) per block
        if i < len(WIDTHS) - 1:
            side = -(-side // 2)
            shapes.append((BATCH, width, side, side))  # downsampler
    return shapes


SETS = {"sd-bench-24": boundary_shapes(24), "sd-bench-32": boundary_shapes(32)}
ROUNDS, WARMUP, ITERATIONS = 100, 10, 5


@pytest.fixture(scope="module", params=list(SETS), ids=list(SETS))
def boundary(request):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=g) for shape in SETS[request.param]]
    layout = PackLayout.of([(t.shape, t.dtype) for t in tensors])
    return request.param, tensors, layout


def _ops(tensors: list[torch.Tensor], layout: PackLayout) -> dict[str, Callable[[], object]]:
    src = pack(tensors, layout)
    dst = torch.empty_like(src)
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
    return {
        # baselines
        "copy_": lambda: dst.copy_(src),
        "cat": lambda: torch.cat([t.flatten() for t in tensors]),
        # asyncdiff.kernels.pack
        "pack": lambda: pack(tensors, layout),  # allocates, as engine/comm.py calls it
        "pack_into": lambda: pack(tensors, layout, out=buffer),
        "unpack": lambda: unpack(src, layout),  # views only: the receive side's cost
        "pack+unpack": lambda: unpack(pack(tensors, layout), layout),
    }


def _check(op: str, result: object, tensors: list[torch.Tensor], layout: PackLayout) -> None:
    if op == "copy_":
        assert torch.equal(result, pack(tensors, layout))
    elif op == "cat":
        assert torch.equal(result, torch.cat([t.reshape(-1) for t in tensors]))
    else:
        views = unpack(result, layout) if op in ("pack", "pack_into") else result
        assert len(views) == len(tensors)
        for got, want in zip(views, tensors):
            assert torch.equal(got, want)


@pytest.mark.parametrize("op", ["copy_", "cat", "pack", "pack_into", "unpack", "pack+unpack"])
def test_pack_throughput(benchmark, run_record, single_thread, boundary, op):
    name, tensors, layout = boundary
    fn = _ops(tensors, layout)[op]
    result = benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=ITERATIONS)
    _check(op, result, tensors, layout)
    seconds = run_record.keep(f"pack/{name}/{op}", run_record.median(benchmark))
    gbps = layout.nbytes / seconds / 1e9
    info = {"set": name, "tensors": len(tensors), "bytes": layout.nbytes, "median_us": round(seconds * 1e6, 2),
            "gbps": round(gbps, 2)}
    bases = {"copy_": (), "cat": ("copy_",)}.get(op, ("copy_", "cat"))
    for base in bases:
        ratio = run_record.ratio(seconds, f"pack/{name}/{base}")
        info[f"time_vs_{base}"] = None if ratio is None else round(ratio, 3)
    benchmark.extra_info.update(info)
    vs = "; ".join(f"time {v:.2f}x {k[8:]}" if v is not None else f"{k[8:]} not run"
                   for k, v in info.items() if k.startswith("time_vs_"))
    note = " (views, no bytes moved)" if op == "unpack" else ""
    run_record.print(f"pack {name} {op}",
                     [f"{len(tensors)} tensors, {layout.nbytes / 1e6:.2f} MB: median {seconds * 1e6:.1f} us, "
                      f"{gbps:.2f} GB/s{note}" + (f"; {vs}" if vs else " (baseline)")])


WIRES = {"bfloat16": torch.bfloat16, "float8": FP8}
BACKENDS = ["torch"] + (["triton"] if torch.cuda.is_available() else [])  # triton kernels need CUDA to be timed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wire", list(WIRES))
@pytest.mark.parametrize("op", ["pack", "unpack"])
def test_narrow_pack_throughput(benchmark, run_record, single_thread, boundary, wire, op, backend):
    """Packing into a narrower wire dtype (a cast, and for float8 a scale: Note [fp8 scale]) and
    unpacking back (a cast, no longer views), against the same-dtype pack of the same tensors."""
    name, tensors, _ = boundary
    device = "cuda" if backend == "triton" else "cpu"
    tensors = [t.to(device) for t in tensors]
    layout = PackLayout.of([(t.shape, t.dtype) for t in tensors], WIRES[wire])
    src = pack(tensors, layout, backend=backend)
    fn = {"pack": lambda: pack(tensors, layout, backend=backend),
          "unpack": lambda: unpack(src, layout, backend=backend)}[op]

    def timed():
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    result = benchmark.pedantic(timed, rounds=ROUNDS // 2, warmup_rounds=WARMUP, iterations=ITERATIONS)
    views = unpack(result, layout, backend="torch") if op == "pack" else result
    for got, want in zip(views, tensors):  # float8: 3 mantissa bits; below 2**-6 * scale, steps of 2**-9 * scale
        atol = want.abs().max().item() * 2 ** -16 if wire == "float8" else 1e-6
        torch.testing.assert_close(got, want, rtol=2 ** -4 if wire == "float8" else 2 ** -8, atol=atol)
    seconds = run_record.keep(f"pack/{name}/{op}-{wire}-{backend}", run_record.median(benchmark))
    ratio = run_record.ratio(seconds, f"pack/{name}/pack" if op == "pack" else f"pack/{name}/pack+unpack")
    benchmark.extra_info.update({"set": name, "wire": wire, "backend": backend, "wire_bytes": layout.nbytes,
                                 "median_us": round(seconds * 1e6, 2),
                                 "time_vs_same_dtype": None if ratio is None else round(ratio, 3)})
    vs = f"; time {ratio:.2f}x the same-dtype {'pack' if op == 'pack' else 'pack+unpack'}" if ratio else ""
    run_record.print(f"pack {name} {op} {wire} ({backend})",
                     [f"{len(tensors)} tensors, {layout.nbytes / 1e6:.2f} MB on the wire: median "
                      f"{seconds * 1e6:.1f} us{vs}"])
