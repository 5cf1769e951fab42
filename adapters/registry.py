"""Adapters: declarative records of where a pipeline keeps its denoiser and what its arguments mean.

An adapter is data, not a copy of a pipeline's denoising loop: the pipeline's own loop runs
unchanged and calls the denoiser, which the engine stands in for. A pipeline no adapter names
still works through :func:`adapter_for`'s generic path when its denoiser is ``pipe.unet`` or
``pipe.transformer`` and its first tensor argument is the latent.

Example:
    >>> ADAPTERS["sd15"].denoiser
    'unet'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "register"]


@dataclass(frozen=True)
class Adapter:
    """``pipelines``: diffusers pipeline class names it serves; ``denoiser``: the attribute that
    holds the denoiser; ``latent``: the denoiser argument carrying the noisy latent (``None``:
    the first tensor argument); ``build``: ``(size, seed) -> pipeline`` for the built-in offline
    model, if there is one."""

    name: str
    pipelines: tuple[str, ...]
    denoiser: str = "unet"
    latent: str | None = "sample"
    build: Callable[[str, int], Any] | None = None


ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    if adapter.name in ADAPTERS:
        raise ValueError(f"an adapter named {adapter.name!r} is already registered; pick another name")
    ADAPTERS[adapter.name] = adapter
    return adapter


def adapter_for(pipeline: Any) -> Adapter:
    """The registered adapter for ``pipeline``'s class (or a base class), else the generic one."""
    for cls in type(pipeline).__mro__:
        for adapter in ADAPTERS.values():
            if cls.__name__ in adapter.pipelines:
                return adapter
    for attr in ("unet", "transformer"):
        if getattr(pipeline, attr, None) is not None:
            return Adapter(name=f"generic-{attr}", pipelines=(type(pipeline).__name__,), denoiser=attr, latent=None)
    raise TypeError(
        f"{type(pipeline).__name__} has no registered adapter and no `unet` or `transformer` attribute; "
        "register an asyncdiff.adapters.Adapter that names its denoiser attribute"
    )


def _build_sd15(size: str, seed: int) -> Any:
    from asyncdiff.models.sd import build_sd15

    return build_sd15(size, seed=seed)


register(Adapter(name="sd15", pipelines=("StableDiffusionPipeline",), denoiser="unet", latent="sample",
                 build=_build_sd15))
