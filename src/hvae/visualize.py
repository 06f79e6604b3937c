"""Pictures: image grids as PNG (Pillow). Plotting stays apart from the math (see editing.py, plots.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from .checkpoint import atomic_file


def to_unit_range(images: Tensor, likelihood: str) -> Tensor:
    """Likelihood means -> [0, 1] for display (the logistic likelihood works on [-1, 1])."""
    if likelihood == "logistic":
        images = (images + 1) / 2
    return images.clamp(0, 1)


def grid(images: Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> uint8 [rows*(H+pad)+pad, nrow*(W+pad)+pad, C] with a white frame."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    canvas = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.float32)
    arr = images.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    return (np.clip(np.nan_to_num(canvas), 0.0, 1.0) * 255).round().astype(np.uint8)  # out of [0, 1]: clipped


def grid_image(images: Tensor, nrow: int = 8, scale: int = 2) -> Image.Image:
    """A Pillow image of the grid of [N, C, H, W] images in [0, 1], upscaled `scale` times (nearest)."""
    arr = grid(images, nrow)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def rows(images: Tensor) -> tuple[Tensor, int]:
    """[R, K, C, H, W] (a row of K pictures per item) -> ([R*K, C, H, W], nrow = K) for grid/save_grid."""
    return images.flatten(0, 1), images.shape[1]


def save_grid(images: Tensor, path: str | Path, nrow: int = 8, scale: int = 2) -> Path:
    """Write a PNG grid of [N, C, H, W] images in [0, 1], upscaled `scale` times (nearest); atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        grid_image(images, nrow, scale).save(f, format="PNG")
    return path


def png_bytes(images: Tensor, nrow: int = 8, scale: int = 2) -> bytes:
    """The PNG file of save_grid, in memory (for the HTML report)."""
    buf = io.BytesIO()
    grid_image(images, nrow, scale).save(buf, format="PNG")
    return buf.getvalue()
