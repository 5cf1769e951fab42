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


@pytest.mark.slow
def test_a_second_denoiser_is_split_on_its_own():
    """Note [several denoisers]: Wan 2.2's low-noise expert (here ``unet_2``) gets its own engine
    and plan, starts with its own warm-up, and is exact at full warm-up; under time shift its
    stages compute with the pipeline's timesteps of its own steps (not of the loop's first ones)."""
    from pool import launch
    from toys import two_expert_scenarios

    steps, switch = 5, 2
    results = launch(two_expert_scenarios, 2, steps, switch)
    for r in results.values():
        torch.testing.assert_close(r["exact"], r["plain"], rtol=1e-5, atol=1e-5)
        assert r["kinds"] == {"unet": ["warm-up", "async"], "unet_2": ["warm-up", "async", "async"]}
        assert r["released"]["unet"] > 0 and r["released"]["unet_2"] > 0  # each rank holds one stage of each
        assert r["plans"]["unet"].model_n == r["plans"]["unet_2"].model_n == 2
        assert r["whole_after_remove"]
        for out in ("stale", "shifted"):
            assert 0 < ((r[out] - r["plain"]).norm() / r["plain"].norm()).item() < 0.5
    timesteps = results[0]["timesteps"]
    seen = set(results[0]["unet_2_timesteps"]) | set(results[1]["unet_2_timesteps"])
    # unet_2 runs steps 2-4: step 2 is its warm-up (its own timestep), steps 3 and 4 are shifted to
    # the timesteps of steps 2 and 3; counted from its own first step they would be steps 0 and 1's
    assert seen == {timesteps[switch], timesteps[switch + 1]}, (seen, timesteps)


@pytest.mark.slow
def test_stride_2_hands_over_to_the_second_expert_inside_a_round():
    """Note [several denoisers] with stride 2: the first expert's last step opens a round whose
    second step the other expert takes (it starts with its own warm-up); nothing waits for the
    round's unused half, and a second pipeline call gives the same result."""
    from pool import launch
    from toys import two_expert_stride_2

    for r in launch(two_expert_stride_2, 3, 6, 2).values():
        assert r["kinds"] == {"unet": ["warm-up", "round"], "unet_2": ["warm-up", "round", "reuse", "round"]}
        assert r["repeatable"] and 0 < r["deviation"] < 0.5


def test_step_ends_are_heard_without_changing_the_scheduler_s_type():
    """Issue 25 item 6 (Bria tests ``type(self.scheduler)``): the step-end hook is a bound method
    on the instance, with the scheduler's own signature (pipelines read ``eta`` from it), gone
    after the call; a deep copy made during the call (SkyReels-V2) steps itself and is heard."""
    import copy
    import inspect

    from diffusers import DDIMScheduler

    from asyncdiff.adapters.api import _marking_steps

    scheduler, heard = DDIMScheduler(), []
    scheduler.set_timesteps(2)
    x = torch.zeros(1, 1, 2, 2)
    with _marking_steps([scheduler], lambda: heard.append(1)):
        assert type(scheduler) is DDIMScheduler and "eta" in inspect.signature(scheduler.step).parameters
        twin = copy.deepcopy(scheduler)
        assert twin.step.__self__ is twin
        scheduler.step(x, scheduler.timesteps[0], x)
        twin.step(x, twin.timesteps[0], x)
    assert heard == [1, 1] and "step" not in scheduler.__dict__
    scheduler.step(x, scheduler.timesteps[1], x)
    assert heard == [1, 1]
