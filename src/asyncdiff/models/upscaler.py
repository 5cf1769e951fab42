"""Offline Stable Diffusion x4 upscaler-shaped pipelines with deterministic random weights.

The upscaler's UNet runs at the low-resolution picture's size: it reads the noisy latents (4
channels) concatenated with the noised low-resolution picture (3), and takes the noise level as a
class label (1000 classes). Its VAE has 3 levels, so it decodes latents to 4x their size.

- ``tiny``: for tests, a few ms per denoiser call on one core.
- ``bench``: a denoiser call of a few hundred ms on one core (CFG batch 2).
- ``full``: the real ``stable-diffusion-x4-upscaler`` configuration (128 px in, 512 px out).

Example:
    >>> pipe = build_sd_upscaler("tiny", seed=0)
    >>> pipe.unet.config.in_channels, pipe.vae_scale_factor
    (7, 4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from asyncdiff.models.common import autoencoder_kl, check_size, clip_text_encoder, finish
from asyncdiff.models.pictures import example_picture
from asyncdiff.models.tokenizer import load_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import StableDiffusionUpscalePipeline

__all__ = ["SIZES", "UpscalerSize", "build_sd_upscaler", "sd_upscaler_inputs"]

UPSCALE = 4
NOISE_LEVELS = 1000  # the UNet's class embedding table: one entry per noise level
# The upscaler's noise schedule, shared by the denoising and the low-resolution noising schedulers.
BETAS: dict[str, Any] = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear"}


@dataclass(frozen=True)
class UpscalerSize:
    unet_channels: tuple[int, int, int, int]
    layers_per_block: int
    heads: int
    text_width: int
    text_layers: int
    vae_channels: tuple[int, int, int]  # 3 levels: a scale factor of 4
    resolution: int  # output side in pixels; the input picture and the latents are resolution // 4

    @property
    def low_res(self) -> int:
        return self.resolution // UPSCALE


SIZES: dict[str, UpscalerSize] = {
    "tiny": UpscalerSize((32, 32, 64, 64), 2, 4, 32, 2, (32, 32, 32), 32),
    "bench": UpscalerSize((64, 128, 128, 192), 2, 4, 128, 2, (32, 32, 64), 192),
    "full": UpscalerSize((256, 512, 512, 1024), 2, 8, 1024, 23, (128, 256, 512), 512),
}


def build_sd_upscaler(
    size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32
) -> StableDiffusionUpscalePipeline:
    """Build a ``StableDiffusionUpscalePipeline`` with the x4 upscaler's architecture and seeded random weights."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    spec = check_size(size, SIZES)
    tokenizer = load_clip_tokenizer()
    torch.manual_seed(seed)
    full = size == "full"
    text_encoder = clip_text_encoder(tokenizer, spec.text_width, spec.text_layers, full=full, hidden_act="gelu")
    unet = UNet2DConditionModel(
        sample_size=spec.low_res,
        in_channels=4 + 3,  # noisy latents + noised low-resolution picture
        out_channels=4,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        only_cross_attention=(True, True, True, False),
        num_class_embeds=NOISE_LEVELS,
        cross_attention_dim=spec.text_width,
        attention_head_dim=spec.heads,  # diffusers' legacy name: this is the number of heads
        use_linear_projection=True,
        norm_num_groups=32,
    )
    # The published VAE config has sample_size 256 (its training crop) for 512 px outputs.
    vae = autoencoder_kl(spec.vae_channels, resolution=spec.resolution // 2, full=full, scaling_factor=0.08333)
    scheduler = DDIMScheduler(
        **BETAS, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    low_res_scheduler = DDPMScheduler(**BETAS, clip_sample=False, variance_type="fixed_small")
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=low_res_scheduler, scheduler=scheduler, max_noise_level=350,
    )
    return finish(pipe, dtype)


def sd_upscaler_inputs(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """The low-resolution picture (``resolution // 4`` pixels a side) to upscale."""
    spec = check_size(size, SIZES)
    return {"image": example_picture(spec.low_res, spec.low_res, seed)}
