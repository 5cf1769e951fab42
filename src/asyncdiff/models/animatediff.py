"""Offline AnimateDiff-shaped (text-to-video) pipelines with deterministic random weights.

AnimateDiff adds temporal attention layers (a ``MotionAdapter`` with the UNet's block widths) to
an SD 1.5 UNet; the pipeline wraps both into one ``UNetMotionModel``, which denoises all frames
of a video in one call.

- ``tiny``: for tests, a few ms per denoiser call on one core.
- ``bench``: a denoiser call of a few hundred ms on one core (CFG batch 2, all frames).
- ``full``: SD 1.5 with the ``animatediff-motion-adapter-v1-5-2`` configuration, random weights.

Example:
    >>> pipe = build_animatediff("tiny", seed=0)
    >>> type(pipe.unet).__name__
    'UNetMotionModel'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from asyncdiff.models import sd
from asyncdiff.models.common import autoencoder_kl, check_size, clip_text_encoder, finish
from asyncdiff.models.tokenizer import load_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import AnimateDiffPipeline

__all__ = ["SIZES", "AnimateDiffSize", "animatediff_inputs", "build_animatediff"]

MOTION_MAX_FRAMES = 32  # length of the motion modules' learned position table


@dataclass(frozen=True)
class AnimateDiffSize:
    sd: sd.SDSize  # the image model the motion modules are added to
    motion_heads: int
    frames: int

    def __post_init__(self) -> None:
        if self.frames > MOTION_MAX_FRAMES:
            raise ValueError(
                f"frames={self.frames} exceeds the motion modules' {MOTION_MAX_FRAMES} positions; use fewer frames"
            )
        if any(c % self.motion_heads for c in self.sd.unet_channels):
            raise ValueError(
                f"unet_channels={self.sd.unet_channels} are not all multiples of motion_heads={self.motion_heads}"
            )


SIZES: dict[str, AnimateDiffSize] = {
    # Fewer layers and heads than SD 1.5's tiny size: the motion layers' many small attentions
    # would otherwise cost ~60 ms per call.
    "tiny": AnimateDiffSize(
        sd.SDSize((32, 32, 64, 64), 1, 2, 32, 2, (32, 32, 32, 32), 64), motion_heads=2, frames=4
    ),
    "bench": AnimateDiffSize(
        sd.SDSize((32, 64, 96, 96), 1, 8, 64, 2, (32, 32, 64, 64), 128), motion_heads=8, frames=8
    ),
    "full": AnimateDiffSize(sd.SIZES["full"], motion_heads=8, frames=16),
}


def build_animatediff(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> AnimateDiffPipeline:
    """Build an ``AnimateDiffPipeline`` (SD 1.5 + motion adapter v1.5-2 shape) with seeded random weights."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    spec = check_size(size, SIZES)
    image = spec.sd
    tokenizer = load_clip_tokenizer()
    torch.manual_seed(seed)
    full = size == "full"
    text_encoder = clip_text_encoder(tokenizer, image.text_width, image.text_layers, full=full)
    unet = sd.sd15_unet(image)
    motion_adapter = MotionAdapter(
        block_out_channels=image.unet_channels,
        motion_layers_per_block=image.layers_per_block,
        motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=spec.motion_heads,
        motion_norm_num_groups=image.norm_groups,
        motion_max_seq_length=MOTION_MAX_FRAMES,
        use_motion_mid_block=True,
    )
    vae = autoencoder_kl(image.vae_channels, resolution=image.resolution, full=full)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
        clip_sample=False, steps_offset=1, timestep_spacing="linspace",
    )
    pipe = AnimateDiffPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        motion_adapter=motion_adapter, scheduler=scheduler,
    )
    return finish(pipe, dtype)


def animatediff_inputs(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """The video size and number of frames (text-to-video: no pictures needed)."""
    spec = check_size(size, SIZES)
    side = spec.sd.resolution
    return {"height": side, "width": side, "num_frames": spec.frames}
