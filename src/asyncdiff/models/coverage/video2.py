"""Coverage cases: more video diffusion transformers (Wan 2.2, Wan I2V / VACE / Animate, SkyReels-V2,
Cosmos, Kandinsky 5).

Most of these are Wan-shaped DiTs over a 16-channel latent from the causal 3D Wan VAE (4x in time,
8x in space). The pipelines that condition on a picture or a video encode it with that VAE, so the
cases build a tiny one (3 base channels); those that need CLIP image features build a tiny CLIP
vision tower (its image processor needs no files).
"""

from __future__ import annotations

from typing import Any

import torch

from asyncdiff.models.coverage import Case
from asyncdiff.models.coverage.parts import embeds, finish, seeded

TEXT = 32  # the text width every tiny denoiser here takes (UMT5 / T5 stand-in)


def _wan_vae(**config: Any) -> Any:
    from diffusers import AutoencoderKLWan

    base = {"base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
            "temperal_downsample": [False, True, True]}
    return seeded(AutoencoderKLWan, **{**base, **config})


def _wan_dit(cls: Any = None, seed: int = 0, **config: Any) -> Any:
    """A 2-block Wan-style transformer (heads 2 x 12: the rotary split needs head_dim // 6 > 0)."""
    if cls is None:
        from diffusers import WanTransformer3DModel as cls
    base = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 16,
            "out_channels": 16, "text_dim": TEXT, "freq_dim": 32, "ffn_dim": 32, "num_layers": 2,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 32}
    return seeded(cls, seed=seed, **{**base, **config})


def _text(n: int = 8) -> dict[str, Any]:
    return {"prompt_embeds": embeds(1, n, TEXT), "negative_prompt_embeds": embeds(1, n, TEXT, seed=1)}


def _picture(side: int = 32, seed: int = 0) -> Any:
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _clip_vision(side: int, width: int = 8) -> tuple[Any, Any]:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    encoder = seeded(CLIPVisionModelWithProjection, CLIPVisionConfig(
        hidden_size=width, projection_dim=width, num_hidden_layers=2, num_attention_heads=2, image_size=side,
        intermediate_size=16, patch_size=4))
    return encoder, CLIPImageProcessor(crop_size=side, size=side)


# --- Wan 2.2 -----------------------------------------------------------------------------------


def wan22() -> tuple[Any, dict[str, Any]]:
    """Wan 2.2 A14B text-to-video: two experts, ``transformer`` above the boundary timestep and
    ``transformer_2`` below it (with 2 steps at shift 5: t=1000 then t=833 < 875, so both run)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=_wan_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=_wan_dit(seed=0),
                       transformer_2=_wan_dit(seed=1), boundary_ratio=0.875)
    return finish(pipe), {**_text(), "height": 32, "width": 32, "num_frames": 5, "guidance_scale": 4.0,
                          "guidance_scale_2": 3.0, "output_type": "latent"}


def wan22_ti2v() -> tuple[Any, dict[str, Any]]:
    """Wan 2.2 TI2V-5B image-to-video: the 48-channel residual VAE (16x spatial) and per-token
    timesteps (``expand_timesteps``: the first latent frame, the picture, stays at t=0)."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline

    vae = _wan_vae(z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                   latents_mean=[0.0] * 48, latents_std=[1.0] * 48, scale_factor_spatial=16, scale_factor_temporal=4)
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, image_processor=None, image_encoder=None,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0),
        transformer=_wan_dit(in_channels=48, out_channels=48), transformer_2=None, boundary_ratio=None,
        expand_timesteps=True)
    return finish(pipe), {**_text(), "image": _picture(64), "height": 64, "width": 64, "num_frames": 5,
                          "guidance_scale": 5.0, "output_type": "latent"}


# --- Wan 2.1 image-to-video, VACE, Animate ------------------------------------------------------


def wan_i2v() -> tuple[Any, dict[str, Any]]:
    """Wan 2.1 I2V: the picture's VAE latent and mask concatenated on channels (16 + 4 + 16 = 36)
    and CLIP image tokens as extra cross-attention keys (``image_dim``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    encoder, processor = _clip_vision(32)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=_wan_vae(), image_processor=processor,
                                   image_encoder=encoder, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                                   transformer=_wan_dit(in_channels=36, image_dim=8))
    return finish(pipe), {**_text(), "image": _picture(32), "height": 32, "width": 32, "num_frames": 5,
                          "guidance_scale": 5.0, "output_type": "latent"}


def wan_vace() -> tuple[Any, dict[str, Any]]:
    """Wan VACE: a control branch (VACE blocks over the encoded video + mask, 96 channels) whose
    hints are added after chosen main blocks."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        WanVACEPipeline,
        WanVACETransformer3DModel,
    )

    transformer = _wan_dit(WanVACETransformer3DModel, num_layers=3, vace_layers=[0, 2], vace_in_channels=96)
    pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=_wan_vae(),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer)
    video = [_picture(32, seed=i) for i in range(5)]
    return finish(pipe), {**_text(), "video": video, "height": 32, "width": 32, "num_frames": 5,
                          "guidance_scale": 5.0, "output_type": "latent"}


def wan_animate() -> tuple[Any, dict[str, Any]]:
    """Wan Animate: pose latents added to the patch embedding, a motion encoder over face crops
    and face-adapter cross-attention every few blocks, CLIP image tokens; one segment here."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        WanAnimatePipeline,
        WanAnimateTransformer3DModel,
    )

    encoder, processor = _clip_vision(16)
    transformer = _wan_dit(WanAnimateTransformer3DModel, in_channels=36, latent_channels=16, image_dim=8,
                           motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16,
                           motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
                           face_encoder_num_heads=2, inject_face_latents_blocks=2)
    pipe = WanAnimatePipeline(tokenizer=None, text_encoder=None, vae=_wan_vae(), image_processor=processor,
                              image_encoder=encoder, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                              transformer=transformer)
    return finish(pipe), {**_text(), "image": _picture(32), "pose_video": [_picture(32, seed=i) for i in range(5)],
                          "face_video": [_picture(16, seed=10 + i) for i in range(5)], "height": 32, "width": 32,
                          "segment_frame_length": 5, "prev_segment_conditioning_frames": 1, "guidance_scale": 2.0,
                          "output_type": "latent"}


# --- SkyReels-V2 --------------------------------------------------------------------------------


def _skyreels(pipeline: str, **config: Any) -> Any:
    import diffusers
    from diffusers import SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    pipe = getattr(diffusers, pipeline)(tokenizer=None, text_encoder=None, vae=_wan_vae(), scheduler=scheduler,
                                        transformer=_wan_dit(SkyReelsV2Transformer3DModel, **config))
    return finish(pipe)


def skyreels_v2() -> tuple[Any, dict[str, Any]]:
    return _skyreels("SkyReelsV2Pipeline"), {**_text(), "height": 32, "width": 32, "num_frames": 5,
                                             "guidance_scale": 6.0, "output_type": "latent"}


def skyreels_v2_df() -> tuple[Any, dict[str, Any]]:
    """Diffusion forcing, synchronous: per-frame timesteps (a [batch, frames] timestep) and one
    scheduler per latent frame."""
    pipe = _skyreels("SkyReelsV2DiffusionForcingPipeline", inject_sample_info=True)
    return pipe, {**_text(), "prompt": None, "height": 32, "width": 32, "num_frames": 9, "base_num_frames": 9,
                  "guidance_scale": 6.0, "output_type": "latent"}


def skyreels_v2_df_async() -> tuple[Any, dict[str, Any]]:
    """Diffusion forcing, asynchronous: blocks of frames denoised in a staggered wave (more
    denoiser calls than steps, each on the still-noisy window of frames) under a block-causal
    attention mask."""
    pipe = _skyreels("SkyReelsV2DiffusionForcingPipeline", inject_sample_info=True)
    return pipe, {**_text(), "prompt": None, "height": 32, "width": 32, "num_frames": 13, "base_num_frames": 13,
                  "ar_step": 1, "causal_block_size": 2, "guidance_scale": 6.0, "output_type": "latent"}


# --- Cosmos -------------------------------------------------------------------------------------


def _no_guardrail() -> Any:
    """A stand-in for the Cosmos guardrail (the pipelines refuse to run without one; the real one is
    a large model): passes text and frames through, as diffusers' own fast tests do."""
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_utils import ModelMixin

    class PassThroughGuardrail(ModelMixin, ConfigMixin):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("_device_tracker", torch.zeros(1), persistent=False)  # gives it a device

        def check_text_safety(self, prompt: str) -> bool:
            return True

        def check_video_safety(self, frames: Any) -> Any:
            return frames

    return PassThroughGuardrail()


def _cosmos_dit(in_channels: int, out_channels: int) -> Any:
    """The Cosmos DiT (adaLN-LoRA blocks, learnable extra position embedding). Without the padding-mask
    channel: diffusers resizes that mask with torchvision, which this environment lacks."""
    from diffusers import CosmosTransformer3DModel

    return seeded(CosmosTransformer3DModel, in_channels=in_channels, out_channels=out_channels, num_attention_heads=2,
                  attention_head_dim=16, num_layers=2, mlp_ratio=2, text_embed_dim=TEXT, adaln_lora_dim=4,
                  max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False,
                  extra_pos_embed_type="learnable")


def cosmos_text2world() -> tuple[Any, dict[str, Any]]:
    """Cosmos-1 text-to-world: EDM Euler sampling (``scale_model_input``, Karras sigmas) with the
    Cosmos tokenizer VAE (read for its compression ratios only)."""
    from diffusers import (
        AutoencoderKLCosmos,
        CosmosTextToWorldPipeline,
        EDMEulerScheduler,
    )

    vae = seeded(AutoencoderKLCosmos, in_channels=3, out_channels=3, latent_channels=4,
                 encoder_block_out_channels=(8, 8, 8, 8), decode_block_out_channels=(8, 8, 8, 8),
                 attention_resolutions=(8,), resolution=64, num_layers=2, patch_size=4, patch_type="haar",
                 scaling_factor=1.0, spatial_compression_ratio=4, temporal_compression_ratio=4)
    scheduler = EDMEulerScheduler(sigma_min=0.002, sigma_max=80, sigma_data=0.5, sigma_schedule="karras",
                                  num_train_timesteps=1000, prediction_type="epsilon", rho=7.0,
                                  final_sigmas_type="sigma_min")
    pipe = CosmosTextToWorldPipeline(text_encoder=None, tokenizer=None, transformer=_cosmos_dit(4, 4), vae=vae,
                                     scheduler=scheduler, safety_checker=_no_guardrail())
    return finish(pipe), {**_text(), "height": 16, "width": 16, "num_frames": 5, "guidance_scale": 3.0,
                          "output_type": "latent"}


def cosmos2_video2world() -> tuple[Any, dict[str, Any]]:
    """Cosmos-Predict2 video-to-world: a conditioning-frame indicator mixes the encoded picture into
    the latent and timestep per frame (timestep [B, 1, T, 1, 1]), EDM-style preconditioning."""
    from diffusers import Cosmos2VideoToWorldPipeline, FlowMatchEulerDiscreteScheduler

    pipe = Cosmos2VideoToWorldPipeline(text_encoder=None, tokenizer=None, transformer=_cosmos_dit(17, 16),
                                       vae=_wan_vae(), scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
                                       safety_checker=_no_guardrail())
    return finish(pipe), {**_text(), "image": _picture(32), "height": 32, "width": 32, "num_frames": 5,
                          "guidance_scale": 3.0, "output_type": "latent"}


# --- Kandinsky 5 --------------------------------------------------------------------------------


def kandinsky5_t2v() -> tuple[Any, dict[str, Any]]:
    """Kandinsky 5 T2V: channels-last video latents, a text-encoder stack inside the denoiser
    (text blocks, then visual blocks), explicit rope positions and varlen text (cu_seqlens)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        Kandinsky5T2VPipeline,
        Kandinsky5Transformer3DModel,
    )

    vae = seeded(AutoencoderKLHunyuanVideo, in_channels=3, out_channels=3, spatial_compression_ratio=8,
                 temporal_compression_ratio=4, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                 layers_per_block=1, norm_num_groups=4)
    transformer = seeded(Kandinsky5Transformer3DModel, in_visual_dim=4, in_text_dim=16, in_text_dim2=TEXT,
                         time_dim=32, out_visual_dim=4, patch_size=(1, 2, 2), model_dim=32, ff_dim=64,
                         num_text_blocks=1, num_visual_blocks=2, axes_dims=(8, 4, 4), visual_cond=False)
    pipe = Kandinsky5T2VPipeline(transformer=transformer, vae=vae, text_encoder=None, tokenizer=None,
                                 text_encoder_2=None, tokenizer_2=None,
                                 scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    lengths = torch.tensor([0, 8], dtype=torch.int32)
    return finish(pipe), {"prompt_embeds_qwen": embeds(1, 8, 16), "prompt_embeds_clip": embeds(1, TEXT, seed=1),
                          "prompt_cu_seqlens": lengths, "negative_prompt_embeds_qwen": embeds(1, 8, 16, seed=2),
                          "negative_prompt_embeds_clip": embeds(1, TEXT, seed=3),
                          "negative_prompt_cu_seqlens": lengths.clone(), "negative_prompt": None,
                          "height": 32, "width": 32, "num_frames": 5, "guidance_scale": 5.0, "output_type": "latent"}


CASES = (
    Case("wan22", "Wan", "WanPipeline", wan22, representative=True),
    Case("wan22-ti2v", "Wan", "WanImageToVideoPipeline", wan22_ti2v),
    Case("wan-i2v", "Wan", "WanImageToVideoPipeline", wan_i2v),
    Case("wan-vace", "Wan", "WanVACEPipeline", wan_vace, stride2=True),
    Case("wan-animate", "Wan", "WanAnimatePipeline", wan_animate),
    Case("skyreels-v2", "SkyReels-V2", "SkyReelsV2Pipeline", skyreels_v2),
    Case("skyreels-v2-df", "SkyReels-V2", "SkyReelsV2DiffusionForcingPipeline", skyreels_v2_df, representative=True),
    Case("skyreels-v2-df-async", "SkyReels-V2", "SkyReelsV2DiffusionForcingPipeline", skyreels_v2_df_async),
    Case("cosmos-text2world", "Cosmos", "CosmosTextToWorldPipeline", cosmos_text2world),
    Case("cosmos2-video2world", "Cosmos", "Cosmos2VideoToWorldPipeline", cosmos2_video2world),
    Case("kandinsky5-t2v", "Kandinsky5", "Kandinsky5T2VPipeline", kandinsky5_t2v),
)
