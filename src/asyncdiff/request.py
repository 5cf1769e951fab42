"""One generation request, the same record for the Python API, ``asyncdiff generate`` and ``asyncdiff serve``.

Note [one request record]: a :class:`GenerationRequest` is frozen and checked once, when it is
made: every error names the field, the value and the fix, whoever made it (a flag, a JSON body, a
keyword). :func:`call_arguments` is the one place a request becomes a pipeline call's keyword
arguments, for one request or for several that :func:`batch_key` finds alike (dynamic batching):

- every image is one entry of the call's batch: a request's prompts, each ``n`` times, in order;
  ``num_images_per_prompt`` stays 1, so batching requests only lengthens the lists;
- image ``i`` of a request (counting prompts x ``n`` in order) draws its noise from its own
  generator, seeded ``seed + i`` (a list of generators, which diffusers draws one sample from
  each), so an image is the same alone, with other images of its request, or batched with other
  requests: the same pixels where the denoiser computes each sample of a batch alike (the CPU
  build does), within float noise where a batch sums in another order;
- fields a call holds once for its whole batch (size, steps, guidance scale, frames) must agree:
  they make the batch key, with whether a negative prompt is given (an empty negative prompt and
  none are the same embeddings in Stable Diffusion, not in every pipeline) and input pictures
  (a request with one is never batched).

Example:
    >>> request = GenerationRequest(prompt="a cat", seed=3, n=2, height=32, width=48)
    >>> request.prompts, request.images
    (('a cat',), 2)
    >>> GenerationRequest(steps=0)
    Traceback (most recent call last):
    ...
    ValueError: steps=0 must be an integer >= 1 (the denoising steps)
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ARGUMENTS", "FORMATS", "GenerationRequest", "Limits", "as_data_url", "batch_key", "call_arguments",
           "check_arguments", "decode_picture", "read_prompts"]

FORMATS = ("png", "jpeg", "webp")  # output_format: how the server encodes a picture


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate; ``None``: the pipeline's default. ``prompt``: one prompt or several
    (a tuple; a list is taken as one), None for an unconditional pipeline; ``n``: images per
    prompt; ``image``/``mask``: an input picture (img2img, inpainting, ControlNet, SVD's first
    frame) as a file path, base64 text or a ``data:`` URL; ``frames``/``fps``: a video's."""

    prompt: str | tuple[str, ...] | None = "a photo of a cat"
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    steps: int = 20
    guidance_scale: float | None = None
    seed: int = 0
    n: int = 1
    output_format: str = "png"
    frames: int | None = None
    fps: int | None = None
    image: str | None = None
    mask: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompt, list):
            object.__setattr__(self, "prompt", tuple(self.prompt))
        prompts = self.prompt if isinstance(self.prompt, tuple) else (self.prompt,)
        if self.prompt is not None and (not prompts or not all(isinstance(p, str) for p in prompts)):
            raise ValueError(f"prompt={self.prompt!r} must be a string or a non-empty list of strings")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt={self.negative_prompt!r} must be a string (or left out)")
        _integer(self, "steps", 1, "the denoising steps")
        _integer(self, "n", 1, "images per prompt")
        _integer(self, "seed", 0, "the noise", high=2**63 - self.images)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                _integer(self, name, 8, "the picture's size in pixels")
                if value % 8:
                    raise ValueError(f"{name}={value} must be a multiple of 8, at least 8 (the VAE's factor); "
                                     f"e.g. {name}={(value + 7) // 8 * 8}")
        for name in ("frames", "fps"):
            if getattr(self, name) is not None:
                _integer(self, name, 1, "a video's" + (" frame count" if name == "frames" else " frames per second"))
        scale = self.guidance_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale < 0):
            raise ValueError(f"guidance_scale={scale!r} must be a number >= 0 (<= 1 turns guidance off); "
                             f"e.g. guidance_scale=7.5")
        if self.output_format not in FORMATS:
            raise ValueError(f"output_format={self.output_format!r} is not one of {', '.join(FORMATS)}")
        for name in ("image", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}: a {type(value).__name__} is not a picture; pass a file path, base64 "
                                 f"text or a data: URL")

    @property
    def prompts(self) -> tuple[str | None, ...]:
        return self.prompt if isinstance(self.prompt, tuple) else (self.prompt,)

    @property
    def images(self) -> int:
        """The images this request makes: its prompts x ``n``."""
        return len(self.prompts) * self.n

    def replace(self, **changes: Any) -> GenerationRequest:
        return dataclasses.replace(self, **changes)


def _integer(request: GenerationRequest, name: str, low: int, hint: str, high: int | None = None) -> None:
    value = getattr(request, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be an integer {bound} ({hint})")


@dataclass(frozen=True)
class Limits:
    """What a server accepts (each a 4xx naming the field and the limit when passed)."""

    max_prompt_chars: int = 2000
    max_images: int = 8  # prompts x n in one request
    max_steps: int = 200
    max_pixels: int = 2048 * 2048  # height x width
    max_frames: int = 256

    def check(self, request: GenerationRequest) -> None:
        longest = max((len(p) for p in (*request.prompts, request.negative_prompt) if p is not None), default=0)
        if longest > self.max_prompt_chars:
            raise ValueError(f"prompt: {longest} characters is over this server's limit of {self.max_prompt_chars}")
        if request.images > self.max_images:
            raise ValueError(f"n={request.n} x {len(request.prompts)} prompt(s) = {request.images} images is over "
                             f"this server's limit of {self.max_images} per request")
        if request.steps > self.max_steps:
            raise ValueError(f"steps={request.steps} is over this server's limit of {self.max_steps}")
        pixels = (request.height or 0) * (request.width or 0)
        if pixels > self.max_pixels:
            raise ValueError(f"size={request.width}x{request.height} is {pixels} pixels, over this server's limit "
                             f"of {self.max_pixels}")
        if (request.frames or 0) > self.max_frames:
            raise ValueError(f"frames={request.frames} is over this server's limit of {self.max_frames}")


def batch_key(request: GenerationRequest) -> tuple[Any, ...] | None:
    """Requests with equal keys run as one call (Note [one request record]); None: never batched."""
    if request.image is not None or request.mask is not None:
        return None
    return (request.height, request.width, request.steps, request.guidance_scale, request.frames, request.fps,
            request.negative_prompt is None, request.prompt is None)


def decode_picture(text: str, field: str = "image") -> Any:
    """A PIL picture from a file path, base64 text or a ``data:`` URL."""
    from PIL import Image, UnidentifiedImageError

    if not text.startswith("data:") and os.path.isfile(text):
        return Image.open(text).convert("RGB")
    data = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        return Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")
    except (binascii.Error, ValueError, UnidentifiedImageError):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ValueError(f"{field}={shown!r} is neither a file nor a base64 picture; pass a path, base64 PNG/JPEG "
                         f"or a data: URL") from None


def read_prompts(path: str, base: GenerationRequest) -> list[GenerationRequest]:
    """The requests of a prompts file: each non-blank line a prompt, or a JSON object of
    :class:`GenerationRequest` fields that replace ``base``'s (``{"prompt": "a dog", "seed": 4}``)."""
    fields = {f.name for f in dataclasses.fields(GenerationRequest)}
    requests = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not line.lstrip().startswith("{"):
                requests.append(base.replace(prompt=line.strip()))
                continue
            try:
                changes = json.loads(line)
                unknown = sorted(set(changes) - fields)
                if unknown:
                    raise ValueError(f"unknown field(s) {unknown}; the fields are {sorted(fields)}")
                requests.append(base.replace(**changes))
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"prompts_file={path!r} line {number}: {err}") from None
    if not requests:
        raise ValueError(f"prompts_file={path!r} has no prompt; write one prompt (or JSON object) per line")
    return requests


def as_data_url(text: str, field: str = "image") -> str:
    """``text`` (base64 or a ``data:`` URL, never a path: what a server accepts) checked to be a
    picture, as a ``data:`` URL, which :func:`decode_picture` never reads as a file name."""
    url = text if text.startswith("data:") else "data:image/png;base64," + text
    try:
        decode_picture(url, field)
    except ValueError:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ValueError(f"{field}={shown!r} is not a base64 picture; send base64 PNG/JPEG or a data: URL") from None
    return url


# request field -> the pipeline argument it becomes (where one is given)
ARGUMENTS = {"negative_prompt": "negative_prompt", "height": "height", "width": "width",
             "guidance_scale": "guidance_scale", "frames": "num_frames", "image": "image", "mask": "mask_image"}
# the generate flag of a field, where it has one
FLAGS = {"n": "--num-images", "negative_prompt": "--negative-prompt", "height": "--height", "width": "--width",
         "guidance_scale": "--guidance-scale", "image": "--image", "mask": "--mask"}


def check_arguments(request: GenerationRequest, params: Collection[str], pipeline: str) -> None:
    """A ValueError naming the first field of ``request`` that the pipeline (its ``__call__``
    taking ``params``) cannot take, e.g. a negative prompt for an unconditional pipeline."""
    if "prompt" not in params and request.images > 1 and "batch_size" not in params:
        _lacks(pipeline, "batch_size", "n")
    for field, arg in ARGUMENTS.items():
        if getattr(request, field) is not None and arg not in params:
            _lacks(pipeline, arg, field)


def call_arguments(requests: Sequence[GenerationRequest], pipeline: type) -> dict[str, Any]:
    """The call of ``pipeline`` (a pipeline class) for ``requests`` (alike by :func:`batch_key`,
    or one; Note [one request record]). A field the pipeline lacks is a ValueError naming it
    (:func:`check_arguments`); a pipeline without ``prompt`` (unconditional) makes prompts x
    ``n`` images and reads no prompt."""
    import inspect

    import torch

    params = inspect.signature(pipeline.__call__).parameters
    first, keys = requests[0], {batch_key(r) for r in requests}
    if len(requests) > 1 and (len(keys) != 1 or None in keys):
        raise ValueError("requests of one call must agree in size, steps, guidance and video settings (batch_key)")
    check_arguments(first, params, pipeline.__name__)
    generators = [torch.Generator().manual_seed(r.seed + i) for r in requests for i in range(r.images)]
    kwargs: dict[str, Any] = {"num_inference_steps": first.steps,
                              "generator": generators[0] if len(generators) == 1 else generators}
    if "prompt" in params and first.prompt is not None:
        prompts = [p for r in requests for p in r.prompts for _ in range(r.n)]
        kwargs["prompt"] = prompts[0] if len(prompts) == 1 else prompts
    elif len(generators) > 1:
        if "batch_size" not in params:
            _lacks(pipeline.__name__, "batch_size", "n")
        kwargs["batch_size"] = len(generators)
    if first.negative_prompt is not None:
        negatives = [r.negative_prompt for r in requests for _ in range(r.images)]
        kwargs["negative_prompt"] = negatives[0] if len(negatives) == 1 else negatives
    for field in ("height", "width", "guidance_scale", "frames"):
        if getattr(first, field) is not None:
            kwargs[ARGUMENTS[field]] = getattr(first, field)
    if first.fps is not None and "fps" in params:  # else only the video file's rate
        kwargs["fps"] = first.fps
    for field in ("image", "mask"):
        if getattr(first, field) is not None:
            kwargs[ARGUMENTS[field]] = decode_picture(getattr(first, field), field)
    return kwargs


def _lacks(pipeline: str, arg: str, field: str) -> None:
    flag = f" ({FLAGS[field]})" if field in FLAGS else ""
    raise ValueError(f"{pipeline} takes no {arg}; leave {field} out{flag}")
