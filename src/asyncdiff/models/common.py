"""Pieces shared by the offline pipeline builders: size checks, CLIP text encoders, VAEs.

Every builder takes a size name (``tiny``, ``bench`` or ``full``), seeds the global torch
generator, and constructs its modules in a fixed order, so one seed always gives the same weights.
Text encoders use the small shipped CLIP vocabulary (:func:`load_clip_tokenizer`) except at
``full`` size, where they keep the real 49408-token embedding table.

Example:
    >>> from asyncdiff.models.tokenizer import load_clip_tokenizer
    >>> encoder = clip_text_encoder(load_clip_tokenizer(), width=32, layers=2, full=False)
    >>> encoder.config.num_attention_heads
    4
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = ["SIZE_NAMES", "autoencoder_kl", "check_size", "clip_text_encoder", "finish"]

SIZE_NAMES = ("tiny", "bench", "full")
CLIP_VOCAB_SIZE = 49408  # the real CLIP BPE vocabulary, kept at full size
CLIP_HEAD_WIDTH = 64  # every real CLIP text encoder (L, OpenCLIP-H, OpenCLIP-bigG) uses 64-wide heads
SMALL_HEADS = 4  # tiny and bench text encoders

Spec = TypeVar("Spec")


def check_size(size: str, sizes: Mapping[str, Spec]) -> Spec:
    """Return ``sizes[size]``, or raise a ``ValueError`` that names the size and the choices."""
    if size not in sizes:
        raise ValueError(f"size={size!r} is not a built-in size; use one of {sorted(sizes)}")
    return sizes[size]


def clip_text_encoder(
    tokenizer: CLIPTokenizer,
    width: int,
    layers: int,
    *,
    full: bool,
    hidden_act: str = "quick_gelu",
    projection_dim: int | None = None,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A CLIP text encoder whose special token ids match ``tokenizer``.

    ``projection_dim=None`` gives a ``CLIPTextModel``; an int gives a ``CLIPTextModelWithProjection``
    (SDXL's second encoder, both SD3 encoders). OpenAI CLIP-L uses ``quick_gelu``; the OpenCLIP
    encoders (H, bigG) use ``gelu``.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    heads = width // CLIP_HEAD_WIDTH if full else SMALL_HEADS
    if width % heads:
        raise ValueError(f"text width={width} is not divisible by {heads} attention heads; use a multiple of {heads}")
    extra: dict[str, Any] = {} if projection_dim is None else {"projection_dim": projection_dim}
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE if full else len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    return CLIPTextModel(config) if projection_dim is None else CLIPTextModelWithProjection(config)


def autoencoder_kl(
    channels: tuple[int, ...],
    *,
    resolution: int,
    full: bool,
    latent_channels: int = 4,
    **config: Any,
) -> AutoencoderKL:
    """An ``AutoencoderKL`` with ``len(channels)`` levels (scale factor ``2 ** (len(channels) - 1)``).

    Real VAEs have 2 resnets per level; smaller sizes use 1. ``config`` passes the remaining
    ``AutoencoderKL`` options (``scaling_factor``, ``use_quant_conv``, ...).
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=2 if full else 1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=resolution,
        **config,
    )


def finish(pipe: Any, dtype: torch.dtype) -> Any:
    """Inference mode for every model (no dropout: a model built from a config starts in training
    mode, unlike one from ``from_pretrained``), no progress bar, and ``dtype``; every builder ends
    with this."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
