"""Adapters are records in a registry; unknown pipelines use the generic path."""

from __future__ import annotations

import pytest
import torch

from asyncdiff.adapters.registry import ADAPTERS, Adapter, adapter_for, register
from asyncdiff.models.sd import build_sd15


def test_known_pipelines_and_the_generic_path():
    assert adapter_for(build_sd15("tiny")).name == "stable-diffusion"

    class MyPipeline:
        transformer = torch.nn.Linear(2, 2)

    generic = adapter_for(MyPipeline())
    assert (generic.name, generic.denoiser, generic.latent) == ("generic-transformer", "transformer", None)
    with pytest.raises(TypeError, match="no registered adapter and no denoiser component"):
        adapter_for(object())


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register(Adapter("sd3", ("Other",)))
    with pytest.raises(ValueError, match=r"pipelines \['StableDiffusionPipeline'\] already have adapter"):
        register(Adapter("mine", ("StableDiffusionPipeline",)))
    assert "mine" not in ADAPTERS


def test_generic_adapter_takes_the_first_tensor_argument_as_latent():
    """The generic adapter names no latent: the engine takes the first tensor argument."""
    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig

    pipe = build_sd15("tiny")
    adapter = Adapter("generic-unet", ("X",), denoiser="unet", latent=None)
    engine = AsyncEngine(pipe.unet, EngineConfig(model_n=1, cost="flops"), latent=adapter.latent)
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor(5), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(engine(x, t, e).sample, pipe.unet(x, t, e).sample, rtol=0, atol=0)


def test_a_second_denoiser_that_stays_whole_is_said():
    """Wan 2.2-style pipelines carry a second denoiser for the low-noise steps: it is not split."""
    import copy

    from diffusers import DiffusionPipeline

    from asyncdiff import AsyncDiff
    from asyncdiff.models.sd import build_sd15

    class TwoUNets(DiffusionPipeline):
        def __init__(self, unet: torch.nn.Module, unet_2: torch.nn.Module, scheduler: object) -> None:
            super().__init__()
            self.register_modules(unet=unet, unet_2=unet_2, scheduler=scheduler)

    sd = build_sd15("tiny", 0)
    pipe = TwoUNets(sd.unet, copy.deepcopy(sd.unet), sd.scheduler)
    with pytest.warns(UserWarning, match=r"has another denoiser \(unet_2\) besides 'unet'; asyncdiff splits only"):
        async_diff = AsyncDiff(pipe, model_n=1)
    async_diff.remove()
