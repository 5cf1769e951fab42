"""Coverage cases: more image diffusion models (Qwen-Image, CogView, HunyuanDiT, Kolors, PAG, DiT, ...)."""

from __future__ import annotations

from typing import Any

import torch

from asyncdiff.models.coverage import Case
from asyncdiff.models.coverage.parts import embeds, finish, seeded, tiny_vae


def _mask(length: int, valid: int) -> torch.Tensor:
    """A (1, length) attention mask with the first ``valid`` tokens on (a padded prompt)."""
    return (torch.arange(length) < valid).long()[None]


def _qwen_parts(scale_levels: int) -> tuple[Any, Any]:
    """A tiny Qwen-Image transformer and a Qwen-Image VAE of ``2 ** scale_levels`` spatial scale."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    transformer = seeded(QwenImageTransformer2DModel, patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
                         axes_dims_rope=(8, 4, 4))
    vae = seeded(AutoencoderKLQwenImage, base_dim=4, z_dim=4, dim_mult=[1] * (scale_levels + 1), num_res_blocks=0,
                 temperal_downsample=[False] * (scale_levels - 1) + [True], latents_mean=[0.0] * 4,
                 latents_std=[1.0] * 4)
    return transformer, vae


def qwen_image() -> tuple[Any, dict[str, Any]]:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    transformer, vae = _qwen_parts(2)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                             tokenizer=None, transformer=transformer)
    # true CFG: a second transformer call per step on the negative prompt, then norm rescaling
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 16), "prompt_embeds_mask": _mask(8, 6),
                          "negative_prompt_embeds": embeds(1, 8, 16, seed=1),
                          "negative_prompt_embeds_mask": _mask(8, 5),
                          "true_cfg_scale": 4.0, "height": 32, "width": 32, "output_type": "latent"}


def qwen_image_edit() -> tuple[Any, dict[str, Any]]:
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline
    from PIL import Image

    # the pipeline resizes the input picture to ~1024x1024, so the VAE scales by 64 (16x16 latents)
    transformer, vae = _qwen_parts(6)
    pipe = QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                 tokenizer=None, processor=None, transformer=transformer)
    picture = Image.fromarray((embeds(16, 16, 3).sigmoid() * 255).to(torch.uint8).numpy()).resize((1024, 1024))
    return finish(pipe), {"image": picture, "prompt_embeds": embeds(1, 8, 16), "prompt_embeds_mask": _mask(8, 6),
                          "true_cfg_scale": 1.0, "height": 256, "width": 256, "output_type": "latent"}


def cogview3plus() -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        CogVideoXDDIMScheduler,
        CogView3PlusPipeline,
        CogView3PlusTransformer2DModel,
    )

    transformer = seeded(CogView3PlusTransformer2DModel, patch_size=2, in_channels=4, num_layers=2,
                         attention_head_dim=8, num_attention_heads=2, out_channels=4, text_embed_dim=32,
                         time_embed_dim=16, condition_dim=4, pos_embed_max_size=16, sample_size=8)
    pipe = CogView3PlusPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                                scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"))
    # with no negative prompt the pipeline uses zero embeddings for the unconditional half
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32),
                          "height": 16, "width": 16, "guidance_scale": 5.0, "output_type": "latent"}


def cogview4() -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        CogView4Pipeline,
        CogView4Transformer2DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    transformer = seeded(CogView4Transformer2DModel, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                         attention_head_dim=8, num_attention_heads=2, text_embed_dim=32, time_embed_dim=16,
                         condition_dim=4, pos_embed_max_size=16, sample_size=8, rope_axes_dim=(8, 8))
    pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75,
                                                                      base_image_seq_len=256, use_dynamic_shifting=True,
                                                                      time_shift_type="linear"))
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "height": 16, "width": 16, "guidance_scale": 5.0, "output_type": "latent"}


def hunyuandit() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    # 4 layers: the first skips into the last (HunyuanDiT's long skip connections)
    transformer = seeded(HunyuanDiT2DModel, sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8,
                         num_attention_heads=2, in_channels=4, cross_attention_dim=32, cross_attention_dim_t5=32,
                         pooled_projection_dim=16, hidden_size=16, text_len=8, text_len_t5=8,
                         activation_fn="gelu-approximate")
    pipe = HunyuanDiTPipeline(vae=tiny_vae(levels=4), text_encoder=None, tokenizer=None, transformer=transformer,
                              scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=None, tokenizer_2=None)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "prompt_attention_mask": _mask(8, 6),
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "negative_prompt_attention_mask": _mask(8, 2),
                          "prompt_embeds_2": embeds(1, 8, 32, seed=2), "prompt_attention_mask_2": _mask(8, 7),
                          "negative_prompt_embeds_2": embeds(1, 8, 32, seed=3),
                          "negative_prompt_attention_mask_2": _mask(8, 2),
                          "height": 64, "width": 64, "use_resolution_binning": False, "output_type": "latent"}


def _sdxl_unet(text_width: int, pooled_width: int, **config: Any) -> Any:
    """A two-level SDXL-style UNet (text_time added conditioning) at toy width."""
    from diffusers import UNet2DConditionModel

    return seeded(UNet2DConditionModel, sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                  layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                  attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + pooled_width,
                  cross_attention_dim=text_width, norm_num_groups=8, **config)


def kolors() -> tuple[Any, dict[str, Any]]:
    from diffusers import EulerDiscreteScheduler

    # from its module: the top-level name needs sentencepiece (for the ChatGLM tokenizer), not installed here
    from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline

    # Kolors projects ChatGLM's hidden states (4096 wide in the real model) with encoder_hid_proj
    unet = _sdxl_unet(16, 32, encoder_hid_dim=32, encoder_hid_dim_type="text_proj")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = KolorsPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "pooled_prompt_embeds": embeds(1, 32, seed=1),
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=2),
                          "negative_pooled_prompt_embeds": embeds(1, 32, seed=3),
                          "height": 16, "width": 16, "guidance_scale": 5.0, "output_type": "latent"}


def pag_sd() -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        DDIMScheduler,
        StableDiffusionPAGPipeline,
        UNet2DConditionModel,
    )

    unet = seeded(UNet2DConditionModel, sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                  layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
                  norm_num_groups=8)
    pipe = StableDiffusionPAGPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet,
                                      scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                      safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False, pag_applied_layers=["mid"])
    # CFG + PAG: a batch of 3 (uncond, cond, cond with identity self-attention in the mid block)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "height": 16, "width": 16, "guidance_scale": 5.0, "pag_scale": 3.0, "output_type": "latent"}


def pag_sdxl() -> tuple[Any, dict[str, Any]]:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPAGPipeline

    pipe = StableDiffusionXLPAGPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                        tokenizer_2=None, unet=_sdxl_unet(32, 16), scheduler=EulerDiscreteScheduler(),
                                        add_watermarker=False, pag_applied_layers=["mid", "up_blocks.0"])
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "pooled_prompt_embeds": embeds(1, 16, seed=1),
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=2),
                          "negative_pooled_prompt_embeds": embeds(1, 16, seed=3),
                          "height": 16, "width": 16, "guidance_scale": 5.0, "pag_scale": 3.0, "output_type": "latent"}


def dit() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = seeded(DiTTransformer2DModel, sample_size=8, patch_size=2, in_channels=4, out_channels=8,
                         num_layers=2, attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=1000,
                         norm_type="ada_norm_zero", norm_elementwise_affine=False)
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(),
                       scheduler=DDIMScheduler(steps_offset=1, clip_sample=False))
    # class-conditional with CFG on a null class; no latent output, so the tiny VAE decodes
    return finish(pipe), {"class_labels": [3, 7], "guidance_scale": 4.0, "output_type": "pt"}


class _NoGuardrail(torch.nn.Module):
    """Stands for Cosmos Guardrail (a large model the Cosmos pipelines refuse to run without): passes all."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_where", torch.zeros(1), persistent=False)

    @property
    def device(self) -> torch.device:  # the pipeline's ``_execution_device`` reads it
        return self._where.device

    @property
    def dtype(self) -> torch.dtype:
        return self._where.dtype

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: Any) -> Any:
        return frames


def cosmos2_text2image() -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        AutoencoderKLWan,
        Cosmos2TextToImagePipeline,
        CosmosTransformer3DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    # concat_padding_mask=False: the real model concatenates a padding-mask channel, resized with torchvision
    # (not installed here); the pipeline's padding mask is then unused
    transformer = seeded(CosmosTransformer3DModel, in_channels=16, out_channels=16, num_attention_heads=2,
                         attention_head_dim=16, num_layers=2, mlp_ratio=2, text_embed_dim=32, adaln_lora_dim=4,
                         max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
                         concat_padding_mask=False, extra_pos_embed_type="learnable")
    vae = seeded(AutoencoderKLWan, base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                 temperal_downsample=[False, True, True])
    pipe = Cosmos2TextToImagePipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                      scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
                                      safety_checker=_NoGuardrail())
    # EDM-style preconditioning around the transformer; CFG as a second call on the negative prompt
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "height": 64, "width": 64, "guidance_scale": 3.0, "output_type": "latent"}


def hunyuanimage21() -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        AdaptiveProjectedMixGuidance,
        AutoencoderKLHunyuanImage,
        FlowMatchEulerDiscreteScheduler,
        HunyuanImagePipeline,
        HunyuanImageTransformer2DModel,
    )

    transformer = seeded(HunyuanImageTransformer2DModel, in_channels=4, out_channels=4, num_attention_heads=2,
                         attention_head_dim=8, num_layers=1, num_single_layers=1, num_refiner_layers=1,
                         patch_size=(1, 1), guidance_embeds=False, text_embed_dim=32, text_embed_2_dim=32,
                         rope_axes_dim=(4, 4))
    vae = seeded(AutoencoderKLHunyuanImage, in_channels=3, out_channels=3, latent_channels=4,
                 block_out_channels=(32, 32, 32, 32), layers_per_block=1, scaling_factor=0.476986,
                 spatial_compression_ratio=8, sample_size=32)
    # a diffusers guider drives the CFG calls (plain CFG first, adaptive projected guidance from step 1)
    guider = AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=1)
    pipe = HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=vae, text_encoder=None,
                                tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
                                guider=guider, ocr_guider=None)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "prompt_embeds_mask": _mask(8, 6),
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "negative_prompt_embeds_mask": _mask(8, 3),
                          "prompt_embeds_2": embeds(1, 8, 32, seed=2), "prompt_embeds_mask_2": _mask(8, 4),
                          "negative_prompt_embeds_2": embeds(1, 8, 32, seed=3),
                          "negative_prompt_embeds_mask_2": _mask(8, 2),
                          "height": 32, "width": 32, "output_type": "latent"}


CASES = (
    Case("qwen-image", "Qwen-Image", "QwenImagePipeline", qwen_image, representative=True),
    Case("qwen-image-edit", "Qwen-Image", "QwenImageEditPipeline", qwen_image_edit),
    Case("cogview3plus", "CogView3", "CogView3PlusPipeline", cogview3plus),
    Case("cogview4", "CogView4", "CogView4Pipeline", cogview4),
    Case("hunyuandit", "HunyuanDiT", "HunyuanDiTPipeline", hunyuandit, stride2=True),
    Case("kolors", "Kolors", "KolorsPipeline", kolors),
    Case("pag-sd", "PAG", "StableDiffusionPAGPipeline", pag_sd, representative=True),
    Case("pag-sdxl", "PAG", "StableDiffusionXLPAGPipeline", pag_sdxl),
    Case("dit", "DiT", "DiTPipeline", dit),
    Case("cosmos2-t2i", "Cosmos", "Cosmos2TextToImagePipeline", cosmos2_text2image),
    Case("hunyuanimage21", "HunyuanImage", "HunyuanImagePipeline", hunyuanimage21),
)
