"""Every built-in system as one :class:`System` record: builder, example call, what it makes.

Adding a system is one module with its builder and inputs, and one line in :data:`SYSTEMS`.

Each builder takes ``(size, seed)`` with ``size`` one of ``tiny``, ``bench``, ``full`` and returns
a ready diffusers pipeline with seeded random weights; ``digits``, ``digits-dit`` and
``digits-flow`` are the exceptions, small trained models that every size name gives
(:mod:`asyncdiff.models.digits`, :mod:`asyncdiff.models.digits_dit`, :mod:`asyncdiff.models.digits_flow`). :func:`example_inputs`
gives the extra call kwargs a pipeline needs besides the prompt: the resolution (and frame count)
of the size, plus built-in pictures for pipelines that take images (the first frame, a picture and
mask to inpaint, a control picture, a low-resolution picture to upscale).

Example:
    >>> import torch
    >>> pipe = BUILDERS["sdxl-inpaint"]("tiny", 0)
    >>> kwargs = example_inputs("sdxl-inpaint", "tiny", seed=0)
    >>> out = pipe("a photo of a cat", num_inference_steps=2, output_type="latent",
    ...            generator=torch.Generator().manual_seed(0), **kwargs)
    >>> tuple(out.images.shape)
    (1, 4, 8, 8)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asyncdiff.models import sd
from asyncdiff.models.animatediff import animatediff_inputs, build_animatediff
from asyncdiff.models.common import check_size
from asyncdiff.models.digits import build_digits, digits_inputs
from asyncdiff.models.digits_dit import build_digits_dit, digits_dit_inputs
from asyncdiff.models.digits_flow import build_digits_flow, digits_flow_inputs
from asyncdiff.models.sd3 import build_sd3, sd3_inputs
from asyncdiff.models.sd21 import build_sd21, sd21_inputs
from asyncdiff.models.sdxl import (
    build_controlnet_sdxl,
    build_sdxl,
    build_sdxl_inpaint,
    controlnet_sdxl_inputs,
    sdxl_inpaint_inputs,
    sdxl_inputs,
)
from asyncdiff.models.svd import build_svd, svd_inputs
from asyncdiff.models.upscaler import build_sd_upscaler, sd_upscaler_inputs
from asyncdiff.models.wan import build_wan, wan_inputs

__all__ = ["BUILDERS", "SYSTEMS", "VIDEO_SYSTEMS", "System", "example_inputs", "system"]


def _sd15_inputs(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    spec = check_size(size, sd.SIZES)
    return {"height": spec.resolution, "width": spec.resolution}


@dataclass(frozen=True)
class System:
    """One built-in system: its builder ``build(size, seed)``, the call kwargs of an example run
    ``inputs(size, seed)`` (besides the prompt), whether it takes a prompt, and what it makes
    (``"image"``, ``"video"``, or ``"samples"``: a batch of pictures tiled into one grid)."""

    name: str
    build: Callable[[str, int], Any]
    inputs: Callable[[str, int], dict[str, Any]]
    output: str = "image"
    prompt: bool = True
    about: str = ""


SYSTEMS: dict[str, System] = {s.name: s for s in (
    System("sd15", sd.build_sd15, _sd15_inputs, about="Stable Diffusion 1.5-shaped UNet, CFG batch 2"),
    System("sd21", build_sd21, sd21_inputs, about="SD 2.1 (v-prediction, linear projections)"),
    System("sdxl", build_sdxl, sdxl_inputs, about="SDXL base: two text encoders, added conditioning"),
    System("sdxl-inpaint", build_sdxl_inpaint, sdxl_inpaint_inputs, about="SDXL inpainting (9 input channels)"),
    System("controlnet-sdxl", build_controlnet_sdxl, controlnet_sdxl_inputs, about="SDXL with a ControlNet"),
    System("sd-upscaler", build_sd_upscaler, sd_upscaler_inputs, about="the x4 upscaler (noise-level conditioning)"),
    System("sd3", build_sd3, sd3_inputs, about="SD3-shaped MMDiT, flow matching"),
    System("svd", build_svd, svd_inputs, output="video", prompt=False, about="Stable Video Diffusion, image to video"),
    System("animatediff", build_animatediff, animatediff_inputs, output="video", about="AnimateDiff motion UNet"),
    System("wan", build_wan, wan_inputs, output="video", about="Wan 2.1-shaped DiT, guidance as two calls per step"),
    System("digits", build_digits, digits_inputs, output="samples", prompt=False,
           about="a small DDIM model trained here on handwritten digits"),
    System("digits-dit", build_digits_dit, digits_dit_inputs, output="samples", prompt=False,
           about="a small class-conditional pixel-space DiT trained here on the same digits"),
    System("digits-flow", build_digits_flow, digits_flow_inputs, output="samples", prompt=False,
           about="a small flow-matching MMDiT (SD3-shaped) trained here on the same digits"),
)}

BUILDERS: dict[str, Callable[[str, int], Any]] = {name: s.build for name, s in SYSTEMS.items()}
VIDEO_SYSTEMS = tuple(name for name, s in SYSTEMS.items() if s.output == "video")


def system(name: str) -> System:
    """The built-in system ``name``, or a ``ValueError`` naming the choices."""
    if name not in SYSTEMS:
        raise ValueError(f"pipeline={name!r} is not a built-in system; use one of {sorted(SYSTEMS)}")
    return SYSTEMS[name]


def example_inputs(name: str, size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Call kwargs (besides the prompt) for an example run of pipeline ``name`` at ``size``.

    Pictures are drawn from ``seed``; sizes and frame counts follow the builder's ``size``.
    ``svd`` is image-to-video and takes no prompt at all.
    """
    return system(name).inputs(size, seed)
