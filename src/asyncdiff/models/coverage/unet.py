"""Coverage cases: UNet pipelines beyond the built-in systems (Kandinsky, Stable Cascade, T2I-Adapter,
ControlNet, Marigold, Shap-E, DeepFloyd IF).

Priors (Kandinsky, Shap-E) denoise an embedding with a ``PriorTransformer`` held as ``prior``;
Stable Cascade holds its UNets as ``prior`` / ``decoder``. Pipelines that cannot take precomputed
prompt embeddings get a tiny CLIP text encoder on the package's offline tokenizer.
"""

from __future__ import annotations

from typing import Any

import torch

from asyncdiff.models.coverage import Case
from asyncdiff.models.coverage.parts import embeds, finish, seeded, tiny_vae

SD_TEXT = 32  # cross-attention width of the tiny SD 1.5 UNet (asyncdiff.models.sd SIZES["tiny"])


# --- shared tiny parts ---------------------------------------------------------------------------


def _tokenizer() -> Any:
    from asyncdiff.models.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


def _clip_text(tokenizer: Any, width: int = 32, projection_dim: int | None = None, seed: int = 1) -> Any:
    from asyncdiff.models.common import clip_text_encoder

    return seeded(clip_text_encoder, tokenizer, width, 2, full=False, projection_dim=projection_dim, seed=seed)


def _movq() -> Any:
    """Kandinsky's MoVQ at toy width (2 levels: scale factor 2)."""
    from diffusers import VQModel

    return seeded(VQModel, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                  up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), in_channels=3, out_channels=3,
                  latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                  num_vq_embeddings=12, vq_embed_dim=4, seed=2)


def _kandinsky_unet(addition_embed_type: str, encoder_hid_dim_type: str) -> Any:
    """Kandinsky 2.x decoder UNet: simple cross-attention blocks, learned variance (8 output channels)."""
    from diffusers import UNet2DConditionModel

    return seeded(UNet2DConditionModel, in_channels=4, out_channels=8, addition_embed_type=addition_embed_type,
                  down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                  up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                  mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
                  encoder_hid_dim=32, encoder_hid_dim_type=encoder_hid_dim_type, cross_attention_dim=32,
                  attention_head_dim=4, resnet_time_scale_shift="scale_shift", class_embed_type=None)


def _kandinsky_prior_parts() -> dict[str, Any]:
    """A ``PriorTransformer`` over 77 CLIP tokens, its text encoder and the unCLIP scheduler."""
    from diffusers import PriorTransformer, UnCLIPScheduler

    tokenizer = _tokenizer()
    prior = seeded(PriorTransformer, num_attention_heads=2, attention_head_dim=16, embedding_dim=32, num_layers=2)
    # clip_std starts at zero, which makes post_process_latents return a constant: use 1
    prior.clip_std = torch.nn.Parameter(torch.ones_like(prior.clip_std))
    scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                                clip_sample=True, clip_sample_range=10.0)
    return {"prior": prior, "text_encoder": _clip_text(tokenizer, projection_dim=32), "tokenizer": tokenizer,
            "scheduler": scheduler, "image_encoder": None, "image_processor": None}


def _sd_unet(**config: Any) -> Any:
    from asyncdiff.models.sd import SIZES, sd15_unet

    return seeded(sd15_unet, SIZES["tiny"], **config)


def _sd_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _sd_prompt() -> dict[str, Any]:
    return {"prompt_embeds": embeds(1, 77, SD_TEXT), "negative_prompt_embeds": embeds(1, 77, SD_TEXT, seed=1)}


def _picture(seed: int = 0) -> torch.Tensor:
    """A seeded 64x64 picture tensor in [0, 1] (adapter / control input)."""
    return embeds(1, 3, 64, 64, seed=seed).sigmoid()


# --- Kandinsky 2.1 -------------------------------------------------------------------------------


def kandinsky21() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDIMScheduler, KandinskyPipeline
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

    tokenizer = _tokenizer()
    # Note: XLM-R position ids start after pad_token_id, so a small pad id keeps the table small
    config = MCLIPConfig(transformerDimSize=32, imageDimSize=32, hidden_size=32, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), pad_token_id=1,
                         max_position_embeddings=128)
    text_encoder = seeded(MultilingualCLIP, config, seed=1)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                              thresholding=False)
    pipe = KandinskyPipeline(text_encoder=text_encoder, tokenizer=tokenizer,
                             unet=_kandinsky_unet("text_image", "text_image_proj"), scheduler=scheduler, movq=_movq())
    # movq scale 2: a 16x16 picture is an 8x8 latent; the pipeline always decodes (no latent output)
    return finish(pipe), {"prompt": "a photo of a cat", "image_embeds": embeds(1, 32),
                          "negative_image_embeds": embeds(1, 32, seed=1), "height": 16, "width": 16,
                          "guidance_scale": 4.0, "output_type": "pt"}


def kandinsky21_prior() -> tuple[Any, dict[str, Any]]:
    from diffusers import KandinskyPriorPipeline

    pipe = KandinskyPriorPipeline(**_kandinsky_prior_parts())
    # a negative prompt makes the pipeline embed it instead of running the image encoder on a blank picture
    return finish(pipe), {"prompt": "a photo of a cat", "negative_prompt": "", "guidance_scale": 4.0,
                          "output_type": "pt", "return_dict": False}


# --- Kandinsky 2.2 -------------------------------------------------------------------------------


def kandinsky22() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDIMScheduler, KandinskyV22Pipeline

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                              thresholding=False)
    pipe = KandinskyV22Pipeline(unet=_kandinsky_unet("image", "image_proj"), scheduler=scheduler, movq=_movq())
    return finish(pipe), {"image_embeds": embeds(1, 32), "negative_image_embeds": embeds(1, 32, seed=1),
                          "height": 16, "width": 16, "guidance_scale": 4.0, "output_type": "latent"}


def kandinsky22_prior() -> tuple[Any, dict[str, Any]]:
    from diffusers import KandinskyV22PriorPipeline

    pipe = KandinskyV22PriorPipeline(**_kandinsky_prior_parts())
    return finish(pipe), {"prompt": "a photo of a cat", "negative_prompt": "", "guidance_scale": 4.0,
                          "output_type": "pt", "return_dict": False}


def kandinsky22_combined() -> tuple[Any, dict[str, Any]]:
    """Prior and decoder in one call (Note [several denoisers]): the prior's loop (``prior_prior``,
    stepped by ``prior_scheduler``), then the decoder's (``unet``, stepped by ``scheduler``)."""
    from diffusers import KandinskyV22CombinedPipeline

    decoder, _ = kandinsky22()
    prior = _kandinsky_prior_parts()
    pipe = KandinskyV22CombinedPipeline(
        unet=decoder.unet, scheduler=decoder.scheduler, movq=decoder.movq, prior_prior=prior["prior"],
        prior_image_encoder=None, prior_text_encoder=prior["text_encoder"], prior_tokenizer=prior["tokenizer"],
        prior_scheduler=prior["scheduler"], prior_image_processor=None)
    return finish(pipe), {"prompt": "a photo of a cat", "negative_prompt": "", "prior_guidance_scale": 4.0,
                          "prior_num_inference_steps": 3, "guidance_scale": 4.0, "height": 16, "width": 16,
                          "output_type": "latent"}


# --- Kandinsky 3 ---------------------------------------------------------------------------------


def kandinsky3() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDPMScheduler, Kandinsky3Pipeline, Kandinsky3UNet

    unet = seeded(Kandinsky3UNet, in_channels=4, time_embedding_dim=32, groups=8, attention_head_dim=8,
                  layers_per_block=2, block_out_channels=(16, 32), cross_attention_dim=16, encoder_hid_dim=32)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="squaredcos_cap_v2",
                              clip_sample=True, thresholding=False)
    pipe = Kandinsky3Pipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=scheduler, movq=_movq())
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[:, 6:] = 0
    # the pipeline's latent grid is height // 64 * 8: 64 pixels are an 8x8 latent
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "attention_mask": mask,
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=1), "negative_attention_mask": mask.clone(),
                          "height": 64, "width": 64, "guidance_scale": 3.0, "output_type": "latent"}


# --- Stable Cascade ------------------------------------------------------------------------------


def stable_cascade_prior() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDPMWuerstchenScheduler, StableCascadePriorPipeline, StableCascadeUNet

    prior = seeded(StableCascadeUNet, in_channels=16, out_channels=16, conditioning_dim=32,
                   block_out_channels=(32, 32), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1),
                   up_num_layers_per_block=(1, 1), switch_level=(False,), clip_image_in_channels=16,
                   clip_text_in_channels=32, clip_text_pooled_in_channels=32, dropout=(0.1, 0.1))
    tokenizer = _tokenizer()
    # the pipeline casts the given embeddings to text_encoder.dtype, so a (tiny) encoder must be there
    pipe = StableCascadePriorPipeline(tokenizer=tokenizer, text_encoder=_clip_text(tokenizer, projection_dim=32),
                                      prior=prior, scheduler=DDPMWuerstchenScheduler(), resolution_multiple=4.0)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "prompt_embeds_pooled": embeds(1, 1, 32, seed=1),
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=2),
                          "negative_prompt_embeds_pooled": embeds(1, 1, 32, seed=3),
                          "height": 32, "width": 32, "guidance_scale": 4.0, "output_type": "pt",
                          "return_dict": False}


def stable_cascade_decoder() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadeUNet

    attn = ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")
    decoder = seeded(StableCascadeUNet, in_channels=4, out_channels=4, conditioning_dim=32,
                     block_out_channels=(16, 32), num_attention_heads=(-1, 2), down_num_layers_per_block=(1, 1),
                     up_num_layers_per_block=(1, 1), down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(2, 2),
                     block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock"), attn),
                     clip_text_pooled_in_channels=32, effnet_in_channels=16, pixel_mapper_in_channels=3,
                     self_attn=True, switch_level=None, dropout=(0.1, 0.1))
    pipe = StableCascadeDecoderPipeline(decoder=decoder, tokenizer=None, text_encoder=None,
                                        scheduler=DDPMWuerstchenScheduler(), vqgan=None, latent_dim_scale=4.0)
    # image_embeddings: the prior's 16-channel output (2x2 here), scaled by 4 to an 8x8 latent
    return finish(pipe), {"image_embeddings": embeds(1, 16, 2, 2), "prompt_embeds": embeds(1, 8, 32),
                          "prompt_embeds_pooled": embeds(1, 1, 32, seed=1),
                          "negative_prompt_embeds": embeds(1, 8, 32, seed=2),
                          "negative_prompt_embeds_pooled": embeds(1, 1, 32, seed=3),
                          "guidance_scale": 2.0, "output_type": "latent"}


# --- T2I-Adapter ---------------------------------------------------------------------------------


def _t2i_adapter(channels: tuple[int, ...], seed: int, **config: Any) -> Any:
    from diffusers import T2IAdapter

    return seeded(T2IAdapter, in_channels=3, channels=list(channels), num_res_blocks=1, seed=seed, **config)


def t2i_adapter() -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusionAdapterPipeline

    # one feature map per UNet down block (32, 32, 64, 64 channels at 8, 4, 2, 1 pixels of the 8x8 latent)
    adapter = _t2i_adapter((32, 32, 64, 64), seed=3, downscale_factor=8, adapter_type="full_adapter")
    pipe = StableDiffusionAdapterPipeline(vae=tiny_vae(levels=4), text_encoder=None, tokenizer=None, unet=_sd_unet(),
                                          adapter=adapter, scheduler=_sd_scheduler(), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    return finish(pipe), {**_sd_prompt(), "image": _picture(), "height": 64, "width": 64, "guidance_scale": 5.0,
                          "output_type": "latent"}


def t2i_multi_adapter() -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusionAdapterPipeline

    adapters = [_t2i_adapter((32, 32, 64, 64), seed=3 + i, downscale_factor=8, adapter_type="full_adapter")
                for i in range(2)]
    # a list of adapters becomes a MultiAdapter; the pictures go in as a list, one per adapter
    pipe = StableDiffusionAdapterPipeline(vae=tiny_vae(levels=4), text_encoder=None, tokenizer=None, unet=_sd_unet(),
                                          adapter=adapters, scheduler=_sd_scheduler(), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    return finish(pipe), {**_sd_prompt(), "image": [_picture(0), _picture(1)], "height": 64, "width": 64,
                          "adapter_conditioning_scale": [0.7, 0.4], "guidance_scale": 5.0, "output_type": "latent"}


def t2i_adapter_sdxl() -> tuple[Any, dict[str, Any]]:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLAdapterPipeline

    from asyncdiff.models.sdxl import SIZES, sdxl_unet

    spec = SIZES["tiny"]
    unet = seeded(sdxl_unet, spec)
    # the XL adapter: 16x unshuffle, features (32 @ 4x4, 64 @ 4x4, 64 @ 2x2, 64 @ 2x2) for the 8x8 latent
    adapter = _t2i_adapter((32, 64, 64, 64), seed=3, downscale_factor=16, adapter_type="full_adapter_xl")
    pipe = StableDiffusionXLAdapterPipeline(vae=tiny_vae(levels=4), text_encoder=None, text_encoder_2=None,
                                            tokenizer=None, tokenizer_2=None, unet=unet, adapter=adapter,
                                            scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=True)
    width, width_2 = spec.text_widths
    return finish(pipe), {"prompt_embeds": embeds(1, 77, width + width_2),
                          "pooled_prompt_embeds": embeds(1, width_2, seed=1),
                          "negative_prompt_embeds": embeds(1, 77, width + width_2, seed=2),
                          "negative_pooled_prompt_embeds": embeds(1, width_2, seed=3),
                          "image": _picture(), "height": 64, "width": 64, "guidance_scale": 5.0,
                          "adapter_conditioning_factor": 0.5, "output_type": "latent"}


# --- ControlNet (SD 1.5) -------------------------------------------------------------------------


def _sd_controlnet(unet: Any) -> Any:
    from diffusers import ControlNetModel

    torch.manual_seed(5)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16),
                                           load_weights_from_unet=False)
    # Note: fresh ControlNets have zero output convolutions (zero residuals): random ones make the
    # control path observable
    for conv in (controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                 controlnet.controlnet_mid_block):
        conv.reset_parameters()
    return controlnet


def controlnet_sd15() -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusionControlNetPipeline

    unet = _sd_unet()
    pipe = StableDiffusionControlNetPipeline(vae=tiny_vae(levels=4), text_encoder=None, tokenizer=None, unet=unet,
                                             controlnet=_sd_controlnet(unet), scheduler=_sd_scheduler(),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    return finish(pipe), {**_sd_prompt(), "image": _picture(), "height": 64, "width": 64, "guidance_scale": 5.0,
                          "controlnet_conditioning_scale": 0.8, "output_type": "latent"}


def controlnet_sd15_img2img() -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from asyncdiff.models.pictures import edge_map, example_picture

    unet = _sd_unet()
    pipe = StableDiffusionControlNetImg2ImgPipeline(vae=tiny_vae(levels=4), text_encoder=None, tokenizer=None,
                                                    unet=unet, controlnet=_sd_controlnet(unet),
                                                    scheduler=_sd_scheduler(), safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
    picture = example_picture(64, 64, seed=0)
    # strength 1.0: every requested step runs (a lower one would skip the first of 2 steps)
    return finish(pipe), {**_sd_prompt(), "image": picture, "control_image": edge_map(picture), "height": 64,
                          "width": 64, "strength": 1.0, "guidance_scale": 5.0, "control_guidance_end": 0.5,
                          "output_type": "latent"}


# --- Marigold ------------------------------------------------------------------------------------


def marigold_depth() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDIMScheduler, MarigoldDepthPipeline

    tokenizer = _tokenizer()
    # image latent and prediction latent are stacked on channels: 8 in, 4 out
    unet = _sd_unet(in_channels=8, sample_size=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                              timestep_spacing="trailing")
    pipe = MarigoldDepthPipeline(unet=unet, vae=tiny_vae(levels=4), scheduler=scheduler,
                                 text_encoder=_clip_text(tokenizer), tokenizer=tokenizer, prediction_type="depth",
                                 scale_invariant=True, shift_invariant=True, default_denoising_steps=2,
                                 default_processing_resolution=64)
    return finish(pipe), {"image": _picture(), "processing_resolution": 64, "output_type": "pt",
                          "return_dict": False}


# --- Shap-E --------------------------------------------------------------------------------------


def shap_e() -> tuple[Any, dict[str, Any]]:
    from diffusers import HeunDiscreteScheduler, PriorTransformer, ShapEPipeline

    tokenizer = _tokenizer()
    prior = seeded(PriorTransformer, num_attention_heads=2, attention_head_dim=16, embedding_dim=32,
                   num_embeddings=32, embedding_proj_dim=32, time_embed_dim=128, num_layers=2, clip_embed_dim=64,
                   additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer",
                   encoder_hid_proj_type=None, added_emb_type=None)
    scheduler = HeunDiscreteScheduler(beta_schedule="exp", num_train_timesteps=1024, prediction_type="sample",
                                      use_karras_sigmas=True, clip_sample=True, clip_sample_range=1.0)
    pipe = ShapEPipeline(prior=prior, text_encoder=_clip_text(tokenizer, projection_dim=32), tokenizer=tokenizer,
                         scheduler=scheduler, shap_e_renderer=None)
    return finish(pipe), {"prompt": "a shark", "guidance_scale": 4.0, "output_type": "latent"}


# --- DeepFloyd IF --------------------------------------------------------------------------------


def deepfloyd_if() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    # pixel-space UNet (3 channels in, 6 out: learned variance), text-conditioned added-KV attention
    unet = seeded(UNet2DConditionModel, sample_size=16, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                  mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                  up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), in_channels=3,
                  out_channels=6, cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8,
                  addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
                  resnet_time_scale_shift="scale_shift", act_fn="gelu")
    unet.set_attn_processor(AttnAddedKVProcessor())
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                              beta_end=0.02, thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0,
                              prediction_type="epsilon", variance_type="learned_range")
    pipe = IFPipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=scheduler, safety_checker=None,
                      feature_extractor=None, watermarker=None, requires_safety_checker=False)
    return finish(pipe), {"prompt_embeds": embeds(1, 8, 32), "negative_prompt_embeds": embeds(1, 8, 32, seed=1),
                          "height": 16, "width": 16, "guidance_scale": 7.0, "clean_caption": False,
                          "output_type": "pt"}


CASES = (
    Case("kandinsky21", "Kandinsky 2.1", "KandinskyPipeline", kandinsky21),
    Case("kandinsky21-prior", "Kandinsky 2.1", "KandinskyPriorPipeline", kandinsky21_prior),
    Case("kandinsky22", "Kandinsky 2.2", "KandinskyV22Pipeline", kandinsky22, representative=True),
    Case("kandinsky22-prior", "Kandinsky 2.2", "KandinskyV22PriorPipeline", kandinsky22_prior, representative=True),
    Case("kandinsky22-combined", "Kandinsky 2.2", "KandinskyV22CombinedPipeline", kandinsky22_combined,
         representative=True),
    Case("kandinsky3", "Kandinsky 3", "Kandinsky3Pipeline", kandinsky3),
    Case("stable-cascade-prior", "Stable Cascade", "StableCascadePriorPipeline", stable_cascade_prior),
    Case("stable-cascade-decoder", "Stable Cascade", "StableCascadeDecoderPipeline", stable_cascade_decoder,
         representative=True),
    Case("t2i-adapter", "T2I-Adapter", "StableDiffusionAdapterPipeline", t2i_adapter, representative=True,
         stride2=True),
    Case("t2i-adapter-sdxl", "T2I-Adapter", "StableDiffusionXLAdapterPipeline", t2i_adapter_sdxl),
    Case("t2i-multi-adapter", "T2I-Adapter", "StableDiffusionAdapterPipeline", t2i_multi_adapter),
    Case("controlnet-sd15", "ControlNet", "StableDiffusionControlNetPipeline", controlnet_sd15),
    Case("controlnet-sd15-img2img", "ControlNet", "StableDiffusionControlNetImg2ImgPipeline",
         controlnet_sd15_img2img),
    Case("marigold-depth", "Marigold", "MarigoldDepthPipeline", marigold_depth),
    Case("shap-e", "Shap-E", "ShapEPipeline", shap_e),
    Case("deepfloyd-if", "DeepFloyd IF", "IFPipeline", deepfloyd_if),
)
