"""PNG grids of samples that a person can look at."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from difftrain.writes import check_file_writable, replace_file


def _label_font() -> ImageFont.ImageFont:
    # Pillow's scalable default font (FreeType) keeps the spaces in "a photo of a daisy" visible; the
    # old bitmap font, the fallback without FreeType, renders them one pixel wide.
    try:
        return ImageFont.load_default(size=12)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def make_grid(images: torch.Tensor, ncols: int, padding: int = 2, min_cell_px: int = 64,
              row_labels: Optional[list[str]] = None, col_labels: Optional[list[str]] = None) -> Image.Image:
    """Tile uint8 images (N, C, H, W) into one PIL image, ncols per row.

    Small images (e.g. 16 px digits) are enlarged with nearest-neighbour so every cell is at least
    `min_cell_px` wide; `row_labels` adds a text margin on the left, `col_labels` one on top.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"make_grid expects uint8 images, got {images.dtype}")
    n, c, h, w = images.shape
    scale = max(1, -(-min_cell_px // w))
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    cell_h, cell_w = h * scale, w * scale
    font = _label_font()
    margin = 0
    if row_labels:
        margin = 10 + int(max(font.getlength(label) for label in row_labels))
    top = 16 if col_labels else 0
    grid = np.full(
        (top + padding + nrows * (cell_h + padding), margin + padding + ncols * (cell_w + padding), 3), 255, np.uint8
    )
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if c == 1:
        array = np.repeat(array, 3, axis=3)
    array = array.repeat(scale, axis=1).repeat(scale, axis=2)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = top + padding + r * (cell_h + padding), margin + padding + col * (cell_w + padding)
        grid[y : y + cell_h, x : x + cell_w] = array[i]
    image = Image.fromarray(grid)
    draw = ImageDraw.Draw(image)
    for r, label in enumerate((row_labels or [])[:nrows]):
        draw.text((4, top + padding + r * (cell_h + padding) + cell_h // 2 - 7), label, fill=(0, 0, 0), font=font)
    for c, label in enumerate((col_labels or [])[:ncols]):
        draw.text((margin + padding + c * (cell_w + padding) + 2, 1), label, fill=(0, 0, 0), font=font)
    return image


def png_bytes_estimate(width: int, height: int, channels: int = 3, count: int = 1) -> int:
    """An upper bound of the PNG size of `count` images: their raw pixels (PNG compresses, never expands much)."""
    return count * (width * height * channels + 1024)


def save_png_atomic(image: Image.Image, path: Path, what: str = "image") -> None:
    """Write a PNG via a temporary name so a reader never sees half a file; checked first, no temporary left on failure."""
    check_file_writable(path, png_bytes_estimate(image.width, image.height, len(image.getbands())), what)
    replace_file(path, lambda tmp: image.save(tmp, format="PNG"), what)
