"""Every offline pipeline builder runs end to end at size ``tiny`` and is deterministic in its seed."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from asyncdiff.models.builders import BUILDERS, example_inputs

# Output of a 2-step run with output_type="latent": images are (batch, channels, h, w), SVD's
# videos (batch, frames, channels, h, w), AnimateDiff's (batch, channels, frames, h, w).
TINY_LATENTS: dict[str, tuple[int, ...]] = {
    "sd15": (1, 4, 8, 8),
    "sd21": (1, 4, 8, 8),
    "sdxl": (1, 4, 8, 8),
    "sdxl-inpaint": (1, 4, 8, 8),
    "controlnet-sdxl": (1, 4, 8, 8),
    "sd-upscaler": (1, 4, 8, 8),
    "sd3": (1, 16, 8, 8),
    "svd": (1, 3, 4, 8, 8),
    "animatediff": (1, 4, 4, 8, 8),
    "wan": (1, 16, 2, 4, 4),  # 5 frames -> 2 latent frames (4x causal temporal compression)
    "digits": (16, 1, 16, 16),  # image-space DDIM: the output in [0, 1] is the final sample
    "digits-dit": (16, 1, 16, 16),  # the same, from a pixel-space DiT
    "digits-flow": (16, 1, 16, 16),  # the same, from a flow-matching MMDiT
}
TRAINED = {"digits", "digits-dit", "digits-flow"}  # shipped weights: the same for every seed
NAMES = sorted(BUILDERS)


def _denoiser(pipe: Any) -> torch.nn.Module:
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def _weights(pipe: Any) -> dict[str, torch.Tensor]:
    """Every tensor of every module of ``pipe`` (denoiser, text/image encoders, VAE, ControlNet)."""
    return {
        f"{part}.{key}": tensor
        for part, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, tensor in module.state_dict().items()
    }


def _run(pipe: Any, name: str) -> torch.Tensor:
    kwargs = example_inputs(name, "tiny", seed=0)
    params = inspect.signature(pipe.__call__).parameters
    if "prompt" in params:
        kwargs["prompt"] = "a photo of a cat"
    # pipelines without a step callback denoise in image space (Note [output as latents] in generate.py)
    latent = "latent" if {"callback_on_step_end", "callback"} & set(params) else "pt"
    out = pipe(num_inference_steps=2, output_type=latent, generator=torch.Generator().manual_seed(0), **kwargs)
    return out[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and idle-spinning threads slow a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> Callable[[str], Any]:
    """Builds each tiny pipeline (seed 0) once for this module."""
    return functools.cache(lambda name: BUILDERS[name]("tiny", 0))


def test_every_name_has_an_expected_shape() -> None:
    assert sorted(TINY_LATENTS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_tiny_pipeline_runs_end_to_end(name: str, tiny: Callable[[str], Any]) -> None:
    latents = _run(tiny(name), name)
    assert tuple(latents.shape) == TINY_LATENTS[name]
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_same_weights(name: str, tiny: Callable[[str], Any]) -> None:
    first, again = _weights(tiny(name)), _weights(BUILDERS[name]("tiny", 0))
    assert first.keys() == again.keys()
    for key in first:
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0, msg=f"{name}: {key} differs")
    if name in TRAINED:
        return
    seed_0 = next(iter(_denoiser(tiny(name)).parameters()))
    seed_1 = next(iter(_denoiser(BUILDERS[name]("tiny", 1)).parameters()))
    assert not torch.equal(seed_1, seed_0)


@pytest.mark.parametrize("name", NAMES)
def test_bad_size_names_the_size(name: str) -> None:
    with pytest.raises(ValueError, match="size='huge'"):
        BUILDERS[name]("huge", 0)
    with pytest.raises(ValueError, match="size='huge'"):
        example_inputs(name, "huge", 0)


def test_unknown_pipeline_name_is_refused() -> None:
    with pytest.raises(ValueError, match="pipeline='sd99' is not a built-in system"):
        example_inputs("sd99", "tiny", 0)


def test_one_record_per_system() -> None:
    from asyncdiff.models.builders import SYSTEMS, VIDEO_SYSTEMS, system

    assert list(BUILDERS) == list(SYSTEMS) and all(s.about for s in SYSTEMS.values())
    assert VIDEO_SYSTEMS == ("svd", "animatediff", "wan")
    assert [n for n, s in SYSTEMS.items() if not s.prompt] == ["svd", "digits", "digits-dit", "digits-flow"]
    assert system("wan").output == "video" and system("digits").output == "samples"
