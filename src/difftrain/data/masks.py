"""Loss masks (data.mask_dir, or NAME.mask.png beside an image): found per image, checked against their image's
size from the headers before any model loads, and read resized and cropped exactly as their image was."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from difftrain.config import DataConfig
from difftrain.data.sources import MASK_SUFFIX, ImageSource
from difftrain.data.transforms import convert_mode, to_channels_first

logger = logging.getLogger(__name__)


class MaskSizeError(ValueError):
    """A loss mask whose size is not its image's: refused (not skipped), naming both files."""


def read_mask(path: str, image_name: str, image_size: tuple[int, int], resized: tuple[int, int],
              crop: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """The loss mask at `path` as (1, H, W) uint8, resized and cropped as its image was (bilinear)."""
    with Image.open(path) as mask:
        if mask.size != image_size:
            raise MaskSizeError(mask_size_message(path, mask.size, image_name, image_size))
        mask.load()
        mask = convert_mode(mask, 1)
        mask.load()
    if mask.size != resized:
        mask = mask.resize(resized, Image.Resampling.BILINEAR)
    (top, left), (width, height) = crop, target
    return to_channels_first(mask.crop((left, top, left + width, top + height)))


def mask_size_message(path: str, mask_size: tuple[int, int], image_name: str, image_size: tuple[int, int]) -> str:
    return (f"loss mask {path} is {mask_size[0]}x{mask_size[1]} px, but its image {image_name} is "
            f"{image_size[0]}x{image_size[1]} px; a mask must have its image's size")


def mask_paths(source: ImageSource, cfg: DataConfig, count: int) -> Optional[list[Optional[str]]]:
    """The loss mask of each of the first `count` items (data.mask_dir/REL.png, else NAME.mask.png beside the file),
    None for items without one; None when no item has one (or the source has no files)."""
    root = getattr(source, "root", None)
    if root is None or not Path(root).is_dir():
        return None
    root = Path(root)
    paths: list[Optional[str]] = []
    for name in source.names[:count]:
        image = Path(name)
        try:
            if cfg.mask_dir is not None:
                candidate = Path(cfg.mask_dir).expanduser() / image.relative_to(root).with_suffix(".png")
            else:
                candidate = image.with_name(image.stem + MASK_SUFFIX)
        except ValueError:  # not under the folder (not a file of it)
            candidate = None
        paths.append(str(candidate) if candidate is not None and candidate.is_file() else None)
    if not any(paths):
        if cfg.mask_dir is not None:
            logger.warning("data.mask_dir = %r holds no mask of any image of %s (expected REL/NAME.png); training "
                           "without masks", cfg.mask_dir, source.description)
        return None
    return paths


def check_mask_sizes(source: ImageSource, cfg: DataConfig) -> None:
    """Refuse, from the headers alone, the first loss mask whose size is not its image's (before any model loads)."""
    count = len(source) if cfg.max_images is None else min(len(source), cfg.max_images)
    masks = mask_paths(source, cfg, count)
    for i, path in enumerate(masks or []):
        if path is None:
            continue
        try:
            with Image.open(path) as mask, source.open(i) as image:
                mask_size, image_size = mask.size, image.size
        except Exception:  # an unreadable image or mask is found (and named) when it is decoded
            continue
        if mask_size != image_size:
            raise MaskSizeError(mask_size_message(path, mask_size, source.names[i], image_size))
