"""What a generation writes: pictures (a tensor batch as one grid), videos, a prompts file's numbered outputs.

Example:
    >>> numbered("out.png", 3), manifest_path("out.png")
    ('out-0003.png', 'out.manifest.json')
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

__all__ = ["grid", "manifest_path", "numbered", "save_output", "write_video"]


def grid(images: torch.Tensor, gap: int = 2, scale: int = 1) -> Any:
    """A ``(N, C, H, W)`` batch in ``[0, 1]`` tiled into one near-square PIL image, ``gap`` white
    pixels between tiles, each pixel ``scale`` x ``scale``."""
    import math

    from PIL import Image

    images = images.repeat_interleave(scale, -1).repeat_interleave(scale, -2) if scale > 1 else images
    count, channels, height, width = images.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = images.new_ones(channels, rows * (height + gap) - gap, columns * (width + gap) - gap)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        top, left = row * (height + gap), column * (width + gap)
        canvas[:, top:top + height, left:left + width] = image
    pixels = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels)


def save_output(output: Any, path: str) -> None:
    """Save an image, a tensor batch as one grid (Note [output as latents]), or a video as GIF
    (``.gif``) or MP4 (``.mp4``)."""
    frames = getattr(output, "frames", None)
    if frames is None:
        images = output.images
        (grid(images) if isinstance(images, torch.Tensor) else images[0]).save(path)
        return
    write_video(frames[0], path)


def write_video(frames: Any, path: str, fps: int = 7) -> None:
    """One video's frames (PIL pictures, or an array in ``[0, 1]``: ``output_type="np"``, Wan's
    default) as GIF (``.gif``) or MP4 (``.mp4``)."""
    from diffusers.utils import export_to_gif, export_to_video

    if not isinstance(frames, list):
        from diffusers.image_processor import VaeImageProcessor

        frames = VaeImageProcessor.numpy_to_pil(np.asarray(frames))
    if path.endswith(".mp4"):
        export_to_video(frames, path, fps=fps)
    elif path.endswith(".gif"):
        export_to_gif(frames, path)
    else:
        raise ValueError(f"out={path!r}: a video pipeline writes .gif or .mp4; use one of those suffixes")


def numbered(out: str, index: int) -> str:
    """The ``index``-th output of a prompts file: ``out.png`` -> ``out-0003.png``."""
    stem, suffix = os.path.splitext(out)
    return f"{stem}-{index:04d}{suffix}"


def manifest_path(out: str) -> str:
    """Where a prompts file's manifest goes: ``out.png`` -> ``out.manifest.json``."""
    return os.path.splitext(out)[0] + ".manifest.json"
