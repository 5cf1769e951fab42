"""A small trained diffusion model of handwritten digits, shipped with the package.

Random-weight pipelines measure speed, not quality: stale inputs cost nothing visible on a
model that draws noise anyway. This pipeline has real weights, so the quality cost of
AsyncDiff's stale inputs can be measured (with :mod:`asyncdiff.fidelity`).

- Data: scikit-learn's 8x8 digits (1797 images, values 0..16), upscaled bilinearly to 16x16.
  :func:`load_digits16` gives them in ``[0, 1]``, the range the pipeline outputs.
- Model: a ``UNet2DModel`` with the real UNet topology (3 down blocks, the middle one with
  attention, a mid block, 3 up blocks), trained as an unconditional DDPM (epsilon prediction,
  1000-step cosine schedule, :data:`SCHEDULE`) by ``scripts/train_digits.py``, which wrote
  ``assets/digits_unet.safetensors`` and ``assets/digits_unet.json``.
- Sampling: a ``DDIMPipeline`` on the training schedule, so 20-50 steps give clean digits
  (timesteps spaced as in Note [leading spacing]).

There is one size, ``trained``. The generic size names (``tiny``, ``bench``, ``full``) that the
command line and :class:`asyncdiff.generate.GenerateSpec` offer for every pipeline name the
same trained model (Note [one trained size]).

Example:
    >>> import torch
    >>> pipe = build_digits("trained")
    >>> out = pipe(batch_size=4, num_inference_steps=20, output_type="np",
    ...            generator=torch.Generator().manual_seed(0))
    >>> out.images.shape
    (4, 16, 16, 1)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import DDIMPipeline, UNet2DModel

__all__ = [
    "ASSETS",
    "BATCH_SIZE",
    "RESOLUTION",
    "SCHEDULE",
    "SIZES",
    "build_digits",
    "digits_inputs",
    "digits_split",
    "digits_unet",
    "load_digits16",
]

ASSETS = Path(str(resources.files("asyncdiff.models") / "assets"))
UNET_WEIGHTS = ASSETS / "digits_unet.safetensors"
UNET_CONFIG = ASSETS / "digits_unet.json"

RESOLUTION = 16  # the 8x8 digits, upscaled
BATCH_SIZE = 16  # digits per example call
HELD_OUT = 0.2  # share of the digits the classifier never sees in training (:func:`digits_split`)
SPLIT_SEED = 0

# The training schedule; DDIM sampling reuses it.
SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}
# Note [leading spacing]: sampling starts at timestep 950 for 20 steps, not at 999. At 999 the
# cosine schedule keeps alpha_bar = 2.4e-9, so the first step's clean-image estimate divides the
# noise prediction's error by sqrt(alpha_bar) = 5e-5: a 1e-6 change in the denoiser's output
# moved final pixels by up to 3e-4 ("trailing"), against 7e-6 here, at about the same quality.
# Float-level differences (another thread count, a split denoiser) must not look like staleness.
SAMPLING: dict[str, Any] = {"timestep_spacing": "leading"}

# Note [one trained size]: builders take a size name, and the command line only offers the
# generic ones. A trained model has exactly one size, so every name below gives it; anything
# else is refused like any other builder's unknown size.
SIZES: tuple[str, ...] = ("trained", "tiny", "bench", "full")


def class_batch(class_labels: list[int] | torch.Tensor | None, batch_size: int, classes: int = 10) -> torch.Tensor:
    """The digits a class-conditional digits pipeline draws: ``class_labels``, else ``batch_size``
    digits ``0, 1, ..., 9, 0, ...``; a ``ValueError`` unless they are a non-empty list of digits."""
    labels = torch.arange(batch_size) % classes if class_labels is None else torch.as_tensor(class_labels)
    if labels.ndim != 1 or len(labels) == 0 or labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"class_labels={labels.tolist()} must be a non-empty list of digits 0-{classes - 1}")
    return labels


def check_output_type(output_type: str) -> None:
    if output_type not in ("pt", "np", "pil"):
        raise ValueError(f"output_type={output_type!r} is not one of 'pt', 'np', 'pil'")


def images_out(pipe: Any, image: torch.Tensor, output_type: str, return_dict: bool) -> Any:
    """A digits pipeline's result from its final sample in ``[-1, 1]``: images in ``[0, 1]`` as
    ``output_type`` (``"pt"``: ``(N, 1, H, W)``, ``"np"``: ``(N, H, W, 1)``, or ``"pil"``)."""
    from diffusers import ImagePipelineOutput

    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type != "pt":
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = pipe.numpy_to_pil(image)
    pipe.maybe_free_model_hooks()
    return ImagePipelineOutput(images=image) if return_dict else (image,)


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not a size of the digits model; use 'trained' "
                         f"(the generic names {list(SIZES[1:])} give the same model)")


def load_digits16() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as ``(images, labels)``: images ``(N, 1, 16, 16)`` float32 in
    ``[0, 1]`` (8x8 upscaled bilinearly), labels ``(N,)`` int64.

    Example:
        >>> images, labels = load_digits16()
        >>> tuple(images.shape), int(labels[0])
        ((1797, 1, 16, 16), 0)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits data comes from scikit-learn, an extra: pip install 'asyncdiff[fidelity]'") \
            from None

    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(small, size=(RESOLUTION, RESOLUTION), mode="bilinear",
                                             align_corners=False).clamp(0.0, 1.0)
    return images, torch.tensor(digits.target, dtype=torch.int64)


def digits_split(count: int = 1797) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` index tensors: a fixed random 80/20 split of ``count`` digits."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED))
    test = round(count * HELD_OUT)
    return order[test:].sort().values, order[:test].sort().values


def digits_unet(config: dict[str, Any] | None = None) -> UNet2DModel:
    """The digits ``UNet2DModel``: from ``config``, else from the shipped config (random weights)."""
    import json

    from diffusers import UNet2DModel

    if config is None:
        config = json.loads(UNET_CONFIG.read_text())
    return UNet2DModel.from_config(config)


def build_digits(size: str = "trained", seed: int = 0, dtype: torch.dtype = torch.float32) -> DDIMPipeline:
    """A ``DDIMPipeline`` with the shipped trained weights; ``seed`` is accepted like every builder's
    but changes nothing (the weights are fixed; seed the call's ``generator`` instead)."""
    from diffusers import DDIMPipeline, DDIMScheduler
    from safetensors.torch import load_file

    from asyncdiff.models.common import finish

    _check_size(size)
    if not UNET_WEIGHTS.is_file():
        raise FileNotFoundError(f"{UNET_WEIGHTS} is missing; run `python scripts/train_digits.py` to write it")
    unet = digits_unet()
    unet.load_state_dict(load_file(str(UNET_WEIGHTS)))
    unet.eval()
    scheduler = DDIMScheduler(**SCHEDULE, **SAMPLING)
    return finish(DDIMPipeline(unet=unet, scheduler=scheduler), dtype)


def digits_inputs(size: str = "trained", seed: int = 0) -> dict[str, Any]:
    """Call kwargs for an example run: a batch of :data:`BATCH_SIZE` digits (the pipeline takes no prompt)."""
    _check_size(size)
    return {"batch_size": BATCH_SIZE}
