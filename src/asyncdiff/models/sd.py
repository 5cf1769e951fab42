"""Offline Stable Diffusion 1.5-shaped pipelines with deterministic random weights.

Sizes keep the real topology (4 down blocks, a mid block, 4 up blocks, cross-attention):

- ``tiny``: for tests, a few ms per denoiser call on one core.
- ``bench``: a denoiser call of a few hundred ms on one core, so parallel speed-up is measurable.
- ``full``: the real SD 1.5 configuration (860 M UNet parameters), random weights.

Example:
    >>> pipe = build_sd15("tiny", seed=0)
    >>> type(pipe).__name__
    'StableDiffusionPipeline'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from asyncdiff.models.common import autoencoder_kl, check_size, clip_text_encoder, finish
from asyncdiff.models.tokenizer import load_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

__all__ = ["SIZES", "SDSize", "build_sd15", "sd15_unet"]


@dataclass(frozen=True)
class SDSize:
    unet_channels: tuple[int, ...]
    layers_per_block: int
    head_dim: int
    text_width: int
    text_layers: int
    vae_channels: tuple[int, ...]
    resolution: int  # image side in pixels; latents are resolution // 8

    @property
    def norm_groups(self) -> int:
        return 32


SIZES: dict[str, SDSize] = {
    "tiny": SDSize((32, 32, 64, 64), 2, 8, 32, 2, (32, 32, 32, 32), 64),
    "bench": SDSize((64, 128, 192, 192), 2, 32, 256, 2, (32, 32, 64, 64), 192),
    "full": SDSize((320, 640, 1280, 1280), 2, 8, 768, 12, (128, 256, 512, 512), 512),
}


def _check_size(size: str) -> SDSize:
    return check_size(size, SIZES)


def sd15_unet(spec: SDSize, **config: Any) -> UNet2DConditionModel:
    """SD 1.5's UNet topology at ``spec``'s widths; ``config`` overrides ``UNet2DConditionModel`` options."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{
        "sample_size": spec.resolution // 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": spec.unet_channels,
        "layers_per_block": spec.layers_per_block,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": spec.text_width,
        "attention_head_dim": spec.head_dim,
        "norm_num_groups": spec.norm_groups,
        **config,
    })


def build_sd15(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Build a ``StableDiffusionPipeline`` with SD 1.5's architecture and seeded random weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    spec = _check_size(size)
    tokenizer = load_clip_tokenizer()
    torch.manual_seed(seed)
    full = size == "full"
    text_encoder = clip_text_encoder(tokenizer, spec.text_width, spec.text_layers, full=full)
    unet = sd15_unet(spec)
    vae = autoencoder_kl(spec.vae_channels, resolution=spec.resolution, full=full)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return finish(pipe, dtype)
