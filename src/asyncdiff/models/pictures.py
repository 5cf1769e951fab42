"""Built-in example pictures for pipelines that take images (img2vid, inpainting, ControlNet, upscaling).

Pictures are drawn with PIL from a seed, so examples and tests need no files and no network:
a colour gradient with a rectangle and an ellipse on it.

Example:
    >>> picture = example_picture(64, 64, seed=0)
    >>> picture.size, edge_map(picture).mode, example_mask(64, 64).mode
    ((64, 64), 'RGB', 'L')
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["edge_map", "example_mask", "example_picture"]


def example_picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB gradient with a rectangle and an ellipse whose places and colours depend on ``seed``."""
    if width < 8 or height < 8:
        raise ValueError(f"picture size {width}x{height} is too small; use at least 8x8 pixels")
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, width)[None, :]
    y = np.linspace(0.0, 1.0, height)[:, None]
    start, end = rng.uniform(0, 255, size=(2, 3))
    t = (0.5 * x + 0.5 * y)[..., None]
    gradient = (1 - t) * start + t * end
    picture = Image.fromarray(gradient.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for shape in (draw.rectangle, draw.ellipse):
        x0, x1 = sorted(rng.uniform(0, width, size=2))
        y0, y1 = sorted(rng.uniform(0, height, size=2))
        box = (x0, y0, max(x1, x0 + width / 8), max(y1, y0 + height / 8))
        shape(box, fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))
    return picture


def example_mask(width: int, height: int) -> Image.Image:
    """An inpainting mask: white (repaint) ellipse over the central half, black (keep) elsewhere."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse((width / 4, height / 4, 3 * width / 4, 3 * height / 4), fill=255)
    return mask


def edge_map(picture: Image.Image) -> Image.Image:
    """A ControlNet-style edge picture (white edges on black, 3 channels) of ``picture``."""
    edges = picture.convert("L").filter(ImageFilter.FIND_EDGES)
    return edges.point(lambda v: 255 if v > 16 else 0).convert("RGB")
