"""A third trained digits model, of a third kind: a flow-matching MMDiT shaped like SD3 and Flux.

The shipped UNet (:mod:`asyncdiff.models.digits`) and DiT (:mod:`asyncdiff.models.digits_dit`)
are DDPM models with epsilon prediction. Production models now are flow-matching transformers
(SD3, Flux, Wan) sampled in few steps, where one stale step weighs more; this one measures that.

- Data: the same 16x16 digits (:func:`asyncdiff.models.digits.load_digits16`), with their labels.
- Model: an ``SD3Transformer2DModel`` in pixel space (1 channel, patch size 2: 64 image tokens of
  width 96, 6 joint-attention blocks), conditioned on the digit as SD3 is on its text: the
  "text" is one token, the one-hot code of the class (11 wide: 10 digits and :data:`NULL_CLASS`,
  "no class"), given both as ``encoder_hidden_states`` (the joint stream) and as
  ``pooled_projections`` (the adaptive norms), so the model learns its own class embedding.
- Training (``scripts/train_digits.py --model flow``, which wrote ``assets/digits_flow.safetensors``
  and ``assets/digits_flow.json``): rectified flow as in SD3, ``x_s = (1 - s) x_0 + s noise``, the
  model predicts the velocity ``noise - x_0`` at timestep ``1000 s``, ``s`` drawn logit-normal;
  10 % of the labels dropped to the null class (classifier-free guidance).
- Sampling: :class:`DigitsFlowPipeline`, Euler steps of ``FlowMatchEulerDiscreteScheduler``
  (shift 1: these images have 64 tokens, far below where SD3 shifts); the batch asks for the
  digits 0, 1, ..., 9, 0, 1, ... unless ``class_labels`` says otherwise; ``guidance_scale > 1``
  adds classifier-free guidance as a batch of two.

Sizes follow Note [one trained size] in :mod:`asyncdiff.models.digits`.

Example:
    >>> import torch
    >>> pipe = build_digits_flow("trained")
    >>> out = pipe(batch_size=4, num_inference_steps=8, output_type="pt",
    ...            generator=torch.Generator().manual_seed(0))
    >>> tuple(out.images.shape)
    (4, 1, 16, 16)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from asyncdiff.models.digits import ASSETS, BATCH_SIZE, RESOLUTION, SIZES, check_output_type, class_batch, images_out

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

__all__ = [
    "CLASSES",
    "FLOW_CONFIG",
    "FLOW_SCHEDULE",
    "NULL_CLASS",
    "DigitsFlowPipeline",
    "build_digits_flow",
    "class_code",
    "digits_flow",
    "digits_flow_inputs",
]

FLOW_WEIGHTS = ASSETS / "digits_flow.safetensors"
FLOW_CONFIG_FILE = ASSETS / "digits_flow.json"
CLASSES = 10
NULL_CLASS = CLASSES  # the code's last entry: "no class" (classifier-free guidance)
CODE_WIDTH = CLASSES + 1

FLOW_CONFIG: dict[str, Any] = {
    "sample_size": RESOLUTION,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 24,
    "joint_attention_dim": CODE_WIDTH,
    "caption_projection_dim": 96,  # the joint stream's width: the image tokens' (heads x head width)
    "pooled_projection_dim": CODE_WIDTH,
    "pos_embed_max_size": RESOLUTION // 2,  # patches a side
}
# The training and sampling schedule (timesteps are 1000 x the noise level s).
FLOW_SCHEDULE: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}


def class_code(labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(N, 1, CODE_WIDTH)``: one token per sample, the one-hot code of its class (``NULL_CLASS`` for none)."""
    return torch.nn.functional.one_hot(labels.long(), CODE_WIDTH).to(dtype).unsqueeze(1)


def digits_flow(config: dict[str, Any] | None = None) -> SD3Transformer2DModel:
    """The digits ``SD3Transformer2DModel``: from ``config``, else from the shipped config, else
    from :data:`FLOW_CONFIG` (random weights)."""
    from diffusers import SD3Transformer2DModel

    if config is None:
        config = json.loads(FLOW_CONFIG_FILE.read_text()) if FLOW_CONFIG_FILE.is_file() else FLOW_CONFIG
    return SD3Transformer2DModel.from_config(config)


class DigitsFlowPipeline(DiffusionPipeline):
    """Class-conditional flow-matching sampling (Euler) of a pixel-space MMDiT; images in ``[0, 1]``."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: SD3Transformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor | None = None,
        batch_size: int = BATCH_SIZE,
        num_inference_steps: int = 8,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple[Any]:
        """``class_labels`` (digits 0-9) give the batch; without them, ``batch_size`` digits
        ``0, 1, ..., 9, 0, ...``. ``output_type``: ``"pt"`` (``(N, 1, H, W)``), ``"np"``
        (``(N, H, W, 1)``) or ``"pil"``."""
        labels = class_batch(class_labels, batch_size, CLASSES)
        check_output_type(output_type)
        device, dtype = self._execution_device, self.transformer.dtype
        size = self.transformer.config.sample_size
        channels = self.transformer.config.in_channels
        image = randn_tensor((len(labels), channels, size, size), generator=generator, device=device, dtype=dtype)
        guided = guidance_scale > 1.0
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
        code = class_code(labels, dtype).to(device)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([image, image]) if guided else image
            timestep = t.expand(len(model_input))
            velocity = self.transformer(model_input, encoder_hidden_states=code, pooled_projections=code[:, 0],
                                        timestep=timestep).sample
            if guided:
                conditional, unconditional = velocity.chunk(2)
                velocity = unconditional + guidance_scale * (conditional - unconditional)
            image = self.scheduler.step(velocity, t, image).prev_sample

        return images_out(self, image, output_type, return_dict)


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not a size of the digits flow model; use 'trained' "
                         f"(the generic names {list(SIZES[1:])} give the same model)")


def build_digits_flow(size: str = "trained", seed: int = 0, dtype: torch.dtype = torch.float32) -> DigitsFlowPipeline:
    """A :class:`DigitsFlowPipeline` with the shipped trained weights; ``seed`` changes nothing
    (as in :func:`asyncdiff.models.digits.build_digits`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import load_file

    from asyncdiff.models.common import finish

    _check_size(size)
    if not FLOW_WEIGHTS.is_file():
        raise FileNotFoundError(f"{FLOW_WEIGHTS} is missing; run `python scripts/train_digits.py --model flow` "
                                "to write it")
    transformer = digits_flow()
    transformer.load_state_dict(load_file(str(FLOW_WEIGHTS)))
    scheduler = FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULE)
    return finish(DigitsFlowPipeline(transformer=transformer, scheduler=scheduler), dtype)


def digits_flow_inputs(size: str = "trained", seed: int = 0) -> dict[str, Any]:
    """Call kwargs for an example run: :data:`~asyncdiff.models.digits.BATCH_SIZE` digits, 0-9 in turn."""
    _check_size(size)
    return {"batch_size": BATCH_SIZE}
