"""Every offline pipeline builder by name, and the call kwargs that make an example run.

Each builder takes ``(size, seed)`` with ``size`` one of ``tiny``, ``bench``, ``full`` and returns
a ready diffusers pipeline with seeded random weights; ``digits`` is the exception, a small
trained model that every size name gives (:mod:`asyncdiff.models.digits`). :func:`example_inputs`
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
from typing import Any

from asyncdiff.models import sd
from asyncdiff.models.animatediff import animatediff_inputs, build_animatediff
from asyncdiff.models.common import check_size
from asyncdiff.models.digits import build_digits, digits_inputs
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

__all__ = ["BUILDERS", "example_inputs"]


def _sd15_inputs(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    spec = check_size(size, sd.SIZES)
    return {"height": spec.resolution, "width": spec.resolution}


BUILDERS: dict[str, Callable[[str, int], Any]] = {
    "sd15": sd.build_sd15,
    "sd21": build_sd21,
    "sdxl": build_sdxl,
    "sdxl-inpaint": build_sdxl_inpaint,
    "controlnet-sdxl": build_controlnet_sdxl,
    "sd-upscaler": build_sd_upscaler,
    "sd3": build_sd3,
    "svd": build_svd,
    "animatediff": build_animatediff,
    "wan": build_wan,
    "digits": build_digits,
}

_INPUTS: dict[str, Callable[[str, int], dict[str, Any]]] = {
    "sd15": _sd15_inputs,
    "sd21": sd21_inputs,
    "sdxl": sdxl_inputs,
    "sdxl-inpaint": sdxl_inpaint_inputs,
    "controlnet-sdxl": controlnet_sdxl_inputs,
    "sd-upscaler": sd_upscaler_inputs,
    "sd3": sd3_inputs,
    "svd": svd_inputs,
    "animatediff": animatediff_inputs,
    "wan": wan_inputs,
    "digits": digits_inputs,
}


def example_inputs(name: str, size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Call kwargs (besides the prompt) for an example run of pipeline ``name`` at ``size``.

    Pictures are drawn from ``seed``; sizes and frame counts follow the builder's ``size``.
    ``svd`` is image-to-video and takes no prompt at all.
    """
    if name not in _INPUTS:
        raise ValueError(f"pipeline name={name!r} has no builder; use one of {sorted(_INPUTS)}")
    return _INPUTS[name](size, seed)
