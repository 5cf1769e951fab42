"""Offline SDXL-shaped pipelines (text-to-image, inpainting, ControlNet) with random weights.

SDXL's UNet has 3 down blocks (``DownBlock2D``, then 2 ``CrossAttnDownBlock2D``), a mid block and
3 up blocks, with deeper transformers in the lower blocks (1, 2, 10 layers at full size). It reads
two CLIP text encoders (CLIP-L, then OpenCLIP-bigG with a projection), concatenated on the feature
axis, and a "text_time" embedding of the pooled text plus 6 size/crop numbers.

- ``tiny``: for tests, a few ms per denoiser call on one core.
- ``bench``: a denoiser call of a few hundred ms on one core (CFG batch 2).
- ``full``: the real SDXL 1.0 base configuration (2.6 B UNet parameters), random weights.

With the same seed, the three builders share text encoder weights, and since the ControlNet is
built last, ``build_controlnet_sdxl`` shares all of ``build_sdxl``'s weights (the inpainting UNet's
wider input changes every draw after it).

Example:
    >>> pipe = build_sdxl("tiny", seed=0)
    >>> pipe.unet.config.cross_attention_dim == sum(SIZES["tiny"].text_widths)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from asyncdiff.models.common import autoencoder_kl, check_size, clip_text_encoder, finish
from asyncdiff.models.pictures import edge_map, example_mask, example_picture
from asyncdiff.models.tokenizer import load_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import (
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

__all__ = [
    "SIZES",
    "SDXLSize",
    "build_controlnet_sdxl",
    "build_sdxl",
    "build_sdxl_inpaint",
    "controlnet_sdxl_inputs",
    "sdxl_inpaint_inputs",
    "sdxl_inputs",
    "sdxl_unet",
]

TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)


@dataclass(frozen=True)
class SDXLSize:
    unet_channels: tuple[int, int, int]
    layers_per_block: int
    transformer_layers: tuple[int, int, int]  # per down block; the mid block uses the last
    head_width: int  # channels per attention head (64 in SDXL)
    text_widths: tuple[int, int]  # CLIP-L-like, OpenCLIP-bigG-like (with projection)
    text_layers: tuple[int, int]
    time_embed_dim: int  # addition_time_embed_dim
    vae_channels: tuple[int, ...]
    controlnet_channels: tuple[int, ...]  # conditioning embedding; one level per VAE level
    resolution: int  # image side in pixels

    def __post_init__(self) -> None:
        if any(c % self.head_width for c in self.unet_channels):
            raise ValueError(
                f"unet_channels={self.unet_channels} are not all multiples of head_width={self.head_width}; "
                "pick a head width that divides every block width"
            )
        # Note: the ControlNet's conditioning embedding halves the picture once per level after the
        # first, so it must have as many levels as the VAE to land on the latent grid.
        if len(self.controlnet_channels) != len(self.vae_channels):
            raise ValueError(
                f"controlnet_channels={self.controlnet_channels} has {len(self.controlnet_channels)} levels but "
                f"vae_channels={self.vae_channels} has {len(self.vae_channels)}; give both the same number"
            )

    @property
    def heads(self) -> tuple[int, ...]:
        return tuple(c // self.head_width for c in self.unet_channels)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


SIZES: dict[str, SDXLSize] = {
    "tiny": SDXLSize(
        unet_channels=(32, 64, 64), layers_per_block=2, transformer_layers=(1, 1, 2), head_width=16,
        text_widths=(32, 32), text_layers=(2, 2), time_embed_dim=8,
        vae_channels=(32, 32, 32, 32), controlnet_channels=(8, 8, 16, 16), resolution=64,
    ),
    "bench": SDXLSize(
        unet_channels=(64, 128, 192), layers_per_block=2, transformer_layers=(1, 2, 6), head_width=32,
        text_widths=(128, 128), text_layers=(2, 2), time_embed_dim=32,
        vae_channels=(32, 32, 64, 64), controlnet_channels=(16, 16, 32, 32), resolution=192,
    ),
    "full": SDXLSize(  # stable-diffusion-xl-base-1.0, controlnet-canny-sdxl-1.0
        unet_channels=(320, 640, 1280), layers_per_block=2, transformer_layers=(1, 2, 10), head_width=64,
        text_widths=(768, 1280), text_layers=(12, 32), time_embed_dim=256,
        vae_channels=(128, 256, 512, 512), controlnet_channels=(16, 32, 96, 256), resolution=1024,
    ),
}


def sdxl_unet(spec: SDXLSize, in_channels: int = 4) -> UNet2DConditionModel:
    """SDXL base's UNet topology at ``spec``'s widths (seed the global generator first)."""
    from diffusers import UNet2DConditionModel

    width, width_2 = spec.text_widths
    return UNet2DConditionModel(
        sample_size=spec.resolution // spec.vae_scale,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=spec.transformer_layers,
        attention_head_dim=spec.heads,  # diffusers' legacy name: this is the number of heads
        cross_attention_dim=width + width_2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=spec.time_embed_dim,
        projection_class_embeddings_input_dim=TIME_IDS * spec.time_embed_dim + width_2,
        norm_num_groups=32,
    )


def _sdxl_parts(size: str, seed: int, in_channels: int) -> dict[str, Any]:
    """Pipeline kwargs: text encoders, UNet, VAE (constructed in that order after seeding), scheduler."""
    from diffusers import EulerDiscreteScheduler

    spec = check_size(size, SIZES)
    tokenizer, tokenizer_2 = load_clip_tokenizer(), load_clip_tokenizer()
    torch.manual_seed(seed)
    full = size == "full"
    (width, width_2), (layers, layers_2) = spec.text_widths, spec.text_layers
    text_encoder = clip_text_encoder(tokenizer, width, layers, full=full)
    text_encoder_2 = clip_text_encoder(tokenizer_2, width_2, layers_2, full=full, hidden_act="gelu",
                                       projection_dim=width_2)
    unet = sdxl_unet(spec, in_channels)
    vae = autoencoder_kl(spec.vae_channels, resolution=spec.resolution, full=full, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
    )
    return {
        "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2, "unet": unet, "scheduler": scheduler, "add_watermarker": False,
    }


def build_sdxl(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    """Build a ``StableDiffusionXLPipeline`` with SDXL 1.0 base's architecture and seeded random weights."""
    from diffusers import StableDiffusionXLPipeline

    return finish(StableDiffusionXLPipeline(**_sdxl_parts(size, seed, in_channels=4)), dtype)


def build_sdxl_inpaint(
    size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32
) -> StableDiffusionXLInpaintPipeline:
    """Build a ``StableDiffusionXLInpaintPipeline``: SDXL with a 9-channel UNet input.

    The UNet reads the noisy latents (4), the mask (1) and the masked picture's latents (4).
    """
    from diffusers import StableDiffusionXLInpaintPipeline

    return finish(StableDiffusionXLInpaintPipeline(**_sdxl_parts(size, seed, in_channels=9)), dtype)


def build_controlnet_sdxl(
    size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32
) -> StableDiffusionXLControlNetPipeline:
    """Build a ``StableDiffusionXLControlNetPipeline`` whose ControlNet mirrors the SDXL UNet's encoder."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    parts = _sdxl_parts(size, seed, in_channels=4)
    spec = SIZES[size]
    controlnet = ControlNetModel.from_unet(
        parts["unet"], conditioning_embedding_out_channels=spec.controlnet_channels, load_weights_from_unet=False
    )
    # Note: a fresh ControlNet starts with zero output convolutions, so its residuals are exactly
    # zero and the control image would have no effect. Random weights there make the control path
    # observable (a bug that drops it changes the result).
    zero_convs = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                  controlnet.controlnet_mid_block]
    for conv in zero_convs:
        conv.reset_parameters()
    return finish(StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet), dtype)


def sdxl_inputs(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Call kwargs for a run at ``size``'s resolution (text-to-image: no pictures needed)."""
    spec = check_size(size, SIZES)
    return {"height": spec.resolution, "width": spec.resolution}


def sdxl_inpaint_inputs(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """A picture and a central elliptic mask; ``strength=1.0`` so every requested step runs."""
    spec = check_size(size, SIZES)
    side = spec.resolution
    return {
        "image": example_picture(side, side, seed),
        "mask_image": example_mask(side, side),
        "height": side,
        "width": side,
        # The pipeline's default strength (0.9999) would skip the first of 2 steps.
        "strength": 1.0,
    }


def controlnet_sdxl_inputs(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """An edge picture as the control image."""
    spec = check_size(size, SIZES)
    side = spec.resolution
    return {"image": edge_map(example_picture(side, side, seed)), "height": side, "width": side}
