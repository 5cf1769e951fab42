"""Offline Wan 2.1-shaped (text-to-video DiT) pipelines with deterministic random weights.

Wan's denoiser is a stack of transformer blocks over 1x2x2 patches of a 16-channel video latent
(4x temporal, 8x spatial compression by its causal 3D VAE), with rotary position embeddings and
cross-attention to UMT5 text features. Its pipeline makes classifier-free guidance two denoiser
calls per step (conditional, then unconditional): two *branches* (Note [branches] in
``engine/runtime.py``). The tokenizer is the shipped CLIP vocabulary (any tokenizer whose ids fit
the text encoder's vocabulary serves), the text encoder a small UMT5 for ``tiny``/``bench``.

- ``tiny``: for tests, a few ms per denoiser call on one core.
- ``bench``: a denoiser call of about a hundred ms on one core.
- ``full``: the Wan 2.1 T2V 1.3B transformer and VAE configuration (UMT5-XXL text encoder), random
  weights.

Example:
    >>> pipe = build_wan("tiny", seed=0)
    >>> type(pipe.transformer).__name__, pipe.transformer.config.patch_size
    ('WanTransformer3DModel', (1, 2, 2))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from asyncdiff.models.common import check_size, finish
from asyncdiff.models.tokenizer import load_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import WanPipeline

__all__ = ["SIZES", "WanSize", "build_wan", "wan_inputs"]

LATENT_CHANNELS = 16
TEMPORAL, SPATIAL = 4, 8  # the VAE's compression


@dataclass(frozen=True)
class WanSize:
    layers: int
    heads: int
    head_width: int
    ffn_width: int
    text_width: int  # UMT5 width (the transformer's text_dim)
    text_layers: int
    text_heads: int
    vae_base: int
    vae_mults: tuple[int, ...]
    resolution: int  # frame side in pixels
    frames: int  # 4k + 1, as the VAE's causal temporal compression needs
    text_tokens: int  # max_sequence_length

    def __post_init__(self) -> None:
        if (self.frames - 1) % TEMPORAL:
            raise ValueError(f"frames={self.frames} must be 4k + 1 (the VAE compresses time 4x after the first frame)")
        if self.resolution % (SPATIAL * 2):
            raise ValueError(f"resolution={self.resolution} must be a multiple of {SPATIAL * 2} (VAE x 2x2 patches)")


SIZES: dict[str, WanSize] = {
    "tiny": WanSize(2, 2, 16, 64, 32, 2, 4, 16, (1, 1, 1, 1), 32, 5, 16),
    "bench": WanSize(8, 4, 64, 1024, 64, 2, 4, 16, (1, 1, 1, 1), 128, 17, 32),
    "full": WanSize(30, 12, 128, 8960, 4096, 24, 64, 96, (1, 2, 4, 4), 480, 81, 512),
}


def build_wan(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> WanPipeline:
    """Build a ``WanPipeline`` (Wan 2.1 T2V shape) with seeded random weights."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    spec = check_size(size, SIZES)
    tokenizer = load_clip_tokenizer()
    torch.manual_seed(seed)
    full = size == "full"
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=256384 if full else len(tokenizer), d_model=spec.text_width, d_kv=spec.text_width // spec.text_heads,
        d_ff=4 * spec.text_width if not full else 10240, num_layers=spec.text_layers, num_heads=spec.text_heads,
        relative_attention_num_buckets=32, dense_act_fn="gelu_new", is_gated_act=True, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.heads, attention_head_dim=spec.head_width,
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=spec.text_width,
        freq_dim=256 if full else 2 * spec.head_width, ffn_dim=spec.ffn_width, num_layers=spec.layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    vae = AutoencoderKLWan(base_dim=spec.vae_base, z_dim=LATENT_CHANNELS, dim_mult=list(spec.vae_mults),
                           num_res_blocks=2 if full else 1, temperal_downsample=[False, True, True])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0 if full else 5.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler)
    return finish(pipe, dtype)


def wan_inputs(size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """The video size, frame count and text length (text-to-video: no pictures needed)."""
    spec = check_size(size, SIZES)
    return {"height": spec.resolution, "width": spec.resolution, "num_frames": spec.frames,
            "max_sequence_length": spec.text_tokens}
