"""Every seed denoiser and a few no adapter knows: traced at block granularity, then run stage
by stage in one process, they reproduce the original output exactly (contiguous and wrapped)."""

from __future__ import annotations

import inspect

import pytest
import torch

from asyncdiff.adapters.capture import capture_denoiser_call
from asyncdiff.adapters.registry import adapter_for
from asyncdiff.models.builders import BUILDERS, example_inputs
from asyncdiff.partition.auto import auto_plan
from asyncdiff.partition.profile import profile_blocks
from asyncdiff.partition.split import split_graph
from asyncdiff.partition.trace import trace_denoiser


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def first_tensor(output):
    return output[0] if isinstance(output, tuple) else next(iter(output.values()))


def check_exact(denoiser, args, kwargs, model_n=3, latent=None):
    traced = trace_denoiser(denoiser, args, kwargs, latent=latent)
    costs = profile_blocks(traced, denoiser, args, kwargs, measure_time=False)
    tensors = traced.flatten_call(args, kwargs)
    with torch.no_grad():
        expected = first_tensor(denoiser(*args, **kwargs))
        whole = first_tensor(traced.unflatten_output(list(traced.graph_module(denoiser)(*tensors))))
        torch.testing.assert_close(whole, expected, rtol=0, atol=0)
        for layout in ("contiguous", "wrapped"):
            plan = auto_plan(traced, costs, model_n, cost="flops", bandwidth=1e-3, layouts=(layout,))
            split = split_graph(traced, plan)
            values, leaves = {}, ()
            for seg in split.segments:
                outputs, seg_leaves = seg.module(denoiser)(*tensors, *[values[v] for v in seg.inputs])
                values.update(zip(seg.outputs, outputs))
                if seg.index == split.output_segment:
                    leaves = seg_leaves
            got = first_tensor(traced.unflatten_output(list(leaves)))
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{layout} plan differs")
    return traced


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.slow
def test_seed_denoisers_trace_and_split_exactly(name):
    pipe = BUILDERS[name]("tiny", 0)
    adapter = adapter_for(pipe)
    call = example_inputs(name, "tiny", 0)
    if "prompt" in inspect.signature(type(pipe).__call__).parameters:
        call["prompt"] = "a cat"
    args, kwargs = capture_denoiser_call(pipe, adapter.denoiser, **call)
    traced = check_exact(getattr(pipe, adapter.denoiser), args, kwargs, latent=adapter.latent)
    assert len(traced.blocks) >= 10 and traced.replicated  # time embedding is replicated, not split


def test_unet2d_without_adapter():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=1)
    check_exact(unet, (torch.randn(2, 3, 16, 16), torch.tensor(10)), {"return_dict": False})


def test_flux_transformer_without_adapter():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    tokens, text = 16, 8
    kwargs = {"encoder_hidden_states": torch.randn(1, text, 32), "pooled_projections": torch.randn(1, 32),
              "timestep": torch.tensor([0.5]), "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(text, 3),
              "return_dict": False}
    check_exact(flux, (torch.randn(1, tokens, 16),), kwargs, latent="hidden_states")


def test_pixart_transformer_without_adapter():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                      num_layers=4, cross_attention_dim=32, sample_size=8, patch_size=2,
                                      caption_channels=24, norm_type="ada_norm_single")
    kwargs = {"encoder_hidden_states": torch.randn(2, 6, 24), "timestep": torch.tensor([10, 10]),
              "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}
    check_exact(pixart, (torch.randn(2, 4, 8, 8),), kwargs, latent="hidden_states")
