"""A second trained digits model, of another architecture: a small class-conditional DiT.

The shipped digits UNet (:mod:`asyncdiff.models.digits`) has U skips: a stage cut anywhere but
at the middle leaves long skip connections crossing stages. A DiT is the other shape: a chain
of identical transformer blocks, so every cut is a cut of one path. Measuring the cost of stale
inputs on both says whether a plan rule holds beyond one model (issue 10).

- Data: the same 16x16 digits (:func:`asyncdiff.models.digits.load_digits16`), with their labels.
- Model: a ``DiTTransformer2DModel`` in pixel space (1 channel, patch size 2: 64 tokens of
  width 96, 6 blocks), class-conditional on the digit (10 classes; the model's label dropout
  during training also teaches it an unconditional class, :data:`NULL_CLASS`), trained as a
  DDPM with epsilon prediction under the UNet's :data:`~asyncdiff.models.digits.SCHEDULE` by
  ``scripts/train_digits.py --model dit``, which wrote ``assets/digits_dit.safetensors`` and
  ``assets/digits_dit.json``.
- Sampling: :class:`DigitsDiTPipeline`, DDIM on the training schedule (Note [leading spacing]
  in :mod:`asyncdiff.models.digits`); the batch asks for the digits 0, 1, ..., 9, 0, 1, ...
  unless ``class_labels`` says otherwise. ``guidance_scale > 1`` adds classifier-free guidance
  as a batch of two (conditional, unconditional), as diffusers' ``DiTPipeline`` does.

Sizes follow Note [one trained size] in :mod:`asyncdiff.models.digits`.

Example:
    >>> import torch
    >>> pipe = build_digits_dit("trained")
    >>> out = pipe(batch_size=4, num_inference_steps=20, output_type="pt",
    ...            generator=torch.Generator().manual_seed(0))
    >>> tuple(out.images.shape)
    (4, 1, 16, 16)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from asyncdiff.models.digits import (
    ASSETS,
    BATCH_SIZE,
    RESOLUTION,
    SAMPLING,
    SCHEDULE,
    SIZES,
    check_output_type,
    class_batch,
    images_out,
)

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DiTTransformer2DModel

__all__ = [
    "CLASSES",
    "DIT_CONFIG",
    "NULL_CLASS",
    "DigitsDiTPipeline",
    "build_digits_dit",
    "digits_dit",
    "digits_dit_inputs",
]

DIT_WEIGHTS = ASSETS / "digits_dit.safetensors"
DIT_CONFIG_FILE = ASSETS / "digits_dit.json"
CLASSES = 10
NULL_CLASS = CLASSES  # the label embedding's extra row: "no class" (classifier-free guidance)

DIT_CONFIG: dict[str, Any] = {
    "sample_size": RESOLUTION,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_attention_heads": 4,
    "attention_head_dim": 24,
    "num_layers": 6,
    "num_embeds_ada_norm": CLASSES,  # in a DiT: the number of classes of the label embedding
}


def digits_dit(config: dict[str, Any] | None = None) -> DiTTransformer2DModel:
    """The digits ``DiTTransformer2DModel``: from ``config``, else from the shipped config, else
    from :data:`DIT_CONFIG` (random weights)."""
    import json

    from diffusers import DiTTransformer2DModel

    if config is None:
        config = json.loads(DIT_CONFIG_FILE.read_text()) if DIT_CONFIG_FILE.is_file() else DIT_CONFIG
    return DiTTransformer2DModel.from_config(config)


class DigitsDiTPipeline(DiffusionPipeline):
    """Class-conditional DDIM sampling of a pixel-space DiT; returns images in ``[0, 1]``."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: DDIMScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor | None = None,
        batch_size: int = BATCH_SIZE,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        eta: float = 0.0,
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
        labels = labels.to(device)
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])

        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([image, image]) if guided else image
            timestep = t.to(device).expand(len(model_input))
            noise = self.transformer(model_input, timestep=timestep, class_labels=labels).sample
            if guided:
                conditional, unconditional = noise.chunk(2)
                noise = unconditional + guidance_scale * (conditional - unconditional)
            image = self.scheduler.step(noise, t, image, eta=eta, generator=generator).prev_sample

        return images_out(self, image, output_type, return_dict)


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not a size of the digits DiT; use 'trained' "
                         f"(the generic names {list(SIZES[1:])} give the same model)")


def build_digits_dit(size: str = "trained", seed: int = 0, dtype: torch.dtype = torch.float32) -> DigitsDiTPipeline:
    """A :class:`DigitsDiTPipeline` with the shipped trained weights; ``seed`` changes nothing
    (as in :func:`asyncdiff.models.digits.build_digits`)."""
    from diffusers import DDIMScheduler
    from safetensors.torch import load_file

    from asyncdiff.models.common import finish

    _check_size(size)
    if not DIT_WEIGHTS.is_file():
        raise FileNotFoundError(f"{DIT_WEIGHTS} is missing; run `python scripts/train_digits.py --model dit` to write it")
    transformer = digits_dit()
    transformer.load_state_dict(load_file(str(DIT_WEIGHTS)))
    scheduler = DDIMScheduler(**SCHEDULE, **SAMPLING)
    return finish(DigitsDiTPipeline(transformer=transformer, scheduler=scheduler), dtype)


def digits_dit_inputs(size: str = "trained", seed: int = 0) -> dict[str, Any]:
    """Call kwargs for an example run: :data:`~asyncdiff.models.digits.BATCH_SIZE` digits, 0-9 in turn."""
    _check_size(size)
    return {"batch_size": BATCH_SIZE}
