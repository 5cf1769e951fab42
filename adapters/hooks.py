"""Attach an engine to a diffusers denoiser through diffusers' hook registry.

One hook replaces the denoiser's ``forward``; the registry owns the wrapping, refuses duplicate
names, and restores the original ``forward`` when the hook is removed.

The hook is stateful for the registry only to hear diffusers' own per-call context: pipelines
that wrap each denoiser call in ``model.cache_context("cond" | "uncond", step_index=...)`` (Wan,
Flux, QwenImage...) name the branch of each call, and the engine keys its branch state by that
name (Note [branches]) instead of counting calls. The engine's state itself resets at every
pipeline call, through the ``AsyncDiff`` API's pipeline subclass (``adapters/api.py``), which
also marks where steps end.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from asyncdiff.engine.runtime import AsyncEngine

__all__ = ["HOOK_NAME", "EngineHook", "attach", "detach"]

HOOK_NAME = "asyncdiff"


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class EngineHook(ModelHook):
    _is_stateful = True  # to receive the pipeline's cache context (see the module docstring)

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__()
        self.engine = engine
        self.contexts = StateManager(_NoState)  # diffusers sets the running call's CacheContext here

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        context = getattr(self.contexts, "_context", None)
        self.engine.branch_name = getattr(context, "name", None)
        return self.engine(*args, **kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        return module  # the engine resets per pipeline call, through the AsyncDiff API


def attach(denoiser: torch.nn.Module, engine: AsyncEngine) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    if registry.get_hook(HOOK_NAME) is not None:
        raise ValueError("this denoiser already runs under asyncdiff; call .remove() on the first AsyncDiff")
    registry.register_hook(EngineHook(engine), HOOK_NAME)


def detach(denoiser: torch.nn.Module) -> None:
    HookRegistry.check_if_exists_or_initialize(denoiser).remove_hook(HOOK_NAME, recurse=False)
