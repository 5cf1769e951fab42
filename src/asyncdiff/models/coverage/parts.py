"""Small seeded parts the coverage builders share: seeding, tiny VAEs, random prompt embeddings.

Every builder seeds with :func:`seeded` before each module it constructs, so one case always
gets the same weights, whatever was built before it in the same process.

Example:
    >>> vae = tiny_vae(latent_channels=16)
    >>> vae.config.latent_channels, len(vae.config.block_out_channels)
    (16, 2)
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["embeds", "finish", "seeded", "tiny_vae"]


def seeded(build: Any, *args: Any, seed: int = 0, **kwargs: Any) -> Any:
    """``build(*args, **kwargs)`` with the global torch generator seeded first."""
    torch.manual_seed(seed)
    return build(*args, **kwargs)


def embeds(*shape: int, seed: int = 0) -> torch.Tensor:
    """A seeded random tensor standing for a text encoder's output (the suite leaves encoders out)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_vae(latent_channels: int = 4, levels: int = 2, **config: Any) -> Any:
    """An ``AutoencoderKL`` with ``levels`` levels of 32 channels (scale factor ``2 ** (levels - 1)``)."""
    from diffusers import AutoencoderKL

    return seeded(AutoencoderKL, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                  up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(32,) * levels,
                  layers_per_block=1, latent_channels=latent_channels, norm_num_groups=32, sample_size=32, **config)


def finish(pipe: Any) -> Any:
    """Every module in inference mode, no progress bar."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
