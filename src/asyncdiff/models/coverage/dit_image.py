"""Coverage cases: text-to-image diffusion transformers (Flux, PixArt, ...)."""

from __future__ import annotations

from typing import Any

from asyncdiff.models.coverage import Case
from asyncdiff.models.coverage.parts import embeds, finish, seeded, tiny_vae


def flux() -> tuple[Any, dict[str, Any]]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = seeded(FluxTransformer2DModel, patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                         pooled_projection_dim=32, axes_dims_rope=(2, 2, 4))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(latent_channels=4),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "pooled_prompt_embeds": embeds(1, 32, seed=1),
                          "height": 16, "width": 16, "guidance_scale": 3.5, "output_type": "latent"}


def pixart_sigma() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = seeded(PixArtTransformer2DModel, sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                         num_attention_heads=2, caption_channels=32, in_channels=4, cross_attention_dim=16,
                         out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                         num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                         norm_eps=1e-6)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                               scheduler=DDIMScheduler())
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "prompt_attention_mask": embeds(1, 8).gt(-5).long(),
                          "negative_prompt": None, "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "negative_prompt_attention_mask": embeds(1, 8).gt(-5).long(),
                          "height": 16, "width": 16, "use_resolution_binning": False, "output_type": "latent"}


CASES = (
    Case("flux", "Flux", "FluxPipeline", flux, representative=True),
    Case("pixart-sigma", "PixArt", "PixArtSigmaPipeline", pixart_sigma),
)
