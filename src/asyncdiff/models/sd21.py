"""Offline Stable Diffusion 2.1-shaped pipelines with deterministic random weights.

SD 2.1 keeps SD 1.5's UNet topology (4 down blocks, a mid block, 4 up blocks) but uses 64-wide
attention heads (5, 10, 20, 20 heads at full size), linear projections in its transformers,
an OpenCLIP-H text encoder (width 1024, 23 layers) and v-prediction.

- ``tiny``: for tests, a few ms per denoiser call on one core.
- ``bench``: a denoiser call of a few hundred ms on one core (CFG batch 2).
- ``full``: the real SD 2.1 (768 px, v-prediction) configuration, random weights.

Example:
    >>> pipe = build_sd21("tiny", seed=0)
    >>> pipe.unet.config.attention_head_dim
    (2, 2, 4, 4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from asyncdiff.models.common import autoencoder_kl, check_size, clip_text_encoder, finish
from asyncdiff.models.tokenizer import load_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = ["SIZES", "SD21Size", "build_sd21", "sd21_inputs"]


@dataclass(frozen=True)
class SD21Size:
    unet_channels: tuple[int, ...]
    layers_per_block: int
    head_width: int  # channels per attention head (64 in SD 2.x)
    text_width: int
    text_layers: int
    vae_channels: tuple[int, ...]
    resolution: int  # image side in pixels; latents are resolution // 8

    def __post_init__(self) -> None:
        if any(c % self.head_width for c in self.unet_channels):
            raise ValueError(
                f"unet_channels={self.unet_channels} are not all multiples of head_width={self.head_width}; "
                "pick a head width that divides every block width"
            )

    @property
    def heads(self) -> tuple[int, ...]:
        return tuple(c // self.head_width for c in self.unet_channels)


SIZES: dict[str, SD21Size] = {
    "tiny": SD21Size((32, 32, 64, 64), 2, 16, 32, 2, (32, 32, 32, 32), 64),
    "bench": SD21Size((64, 128, 192, 192), 2, 32, 256, 2, (32, 32, 64, 64), 256),
    "full": SD21Size((320, 640, 1280, 1280), 2, 64, 1024, 23, (128, 256, 512, 512), 768),
}


def build_sd21(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Build a ``StableDiffusionPipeline`` with SD 2.1's architecture and seeded random weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    spec = check_size(size, SIZES)
    tokenizer = load_clip_tokenizer()
    torch.manual_seed(seed)
    full = size == "full"
    text_encoder = clip_text_encoder(tokenizer, spec.text_width, spec.text_layers, full=full, hidden_act="gelu")
    unet = UNet2DConditionModel(
        sample_size=spec.resolution // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=spec.text_width,
        attention_head_dim=spec.heads,  # diffusers' legacy name: this is the number of heads
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=32,
    )
    vae = autoencoder_kl(spec.vae_channels, resolution=spec.resolution, full=full)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return finish(pipe, dtype)


def sd21_inputs(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Call kwargs for a run at ``size``'s resolution (text-to-image: no pictures needed)."""
    spec = check_size(size, SIZES)
    return {"height": spec.resolution, "width": spec.resolution}
