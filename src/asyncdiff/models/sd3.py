"""Offline Stable Diffusion 3-shaped pipelines (MMDiT) with deterministic random weights.

SD3's denoiser is a stack of joint-attention transformer blocks over 2x2 patches of 16-channel
latents. It reads two CLIP text encoders with projections (CLIP-L, OpenCLIP-bigG); their pooled
outputs are concatenated (``pooled_projection_dim``) and their token features are zero-padded to
the T5 width (``joint_attention_dim``). These builders leave T5 out (``text_encoder_3=None``): the
pipeline then feeds zeros in its place, as the real model allows.

- ``tiny``: for tests, a few ms per denoiser call on one core.
- ``bench``: a denoiser call of a few hundred ms on one core (CFG batch 2).
- ``full``: the real SD3 Medium configuration (2 B transformer parameters), random weights.

Example:
    >>> pipe = build_sd3("tiny", seed=0)
    >>> pipe.transformer.config.pooled_projection_dim == sum(SIZES["tiny"].text_widths)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from asyncdiff.models.common import autoencoder_kl, check_size, clip_text_encoder, finish
from asyncdiff.models.tokenizer import load_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

__all__ = ["SIZES", "SD3Size", "build_sd3", "sd3_inputs", "sd3_transformer"]

LATENT_CHANNELS = 16
PATCH = 2


@dataclass(frozen=True)
class SD3Size:
    layers: int
    heads: int
    head_width: int
    text_widths: tuple[int, int]  # CLIP-L-like, OpenCLIP-bigG-like (both with projection)
    text_layers: tuple[int, int]
    # Width of the token features: the T5 width (4096) in SD3; with no T5 here, smaller sizes use
    # the sum of the CLIP widths, the least the pipeline accepts.
    joint_attention_dim: int
    vae_channels: tuple[int, ...]
    resolution: int  # image side in pixels
    pos_embed_max_size: int  # side of the learned position grid, in patches

    def __post_init__(self) -> None:
        if self.joint_attention_dim < sum(self.text_widths):
            raise ValueError(
                f"joint_attention_dim={self.joint_attention_dim} is smaller than the CLIP widths' sum "
                f"{sum(self.text_widths)}; the pipeline pads CLIP features up to it, so use at least that"
            )
        patches = self.resolution // 2 ** (len(self.vae_channels) - 1) // PATCH
        if self.pos_embed_max_size < patches:
            raise ValueError(
                f"pos_embed_max_size={self.pos_embed_max_size} is below the {patches} patches a side of a "
                f"{self.resolution} px picture; use at least {patches}"
            )


SIZES: dict[str, SD3Size] = {
    "tiny": SD3Size(2, 2, 16, (32, 32), (2, 2), 64, (32, 32, 32, 32), 64, 12),
    "bench": SD3Size(8, 4, 64, (64, 64), (2, 2), 128, (32, 32, 64, 64), 192, 36),
    "full": SD3Size(24, 24, 64, (768, 1280), (12, 32), 4096, (128, 256, 512, 512), 1024, 192),
}


def sd3_transformer(spec: SD3Size) -> SD3Transformer2DModel:
    """SD3 Medium's transformer topology at ``spec``'s widths (seed the global generator first)."""
    from diffusers import SD3Transformer2DModel

    width, width_2 = spec.text_widths
    return SD3Transformer2DModel(
        sample_size=spec.resolution // 2 ** (len(spec.vae_channels) - 1),
        patch_size=PATCH,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=spec.layers,
        num_attention_heads=spec.heads,
        attention_head_dim=spec.head_width,
        joint_attention_dim=spec.joint_attention_dim,
        caption_projection_dim=spec.heads * spec.head_width,
        pooled_projection_dim=width + width_2,
        pos_embed_max_size=spec.pos_embed_max_size,
    )


def build_sd3(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """Build a ``StableDiffusion3Pipeline`` (no T5) with SD3 Medium's architecture and seeded random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    spec = check_size(size, SIZES)
    tokenizer, tokenizer_2 = load_clip_tokenizer(), load_clip_tokenizer()
    torch.manual_seed(seed)
    full = size == "full"
    (width, width_2), (layers, layers_2) = spec.text_widths, spec.text_layers
    text_encoder = clip_text_encoder(tokenizer, width, layers, full=full, projection_dim=width)
    text_encoder_2 = clip_text_encoder(tokenizer_2, width_2, layers_2, full=full, hidden_act="gelu",
                                       projection_dim=width_2)
    transformer = sd3_transformer(spec)
    vae = autoencoder_kl(
        spec.vae_channels, resolution=spec.resolution, full=full, latent_channels=LATENT_CHANNELS,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )
    return finish(pipe, dtype)


def sd3_inputs(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Call kwargs for a run at ``size``'s resolution (text-to-image: no pictures needed)."""
    spec = check_size(size, SIZES)
    return {"height": spec.resolution, "width": spec.resolution}
