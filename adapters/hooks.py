"""Attach an engine to a diffusers denoiser through diffusers' hook registry.

One hook replaces the denoiser's ``forward``; the registry owns the wrapping, refuses duplicate
names, and restores the original ``forward`` when the hook is removed.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from asyncdiff.engine.runtime import AsyncEngine

__all__ = ["HOOK_NAME", "EngineHook", "attach", "detach"]

HOOK_NAME = "asyncdiff"


class EngineHook(ModelHook):
    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__()
        self.engine = engine

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    # Not stateful for the registry: the engine's state resets at every pipeline call, through
    # the AsyncDiff API's pipeline subclass (adapters/api.py), which also marks the steps.


def attach(denoiser: torch.nn.Module, engine: AsyncEngine) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    if registry.get_hook(HOOK_NAME) is not None:
        raise ValueError("this denoiser already runs under asyncdiff; call .remove() on the first AsyncDiff")
    registry.register_hook(EngineHook(engine), HOOK_NAME)


def detach(denoiser: torch.nn.Module) -> None:
    HookRegistry.check_if_exists_or_initialize(denoiser).remove_hook(HOOK_NAME, recurse=False)
