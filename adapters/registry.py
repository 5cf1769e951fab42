"""Adapters: declarative records of where a pipeline keeps its denoiser and what its arguments mean.

An adapter is data, not a copy of a pipeline's denoising loop: the pipeline's own loop runs
unchanged and calls the denoiser, which the engine stands in for. Extra inputs (ControlNet
residuals, SVD's image latents and added time ids, SDXL's added conditioning) need no entry:
they are call inputs, which every rank holds fresh at every step (Note [replicated conditioning]
in :mod:`asyncdiff.partition.split`). A pipeline no adapter names still works through
:func:`adapter_for`'s generic path when its denoiser is ``pipe.unet`` or ``pipe.transformer``.

Example:
    >>> ADAPTERS["sd3"].denoiser, ADAPTERS["sd3"].latent
    ('transformer', 'hidden_states')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "register", "registered_adapter"]


@dataclass(frozen=True)
class Adapter:
    """``pipelines``: diffusers pipeline class names it serves; ``denoiser``: the attribute that
    holds the denoiser; ``latent``: the denoiser argument carrying the noisy latent (``None``:
    the first tensor argument); ``timestep``: the argument carrying the timestep. Pipelines that
    call the denoiser more than once per step need nothing more: the API tells the calls apart
    (Note [branches] in engine/runtime.py)."""

    name: str
    pipelines: tuple[str, ...]
    denoiser: str = "unet"
    latent: str | None = "sample"
    timestep: str = "timestep"


ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    if adapter.name in ADAPTERS:
        raise ValueError(f"an adapter named {adapter.name!r} is already registered; pick another name")
    taken = {p: a.name for a in ADAPTERS.values() for p in a.pipelines}
    clash = [p for p in adapter.pipelines if p in taken]
    if clash:
        raise ValueError(f"pipelines {clash} already have adapter {taken[clash[0]]!r}; one adapter per pipeline class")
    ADAPTERS[adapter.name] = adapter
    return adapter


def registered_adapter(pipeline_class: type) -> Adapter | None:
    """The registered adapter for ``pipeline_class`` (or a base class), if any."""
    for cls in pipeline_class.__mro__:
        for adapter in ADAPTERS.values():
            if cls.__name__ in adapter.pipelines:
                return adapter
    return None


def adapter_for(pipeline: Any) -> Adapter:
    """The registered adapter for ``pipeline``'s class (or a base class), else the generic one."""
    registered = registered_adapter(type(pipeline))
    if registered is not None:
        return registered
    for attr in ("unet", "transformer"):
        if getattr(pipeline, attr, None) is not None:
            return Adapter(name=f"generic-{attr}", pipelines=(type(pipeline).__name__,), denoiser=attr, latent=None)
    raise TypeError(
        f"{type(pipeline).__name__} has no registered adapter and no `unet` or `transformer` attribute; "
        "register an asyncdiff.adapters.registry.Adapter that names its denoiser attribute"
    )


register(Adapter("stable-diffusion", ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                      "StableDiffusionInpaintPipeline", "StableDiffusionUpscalePipeline")))
register(Adapter("sdxl", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                          "StableDiffusionXLInpaintPipeline", "StableDiffusionXLControlNetPipeline")))
register(Adapter("sd3", ("StableDiffusion3Pipeline",), denoiser="transformer", latent="hidden_states"))
register(Adapter("svd", ("StableVideoDiffusionPipeline",)))
register(Adapter("animatediff", ("AnimateDiffPipeline",)))
