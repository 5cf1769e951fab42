"""Coverage cases: video diffusion transformers (CogVideoX, LTX-Video, LTX-2, HunyuanVideo, Mochi, ...).

Videos are 2-3 latent frames of 8x8 latents. VAEs are tiny instances of each family's own class
(the pipelines read their compression ratios); every call returns latents, so none decodes.
"""

from __future__ import annotations

from typing import Any

import torch

from asyncdiff.models.coverage import Case
from asyncdiff.models.coverage.parts import embeds, finish, seeded, tiny_vae


def _ones(*shape: int) -> torch.Tensor:
    return torch.ones(*shape, dtype=torch.long)


def _cogvideox_vae() -> Any:
    from diffusers import AutoencoderKLCogVideoX

    return seeded(AutoencoderKLCogVideoX, in_channels=3, out_channels=3,
                  down_block_types=("CogVideoXDownBlock3D",) * 2, up_block_types=("CogVideoXUpBlock3D",) * 2,
                  block_out_channels=(8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                  temporal_compression_ratio=4)


def cogvideox() -> tuple[Any, dict[str, Any]]:
    """CogVideoX 1.0 (2b): 3D sincos position embedding added to text+video tokens, CFG batch of 2."""
    from diffusers import (
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    transformer = seeded(CogVideoXTransformer3DModel, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                         out_channels=4, time_embed_dim=8, text_embed_dim=32, num_layers=2, sample_width=8,
                         sample_height=8, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
                         max_text_seq_length=8)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=_cogvideox_vae(), transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "height": 16, "width": 16, "num_frames": 5, "guidance_scale": 6.0,
                          "max_sequence_length": 8, "output_type": "latent"}


def cogvideox_i2v() -> tuple[Any, dict[str, Any]]:
    """CogVideoX 1.5 image-to-video: 3D RoPE from the pipeline, temporal patches, ofs embedding, image latents
    concatenated on channels, DPM scheduler that carries the previous x0 between steps."""
    from diffusers import (
        CogVideoXDPMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )

    transformer = seeded(CogVideoXTransformer3DModel, num_attention_heads=2, attention_head_dim=16, in_channels=8,
                         out_channels=4, time_embed_dim=8, ofs_embed_dim=8, text_embed_dim=32, num_layers=2,
                         sample_width=8, sample_height=8, sample_frames=5, patch_size=2, patch_size_t=2,
                         temporal_compression_ratio=4, max_text_seq_length=8,
                         use_rotary_positional_embeddings=True, patch_bias=False)
    pipe = CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=_cogvideox_vae(),
                                         transformer=transformer, scheduler=CogVideoXDPMScheduler())
    image = embeds(1, 3, 16, 16, seed=2).sigmoid()
    return finish(pipe), {"image": image, "prompt_embeds": embeds(1, 8, 32),
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=1), "height": 16, "width": 16,
                          "num_frames": 5, "guidance_scale": 6.0, "max_sequence_length": 8, "output_type": "latent"}


def ltx_video() -> tuple[Any, dict[str, Any]]:
    """LTX-Video: patch size 1, RoPE over (frame, y, x) scaled by the frame rate, packed latent tokens."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    transformer = seeded(LTXVideoTransformer3DModel, in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                         num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=2,
                         caption_channels=32)
    vae = seeded(AutoencoderKLLTXVideo, latent_channels=8, block_out_channels=(8, 8),
                 down_block_types=("LTXVideoDownBlock3D",) * 2, decoder_block_out_channels=(8, 8),
                 layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                 spatio_temporal_scaling=(True, True), decoder_spatio_temporal_scaling=(True, True),
                 decoder_inject_noise=(False, False, False), downsample_type=("conv", "conv"),
                 upsample_residual=(False, False), upsample_factor=(1, 1), patch_size=1, patch_size_t=1)
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                       transformer=transformer)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "prompt_attention_mask": _ones(1, 8),
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "negative_prompt_attention_mask": _ones(1, 8), "height": 32, "width": 32,
                          "num_frames": 5, "frame_rate": 25, "guidance_scale": 3.0, "max_sequence_length": 8,
                          "output_type": "latent"}


def ltx2() -> tuple[Any, dict[str, Any]]:
    """LTX-2: joint audio-video transformer (two token streams with cross-modal attention), text connectors
    between the (left out) Gemma encoder and the transformer, CFG in x0 space."""
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    transformer = seeded(LTX2VideoTransformer3DModel, in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                         num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
                         audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
                         audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
                         caption_channels=32, rope_double_precision=False, rope_type="split")
    connectors = seeded(LTX2TextConnectors, caption_channels=32, text_proj_in_factor=3,
                        video_connector_num_attention_heads=4, video_connector_attention_head_dim=8,
                        video_connector_num_layers=1, video_connector_num_learnable_registers=None,
                        audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=8,
                        audio_connector_num_layers=1, audio_connector_num_learnable_registers=None,
                        connector_rope_base_seq_len=32, rope_theta=10000.0, rope_double_precision=False,
                        causal_temporal_positioning=False, rope_type="split")
    vae = seeded(AutoencoderKLLTX2Video, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                 decoder_block_out_channels=(8, 8), layers_per_block=(1, 1), decoder_layers_per_block=(1, 1, 1),
                 spatio_temporal_scaling=(True, True), decoder_spatio_temporal_scaling=(True, True),
                 decoder_inject_noise=(False, False, False), downsample_type=("spatial", "spatial"),
                 upsample_residual=(False, False), upsample_factor=(1, 1), timestep_conditioning=False, patch_size=1,
                 patch_size_t=1)
    audio_vae = seeded(AutoencoderKLLTX2Audio, base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1,
                       attn_resolutions=None, in_channels=2, resolution=32, latent_channels=2, norm_type="pixel",
                       causality_axis="height", dropout=0.0, mid_block_add_attention=False, sample_rate=16000,
                       mel_hop_length=160, is_causal=True, mel_bins=8)
    pipe = LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=None,
                        tokenizer=None, connectors=connectors, transformer=transformer, vocoder=None)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 96), "prompt_attention_mask": _ones(1, 8),
                          "negative_prompt_embeds": embeds(1, 8, 96, seed=1),
                          "negative_prompt_attention_mask": _ones(1, 8), "height": 32, "width": 32,
                          "num_frames": 5, "frame_rate": 25.0, "guidance_scale": 3.0, "stg_scale": 0.0,
                          "modality_scale": 1.0, "guidance_rescale": 0.0, "audio_guidance_scale": 3.0,
                          "audio_stg_scale": 0.0, "audio_modality_scale": 1.0, "audio_guidance_rescale": 0.0,
                          "spatio_temporal_guidance_blocks": None, "use_cross_timestep": False,
                          "max_sequence_length": 8, "output_type": "latent"}


def _hunyuan_vae() -> Any:
    """Three levels: spatial and temporal compression 4, as the config says."""
    from diffusers import AutoencoderKLHunyuanVideo

    return seeded(AutoencoderKLHunyuanVideo, in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
                  block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=4,
                  temporal_compression_ratio=4)


def hunyuan_video() -> tuple[Any, dict[str, Any]]:
    """HunyuanVideo: token refiner on the text, dual-stream then single-stream blocks (Flux-like), 3D RoPE,
    embedded guidance, masked text tokens."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    transformer = seeded(HunyuanVideoTransformer3DModel, in_channels=4, out_channels=4, num_attention_heads=2,
                         attention_head_dim=10, num_layers=2, num_single_layers=2, num_refiner_layers=1,
                         patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                         pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=_hunyuan_vae(),
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    mask = _ones(1, 8)
    mask[:, 6:] = 0
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 16), "pooled_prompt_embeds": embeds(1, 8, seed=1),
                          "prompt_attention_mask": mask, "height": 32, "width": 32, "num_frames": 5,
                          "guidance_scale": 6.0, "output_type": "latent"}


def hunyuan_video_framepack() -> tuple[Any, dict[str, Any]]:
    """HunyuanVideo Framepack: SigLIP image tokens, clean/2x/4x history latents packed with their own patch
    embedders and RoPE; one section of 2 latent frames."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoFramepackPipeline,
        HunyuanVideoFramepackTransformer3DModel,
    )
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    transformer = seeded(HunyuanVideoFramepackTransformer3DModel, in_channels=4, out_channels=4,
                         num_attention_heads=2, attention_head_dim=10, num_layers=2, num_single_layers=2,
                         num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                         pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), has_image_proj=True, image_proj_dim=32,
                         has_clean_x_embedder=True)
    image_encoder = seeded(SiglipVisionModel, SiglipVisionConfig(hidden_size=32, intermediate_size=37,
                                                                 num_hidden_layers=1, num_attention_heads=2,
                                                                 image_size=16, patch_size=4))
    feature_extractor = SiglipImageProcessor(size={"height": 16, "width": 16})
    pipe = HunyuanVideoFramepackPipeline(text_encoder=None, tokenizer=None, transformer=transformer,
                                         vae=_hunyuan_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                         text_encoder_2=None, tokenizer_2=None, image_encoder=image_encoder,
                                         feature_extractor=feature_extractor)
    return finish(pipe), {"image": embeds(1, 3, 32, 32, seed=2).sigmoid(),
                          "prompt_embeds": embeds(1, 8, 16), "pooled_prompt_embeds": embeds(1, 8, seed=1),
                          "prompt_attention_mask": _ones(1, 8), "height": 32, "width": 32, "num_frames": 5,
                          "latent_window_size": 2, "guidance_scale": 6.0, "output_type": "latent"}


def hunyuan_video15() -> tuple[Any, dict[str, Any]]:
    """HunyuanVideo 1.5: two text streams (MLLM + ByT5) and zero image tokens, condition latents and mask
    concatenated on channels, CFG through a guider (one transformer call per branch)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance

    transformer = seeded(HunyuanVideo15Transformer3DModel, in_channels=9, out_channels=4, num_attention_heads=2,
                         attention_head_dim=8, num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
                         patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32, image_embed_dim=12,
                         rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")
    vae = seeded(AutoencoderKLHunyuanVideo15, in_channels=3, out_channels=3, latent_channels=4,
                 block_out_channels=(16, 16), layers_per_block=1, spatial_compression_ratio=4,
                 temporal_compression_ratio=2, downsample_match_channel=False, upsample_match_channel=False)
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                  tokenizer_2=None, guider=ClassifierFreeGuidance(guidance_scale=6.0))
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 16), "prompt_embeds_mask": _ones(1, 8),
                          "negative_prompt_embeds": embeds(1, 8, 16, seed=1),
                          "negative_prompt_embeds_mask": _ones(1, 8),
                          "prompt_embeds_2": embeds(1, 6, 32, seed=2), "prompt_embeds_mask_2": _ones(1, 6),
                          "negative_prompt_embeds_2": embeds(1, 6, 32, seed=3),
                          "negative_prompt_embeds_mask_2": _ones(1, 6), "height": 32, "width": 32, "num_frames": 3,
                          "output_type": "latent"}


def mochi() -> tuple[Any, dict[str, Any]]:
    """Mochi: asymmetric dual-stream (text and video widths differ), learned-frequency RoPE, text mask."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        MochiPipeline,
        MochiTransformer3DModel,
    )

    transformer = seeded(MochiTransformer3DModel, patch_size=2, num_attention_heads=2, attention_head_dim=8,
                         num_layers=2, pooled_projection_dim=16, in_channels=12, out_channels=None,
                         qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4, activation_fn="swiglu",
                         max_sequence_length=8)
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=transformer)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "prompt_attention_mask": _ones(1, 8),
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "negative_prompt_attention_mask": _ones(1, 8), "height": 64, "width": 64, "num_frames": 7,
                          "guidance_scale": 4.5, "max_sequence_length": 8, "output_type": "latent"}


def latte() -> tuple[Any, dict[str, Any]]:
    """Latte: alternating spatial (per frame) and temporal (per position) transformer blocks."""
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    transformer = seeded(LatteTransformer3DModel, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                         out_channels=8, num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                         activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                         norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=32, video_length=2)
    pipe = LattePipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                         scheduler=DDIMScheduler())
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "negative_prompt": None,
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=1), "video_length": 2, "height": 16,
                          "width": 16, "guidance_scale": 7.5, "clean_caption": False, "output_type": "latent"}


def allegro() -> tuple[Any, dict[str, Any]]:
    """Allegro: PixArt-style adaLN-single blocks over 3D patches with 3D RoPE from position ids."""
    from diffusers import (
        AllegroPipeline,
        AllegroTransformer3DModel,
        AutoencoderKLAllegro,
        EulerAncestralDiscreteScheduler,
    )

    transformer = seeded(AllegroTransformer3DModel, patch_size=2, patch_size_t=1, num_attention_heads=2,
                         attention_head_dim=12, in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=24,
                         sample_height=8, sample_width=8, sample_frames=2, caption_channels=32)
    vae = seeded(AutoencoderKLAllegro, down_block_types=("AllegroDownBlock3D",) * 2,
                 up_block_types=("AllegroUpBlock3D",) * 2, block_out_channels=(8, 8),
                 temporal_downsample_blocks=(True, False), temporal_upsample_blocks=(False, True), latent_channels=4,
                 layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=2, sample_size=16)
    pipe = AllegroPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                           scheduler=EulerAncestralDiscreteScheduler())
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "prompt_attention_mask": _ones(1, 8),
                          "negative_prompt": None, "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "negative_prompt_attention_mask": _ones(1, 8), "num_frames": 4, "height": 16, "width": 16,
                          "guidance_scale": 7.5, "clean_caption": False, "max_sequence_length": 8,
                          "output_type": "latent"}


CASES = (
    Case("cogvideox", "CogVideoX", "CogVideoXPipeline", cogvideox, representative=True),
    Case("cogvideox-i2v", "CogVideoX", "CogVideoXImageToVideoPipeline", cogvideox_i2v),
    Case("ltx-video", "LTX-Video", "LTXPipeline", ltx_video),
    Case("ltx2", "LTX-2", "LTX2Pipeline", ltx2),
    Case("hunyuan-video", "HunyuanVideo", "HunyuanVideoPipeline", hunyuan_video, representative=True, stride2=True),
    Case("hunyuan-video15", "HunyuanVideo 1.5", "HunyuanVideo15Pipeline", hunyuan_video15),
    Case("hunyuan-video-framepack", "HunyuanVideo Framepack", "HunyuanVideoFramepackPipeline",
         hunyuan_video_framepack),
    Case("mochi", "Mochi", "MochiPipeline", mochi),
    Case("latte", "Latte", "LattePipeline", latte),
    Case("allegro", "Allegro", "AllegroPipeline", allegro),
)
