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

import torch

from asyncdiff.models.tokenizer import load_clip_tokenizer

__all__ = ["SIZES", "SDSize", "build_sd15"]


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
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not a built-in size; use one of {sorted(SIZES)}")
    return SIZES[size]


def build_sd15(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build a ``StableDiffusionPipeline`` with SD 1.5's architecture and seeded random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = _check_size(size)
    tokenizer = load_clip_tokenizer()
    torch.manual_seed(seed)
    full = size == "full"
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408 if full else len(tokenizer),
        hidden_size=spec.text_width,
        intermediate_size=4 * spec.text_width,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=max(1, spec.text_width // 64) if full else 4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=spec.resolution // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=spec.text_width,
        attention_head_dim=spec.head_dim,
        norm_num_groups=spec.norm_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        block_out_channels=spec.vae_channels,
        layers_per_block=2 if full else 1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=spec.resolution,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
