"""Offline Stable Video Diffusion-shaped (image-to-video) pipelines with deterministic random weights.

SVD's UNet interleaves spatial and temporal layers in 4 down blocks, a mid block and 4 up blocks,
and is conditioned on a CLIP image embedding of the first frame (cross-attention), that frame's
latents (concatenated channels) and 3 numbers (fps, motion bucket, noise augmentation).
Its blocks hard-code 32 normalisation groups, so every width is a multiple of 32. The pipeline
resizes the first frame to 224 px for the image encoder; a large patch keeps that encoder cheap.

- ``tiny``: for tests, a few ms per denoiser call on one core.
- ``bench``: a denoiser call of a few hundred ms on one core (CFG batch 2, all frames).
- ``full``: the real SVD-XT configuration (25 frames at 576x1024), random weights.

Example:
    >>> pipe = build_svd("tiny", seed=0)
    >>> pipe.unet.config.in_channels
    8
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from asyncdiff.models.common import check_size, finish
from asyncdiff.models.pictures import example_picture

if TYPE_CHECKING:
    from diffusers import StableVideoDiffusionPipeline

__all__ = ["SIZES", "SVDSize", "build_svd", "svd_inputs"]

NORM_GROUPS = 32  # hard-coded in diffusers' spatio-temporal blocks
CLIP_IMAGE_SIZE = 224  # the pipeline resizes the conditioning frame to this
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ADDED_TIME_IDS = 3  # fps, motion bucket id, noise augmentation strength


@dataclass(frozen=True)
class SVDSize:
    unet_channels: tuple[int, int, int, int]
    layers_per_block: int
    head_width: int  # channels per attention head (64 in SVD)
    image_width: int  # CLIP vision encoder
    image_layers: int
    image_heads: int
    image_patch: int
    embed_dim: int  # image embedding width = the UNet's cross-attention width
    time_embed_dim: int  # addition_time_embed_dim
    vae_channels: tuple[int, ...]
    height: int
    width: int
    frames: int
    # Picture side recorded in the configs (768 for SVD, though it runs at 576x1024 by default);
    # the pipeline takes height and width per call, so this only sets config fields.
    sample_size: int

    def __post_init__(self) -> None:
        for name in ("unet_channels", "vae_channels"):
            channels = getattr(self, name)
            if any(c % NORM_GROUPS for c in channels):
                raise ValueError(
                    f"{name}={channels} must all be multiples of {NORM_GROUPS}: diffusers' spatio-temporal "
                    f"blocks hard-code {NORM_GROUPS} normalisation groups"
                )
        if any(c % self.head_width for c in self.unet_channels):
            raise ValueError(
                f"unet_channels={self.unet_channels} are not all multiples of head_width={self.head_width}; "
                "pick a head width that divides every block width"
            )
        if CLIP_IMAGE_SIZE % self.image_patch:
            raise ValueError(f"image_patch={self.image_patch} does not divide {CLIP_IMAGE_SIZE}; use a divisor")

    @property
    def heads(self) -> tuple[int, ...]:
        return tuple(c // self.head_width for c in self.unet_channels)


SIZES: dict[str, SVDSize] = {
    "tiny": SVDSize(
        unet_channels=(32, 32, 64, 64), layers_per_block=1, head_width=32,
        image_width=32, image_layers=2, image_heads=4, image_patch=112, embed_dim=32, time_embed_dim=8,
        vae_channels=(32, 32, 32, 32), height=64, width=64, frames=3, sample_size=64,
    ),
    "bench": SVDSize(
        unet_channels=(64, 64, 128, 128), layers_per_block=1, head_width=32,
        image_width=64, image_layers=2, image_heads=4, image_patch=56, embed_dim=128, time_embed_dim=32,
        vae_channels=(32, 32, 64, 64), height=128, width=128, frames=8, sample_size=128,
    ),
    "full": SVDSize(  # stable-video-diffusion-img2vid-xt
        unet_channels=(320, 640, 1280, 1280), layers_per_block=2, head_width=64,
        image_width=1280, image_layers=32, image_heads=16, image_patch=14, embed_dim=1024, time_embed_dim=256,
        vae_channels=(128, 256, 512, 512), height=576, width=1024, frames=25, sample_size=768,
    ),
}


def build_svd(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> StableVideoDiffusionPipeline:
    """Build a ``StableVideoDiffusionPipeline`` with SVD-XT's architecture and seeded random weights."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    spec = check_size(size, SIZES)
    torch.manual_seed(seed)
    full = size == "full"
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=spec.image_width,
        intermediate_size=4 * spec.image_width,
        num_hidden_layers=spec.image_layers,
        num_attention_heads=spec.image_heads,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=spec.image_patch,
        projection_dim=spec.embed_dim,
        hidden_act="gelu",
    ))
    vae_scale = 2 ** (len(spec.vae_channels) - 1)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=spec.sample_size // vae_scale,
        in_channels=4 + 4,  # noisy latents + first-frame latents
        out_channels=4,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        num_attention_heads=spec.heads,
        cross_attention_dim=spec.embed_dim,
        addition_time_embed_dim=spec.time_embed_dim,
        projection_class_embeddings_input_dim=ADDED_TIME_IDS * spec.time_embed_dim,
        num_frames=spec.frames,
    )
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        layers_per_block=2 if full else 1,
        latent_channels=4,
        sample_size=spec.sample_size,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
        interpolation_type="linear", use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0,
        timestep_spacing="leading", timestep_type="continuous", steps_offset=1,
    )
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE_SIZE}, crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler, feature_extractor=feature_extractor,
    )
    return finish(pipe, dtype)


def svd_inputs(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """The first frame, the video size and its number of frames."""
    spec = check_size(size, SIZES)
    return {
        "image": example_picture(spec.width, spec.height, seed),
        "height": spec.height,
        "width": spec.width,
        "num_frames": spec.frames,
    }
