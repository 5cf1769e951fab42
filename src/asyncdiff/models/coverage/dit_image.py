"""Coverage cases: text-to-image diffusion transformers (Flux, Flux2, SD 3.5, Sana, Lumina, PixArt, HiDream, ...)."""

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


def _mask(length: int, pad: int = 2) -> Any:
    """A text attention mask of ``length`` tokens whose last ``pad`` are padding."""
    import torch

    return torch.tensor([[1] * (length - pad) + [0] * pad])


def flux2() -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    transformer = seeded(Flux2Transformer2DModel, patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                         timestep_guidance_channels=32, axes_dims_rope=(2, 2, 2, 2))
    vae = seeded(AutoencoderKLFlux2, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                 up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                 norm_num_groups=1, sample_size=16, use_quant_conv=False, use_post_quant_conv=False)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                         transformer=transformer)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "height": 16, "width": 16, "guidance_scale": 4.0,
                          "output_type": "latent"}


def flux2_klein() -> tuple[Any, dict[str, Any]]:
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)

    # Klein: no guidance embedding; true CFG as two transformer calls (cond, then uncond) per step
    transformer = seeded(Flux2Transformer2DModel, patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                         timestep_guidance_channels=32, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False)
    vae = seeded(AutoencoderKLFlux2, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                 up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                 norm_num_groups=1, sample_size=16, use_quant_conv=False, use_post_quant_conv=False)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                              tokenizer=None, transformer=transformer, is_distilled=False)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "negative_prompt_embeds": embeds(1, 6, 32, seed=1),
                          "height": 16, "width": 16, "guidance_scale": 4.0, "output_type": "latent"}


def flux2_klein_kv() -> tuple[Any, dict[str, Any]]:
    import numpy as np
    from diffusers import Flux2KleinKVPipeline
    from PIL import Image

    # the reference image's keys and values are cached at step 0 and passed to the blocks after it
    klein, call = flux2_klein()
    pipe = Flux2KleinKVPipeline(scheduler=klein.scheduler, vae=klein.vae, text_encoder=None, tokenizer=None,
                                transformer=klein.transformer)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return finish(pipe), {"prompt_embeds": call["prompt_embeds"], "image": picture, "height": 16, "width": 16,
                          "output_type": "latent"}


def _sd35(**call: Any) -> tuple[Any, dict[str, Any]]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    # SD 3.5 Medium's MMDiT-X: dual (self + joint) attention in the first layers, RMS qk-norm
    transformer = seeded(SD3Transformer2DModel, sample_size=8, patch_size=2, in_channels=16, out_channels=16,
                         num_layers=3, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                         caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8,
                         dual_attention_layers=(0, 1), qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(latent_channels=16), text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "pooled_prompt_embeds": embeds(1, 32, seed=1),
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=2),
                          "negative_pooled_prompt_embeds": embeds(1, 32, seed=3),
                          "height": 16, "width": 16, "guidance_scale": 4.5, "output_type": "latent", **call}


def sd35() -> tuple[Any, dict[str, Any]]:
    return _sd35()


def sd35_slg() -> tuple[Any, dict[str, Any]]:
    # skip-layer guidance: a third transformer call per step (batch 1, layer 1 skipped) in the guided window
    return _sd35(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)


def sana() -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    # linear (ReLU) self-attention, cross-attention to the caption, GLUMBConv (depthwise conv) feed-forward
    transformer = seeded(SanaTransformer2DModel, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                         num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                         cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32, sample_size=8)
    vae = seeded(AutoencoderDC, in_channels=3, latent_channels=4, attention_head_dim=2,
                 encoder_block_types=("ResBlock", "EfficientViTBlock"),
                 decoder_block_types=("ResBlock", "EfficientViTBlock"),
                 encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                 encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                 encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
                 upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                 scaling_factor=0.41407)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "prompt_attention_mask": _mask(8),
                          "negative_prompt": None, "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "negative_prompt_attention_mask": _mask(8, 3), "complex_human_instruction": None,
                          "height": 32, "width": 32, "guidance_scale": 4.5, "use_resolution_binning": False,
                          "output_type": "latent"}


def lumina_next() -> tuple[Any, dict[str, Any]]:
    from diffusers import FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline

    # the pipeline computes complex 2-D RoPE frequencies each step (NTK / linear scaling around the watershed)
    transformer = seeded(LuminaNextDiT2DModel, sample_size=8, patch_size=2, in_channels=4, hidden_size=16,
                         num_layers=2, num_attention_heads=2, num_kv_heads=1, multiple_of=16, learn_sigma=True,
                         qk_norm=True, cross_attention_dim=32)
    pipe = LuminaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
                          text_encoder=None, tokenizer=None)
    return finish(pipe), _lumina_call()


def _lumina_call() -> dict[str, Any]:
    """Both Lumina pipelines' call: masked prompt embeddings (the negative one padded), CFG."""
    return {"prompt_embeds": embeds(1, 8, 32), "prompt_attention_mask": _mask(8),
            "negative_prompt_embeds": embeds(1, 8, 32, seed=1), "negative_prompt_attention_mask": _mask(8, 3),
            "height": 64, "width": 64, "guidance_scale": 4.0, "output_type": "latent"}


def lumina2() -> tuple[Any, dict[str, Any]]:
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    # noise / context refiners, then joint layers over the concatenated sequence; CFG as two calls, normalised
    transformer = seeded(Lumina2Transformer2DModel, sample_size=8, patch_size=2, in_channels=4, hidden_size=16,
                         num_layers=2, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                         axes_dim_rope=(4, 2, 2), axes_lens=(32, 16, 16), cap_feat_dim=32)
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
                           text_encoder=None, tokenizer=None)
    return finish(pipe), _lumina_call()


def aura_flow() -> tuple[Any, dict[str, Any]]:
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = seeded(AuraFlowTransformer2DModel, sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
                         num_single_dit_layers=2, attention_head_dim=8, num_attention_heads=2,
                         caption_projection_dim=16, joint_attention_dim=32, out_channels=4, pos_embed_max_size=64)
    pipe = AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "prompt_attention_mask": _mask(8, 0),
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "negative_prompt_attention_mask": _mask(8, 0),
                          "height": 16, "width": 16, "guidance_scale": 3.5, "output_type": "latent"}


def chroma() -> tuple[Any, dict[str, Any]]:
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    # Flux-like with a distilled modulation approximator instead of per-block AdaLN, masked T5 tokens, true CFG
    transformer = seeded(ChromaTransformer2DModel, patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(2, 2, 4),
                         approximator_hidden_dim=32, approximator_layers=1, approximator_num_channels=16)
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(latent_channels=4),
                          text_encoder=None, tokenizer=None, transformer=transformer)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "prompt_attention_mask": _mask(8).bool(),
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "negative_prompt_attention_mask": _mask(8, 3).bool(),
                          "height": 16, "width": 16, "guidance_scale": 5.0, "output_type": "latent"}


def hidream() -> tuple[Any, dict[str, Any]]:
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel

    # mixture-of-experts feed-forward (routed top-k), per-layer Llama hidden states, T5 tokens
    transformer = seeded(HiDreamImageTransformer2DModel, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                         num_single_layers=1, attention_head_dim=8, num_attention_heads=2, caption_channels=[32, 16],
                         text_emb_dim=32, num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 2, 2),
                         max_resolution=(16, 16), llama_layers=(0, 1))
    pipe = HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None,
                                tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                tokenizer_3=None, text_encoder_4=None, tokenizer_4=None, transformer=transformer)
    pipe.default_sample_size = 8  # the pipeline rescales every request to this area: keep it tiny
    return finish(pipe), {"prompt_embeds_t5": embeds(1, 8, 32), "prompt_embeds_llama3": embeds(2, 1, 8, 16, seed=1),
                          "pooled_prompt_embeds": embeds(1, 32, seed=2),
                          "negative_prompt_embeds_t5": embeds(1, 8, 32, seed=3),
                          "negative_prompt_embeds_llama3": embeds(2, 1, 8, 16, seed=4),
                          "negative_pooled_prompt_embeds": embeds(1, 32, seed=5),
                          "height": 16, "width": 16, "guidance_scale": 5.0, "output_type": "latent"}


def pixart_alpha() -> tuple[Any, dict[str, Any]]:
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    # PixArt-Alpha: resolution / aspect-ratio micro-conditions (added_cond_kwargs), multistep DPM-Solver
    # (the pipeline passes the micro-conditions only to a transformer of sample_size 128, as in PixArt-XL-2-1024)
    # (and splits the timestep width in three: 24)
    transformer = seeded(PixArtTransformer2DModel, sample_size=128, num_layers=2, patch_size=2, attention_head_dim=12,
                         num_attention_heads=2, caption_channels=32, in_channels=4, cross_attention_dim=24,
                         out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                         num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                         norm_eps=1e-6, use_additional_conditions=True)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "prompt_attention_mask": _mask(8),
                          "negative_prompt": None, "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "negative_prompt_attention_mask": _mask(8, 3),
                          "height": 16, "width": 16, "use_resolution_binning": False, "output_type": "latent"}


def z_image() -> tuple[Any, dict[str, Any]]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    # single-stream DiT over lists of per-sample tensors (prompts of different lengths), noise / context refiners
    transformer = seeded(ZImageTransformer2DModel, all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                         n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16,
                         axes_dims=[8, 4, 4], axes_lens=[64, 16, 16])
    with torch.no_grad():  # the pad tokens start as torch.empty
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(latent_channels=16),
                          text_encoder=None, tokenizer=None, transformer=transformer)
    return finish(pipe), {"prompt_embeds": [embeds(8, 16)], "negative_prompt_embeds": [embeds(5, 16, seed=1)],
                          "height": 32, "width": 32, "guidance_scale": 3.0, "output_type": "latent"}


CASES = (
    Case("flux", "Flux", "FluxPipeline", flux, representative=True),
    Case("pixart-sigma", "PixArt", "PixArtSigmaPipeline", pixart_sigma),
    Case("flux2", "Flux2", "Flux2Pipeline", flux2),
    Case("flux2-klein", "Flux2", "Flux2KleinPipeline", flux2_klein, representative=True, stride2=True),
    Case("sd35", "Stable Diffusion 3", "StableDiffusion3Pipeline", sd35),
    Case("flux2-klein-kv", "Flux2", "Flux2KleinKVPipeline", flux2_klein_kv),
    Case("sd35-slg", "Stable Diffusion 3", "StableDiffusion3Pipeline", sd35_slg, representative=True),
    Case("sana", "Sana", "SanaPipeline", sana),
    Case("lumina-next", "Lumina", "LuminaPipeline", lumina_next, representative=True),  # value trace, deferred release
    Case("lumina2", "Lumina", "Lumina2Pipeline", lumina2, representative=True),
    Case("aura-flow", "AuraFlow", "AuraFlowPipeline", aura_flow),
    Case("chroma", "Chroma", "ChromaPipeline", chroma),
    Case("hidream", "HiDream", "HiDreamImagePipeline", hidream, representative=True),
    Case("pixart-alpha", "PixArt", "PixArtAlphaPipeline", pixart_alpha),
    Case("z-image", "Z-Image", "ZImagePipeline", z_image, representative=True),
)
