"""Capture the arguments a pipeline passes to its denoiser, without running the denoiser.

The pipeline's own ``__call__`` prepares the latent, timestep and conditioning exactly as it
will at inference time; a forward pre-hook on the denoiser records the first call and stops the
pipeline. On a pipeline built on the ``meta`` device this costs no memory and no compute, so a
full-size SDXL can be planned on a laptop.

Example:
    >>> import torch
    >>> from asyncdiff.models.sd import build_sd15
    >>> with torch.device("meta"):
    ...     pipe = build_sd15("full")
    >>> args, kwargs = capture_denoiser_call(pipe, "unet", prompt="a cat")
    >>> tuple(args[0].shape), tuple(kwargs["encoder_hidden_states"].shape)
    ((2, 4, 64, 64), (2, 77, 768))
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["capture_denoiser_call"]


class _Captured(Exception):
    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__("denoiser call captured")
        self.call = (args, kwargs)


def capture_denoiser_call(pipeline: Any, denoiser: str, **call_kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the first call ``pipeline(**call_kwargs)`` makes to ``pipeline.<denoiser>``."""
    module = getattr(pipeline, denoiser)

    def stop(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Captured(args, kwargs)

    handle = module.register_forward_pre_hook(stop, with_kwargs=True)
    call_kwargs.setdefault("num_inference_steps", 1)
    scheduler = getattr(pipeline, "scheduler", None)
    on_meta = any(p.is_meta for p in module.parameters())
    if on_meta and scheduler is not None:
        # Some schedulers copy their tables back to the CPU, which meta tensors cannot do: keep
        # the timesteps on the CPU (0-d CPU tensors mix with meta tensors).
        set_timesteps = scheduler.set_timesteps

        @functools.wraps(set_timesteps)  # pipelines read its signature (does it take sigmas?)
        def on_cpu(*a: Any, device: Any = None, **kw: Any) -> Any:
            return set_timesteps(*a, **kw)

        scheduler.set_timesteps = on_cpu
    try:
        with torch.no_grad():
            pipeline(**call_kwargs)
    except _Captured as captured:
        return captured.call
    except RuntimeError as err:
        if on_meta and "meta" in str(err):
            raise ValueError(f"{type(pipeline).__name__} cannot prepare its {denoiser!r} call on meta tensors "
                             f"(weight-free inspection): {err}. Inspect it with real weights instead "
                             f"(--cost time), or a smaller size") from err
        raise
    finally:
        handle.remove()
        if on_meta and scheduler is not None:
            del scheduler.set_timesteps
    raise RuntimeError(f"{type(pipeline).__name__} finished without calling its {denoiser!r}; "
                       "pass the arguments that make it denoise (e.g. a prompt and num_inference_steps)")
