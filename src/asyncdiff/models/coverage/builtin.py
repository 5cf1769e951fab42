"""The built-in systems (:data:`asyncdiff.models.builders.SYSTEMS`) as coverage cases, at tiny size."""

from __future__ import annotations

from functools import partial
from typing import Any

from asyncdiff.models.builders import SYSTEMS
from asyncdiff.models.coverage import Case

FAMILIES = {"sd15": "Stable Diffusion", "sd21": "Stable Diffusion", "sdxl": "Stable Diffusion XL",
            "sdxl-inpaint": "Stable Diffusion XL", "controlnet-sdxl": "ControlNet", "sd-upscaler": "Stable Diffusion",
            "sd3": "Stable Diffusion 3", "svd": "Stable Video Diffusion", "animatediff": "AnimateDiff",
            "wan": "Wan", "digits": "DDIM", "digits-dit": "DiT",
            "digits-flow": "Stable Diffusion 3"}
REPRESENTATIVE = {"sd15", "sd3", "wan"}


def _build(name: str) -> tuple[Any, dict[str, Any]]:
    system = SYSTEMS[name]
    pipe = system.build("tiny", 0)
    kwargs = dict(system.inputs("tiny", 0))
    if system.prompt:
        kwargs["prompt"] = "a photo of a cat"
    kwargs["output_type"] = "np" if system.output == "samples" else "latent"  # the digits pipelines have no latent output
    return pipe, kwargs


def _pipeline_class(name: str) -> str:
    return {"sd15": "StableDiffusionPipeline", "sd21": "StableDiffusionPipeline",
            "sdxl": "StableDiffusionXLPipeline", "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
            "controlnet-sdxl": "StableDiffusionXLControlNetPipeline", "sd-upscaler": "StableDiffusionUpscalePipeline",
            "sd3": "StableDiffusion3Pipeline", "svd": "StableVideoDiffusionPipeline",
            "animatediff": "AnimateDiffPipeline", "wan": "WanPipeline", "digits": "DDIMPipeline",
            "digits-dit": "DigitsDiTPipeline", "digits-flow": "DigitsFlowPipeline"}[name]


CASES = tuple(Case(name, FAMILIES[name], _pipeline_class(name), partial(_build, name),
                   representative=name in REPRESENTATIVE, stride2=name in REPRESENTATIVE)
              for name in SYSTEMS)
