"""Adapters: declarative records of where a pipeline keeps its denoiser and what its arguments mean.

An adapter is data, not a copy of a pipeline's denoising loop: the pipeline's own loop runs
unchanged and calls the denoiser, which the engine stands in for. Extra inputs (ControlNet
residuals, SVD's image latents and added time ids, SDXL's added conditioning) need no entry:
they are call inputs, which every rank holds fresh at every step (Note [replicated conditioning]
in :mod:`asyncdiff.partition.split`). A pipeline no adapter names still works through
:func:`adapter_for`'s generic path, which finds its denoiser (``unet``, ``transformer``, a
prior's ``prior``, Stable Cascade's ``decoder``, else its largest model that is no encoder).

Example:
    >>> ADAPTERS["sd3"].denoiser, ADAPTERS["sd3"].latent
    ('transformer', 'hidden_states')
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ADAPTERS", "DENOISER_ATTRS", "Adapter", "adapter_for", "register", "registered_adapter", "timestep_arg"]


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


DENOISER_ATTRS = ("unet", "transformer", "prior", "decoder")  # where diffusers pipelines keep it
TIMESTEP_ARGS = ("timestep", "timestep_ratio", "timesteps", "t")
# components that are never the denoiser, when no attribute above holds one
_NOT_DENOISERS = ("vae", "encoder", "controlnet", "adapter", "safety", "guardrail", "vocoder", "renderer",
                  "image_processor", "feature_extractor", "tokenizer", "scheduler", "movq", "connector")


def adapter_for(pipeline: Any) -> Adapter:
    """The registered adapter for ``pipeline``'s class (or a base class), else a generic one for
    the first of :data:`DENOISER_ATTRS` it has, else for its largest model component that is
    not an encoder, VAE, ControlNet or adapter."""
    registered = registered_adapter(type(pipeline))
    if registered is not None:
        return registered
    attr = next((a for a in DENOISER_ATTRS if isinstance(getattr(pipeline, a, None), torch.nn.Module)), None)
    if attr is None:
        candidates = {name: c for name, c in _components(pipeline).items()
                      if isinstance(c, torch.nn.Module) and not any(k in name for k in _NOT_DENOISERS)}
        attr = max(candidates, key=lambda n: sum(p.numel() for p in candidates[n].parameters()), default=None)
    if attr is None:
        raise TypeError(
            f"{type(pipeline).__name__} has no registered adapter and no denoiser component ({', '.join(DENOISER_ATTRS)} "
            "or another model that is not an encoder/VAE); register an asyncdiff.adapters.registry.Adapter that "
            "names its denoiser attribute"
        )
    return Adapter(name=f"generic-{attr}", pipelines=(type(pipeline).__name__,), denoiser=attr, latent=None,
                   timestep=timestep_arg(getattr(pipeline, attr)))


def timestep_arg(denoiser: torch.nn.Module) -> str:
    """The name of ``denoiser``'s timestep argument (the first of :data:`TIMESTEP_ARGS` it takes)."""
    forward = inspect.signature(denoiser.forward).parameters
    return next((t for t in TIMESTEP_ARGS if t in forward), "timestep")


def _components(pipeline: Any) -> dict[str, Any]:
    try:
        return dict(pipeline.components)
    except Exception:  # not a diffusers pipeline
        return {k: v for k, v in getattr(pipeline, "__dict__", {}).items() if not k.startswith("_")}


register(Adapter("stable-diffusion", ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                      "StableDiffusionInpaintPipeline", "StableDiffusionUpscalePipeline")))
register(Adapter("sdxl", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                          "StableDiffusionXLInpaintPipeline", "StableDiffusionXLControlNetPipeline")))
register(Adapter("sd3", ("StableDiffusion3Pipeline",), denoiser="transformer", latent="hidden_states"))
register(Adapter("svd", ("StableVideoDiffusionPipeline",)))
register(Adapter("animatediff", ("AnimateDiffPipeline",)))
