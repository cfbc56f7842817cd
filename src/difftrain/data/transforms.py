"""Image transforms in PIL, numpy and torch (no torchvision).

Deterministic work (mode conversion, resize, crop) runs once per image at load time and yields uint8
arrays; per-step augmentation (flip) and normalisation run on batched tensors.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image


class ImageTooLarge(ValueError):
    """An image whose header gives more pixels than `data.max_image_pixels`; it is skipped undecoded."""


def check_pixel_limit(size: tuple[int, int], max_pixels: int) -> None:
    """Raise ImageTooLarge when `size` (width, height; from the header) has more than `max_pixels` pixels.

    PIL opens files lazily, so this runs before any pixel is decoded: the limit bounds memory and time.
    """
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} px = {width * height:,} pixels is over data.max_image_pixels = {max_pixels:,}; "
            "not decoded (raise data.max_image_pixels to use it)"
        )


# Twice the target, as PIL's own thumbnail() asks of draft(): the final bicubic resize still averages at
# least two decoded pixels per output pixel, so the result stays as smooth as one from the full image.
DRAFT_MARGIN = 2


def draft_for_resolution(image: Image.Image, resolution: int) -> None:
    """Before `image.load()`: let a JPEG decode at 1/2, 1/4 or 1/8 scale, keeping each side >= 2 x resolution.

    Peak memory then follows the target size, not the file's (a 12000x12000 JPEG decodes as 1500x1500 for
    64 px). Only JPEG (and MPO) decoders can scale while decoding; for every other format, for images
    smaller than 4 x resolution and for images already loaded, `draft` does nothing and the pixels are
    exactly those of a full decode. `Image.reduce` is no help there: it runs after a full decode.
    """
    image.draft(None, (DRAFT_MARGIN * resolution, DRAFT_MARGIN * resolution))


def convert_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode (palette, alpha, CMYK, 16-bit, float) to 'L' (channels=1) or 'RGB' (3)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            # Scale by the container's range, not the image's, so a dark 16-bit image stays dark.
            scale = 255.0 / 65535.0
        else:
            # Mode I/F carries no range; 16-bit PNGs often open as 'I', so values above 255 mean 16 bits.
            scale = 255.0 / (65535.0 if array.max() > 255 else 255.0)
        image = Image.fromarray(np.clip(array * scale, 0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become white, as a viewer would show them on a page.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def fit_and_crop(image: Image.Image, width: int, height: int, center_crop: bool = True,
                 ) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so the image covers width x height with the least crop, then center-crop it to that size (or squash
    it to that size if not center_crop). Returns the image and the crop's (top, left) in the resized image
    (SDXL's `crops_coords_top_left`; (0, 0) when squashed)."""
    if not center_crop:
        return image.resize((width, height), Image.Resampling.BICUBIC), (0, 0)
    new_w, new_h = covering_size(image.size, width, height)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height)), (top, left)


def covering_size(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """(width, height) an image of `size` (width, height) is resized to so it covers width x height, keeping its
    aspect ratio (rounded): the short side of a square target is its side."""
    w, h = size
    scale = max(width / w, height / h)
    return max(width, round(w * scale)), max(height, round(h * scale))


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool = True) -> Image.Image:
    """Resize so the short side is `resolution`, then center-crop a square (or squash if not center_crop)."""
    return fit_and_crop(image, resolution, resolution, center_crop)[0]


def to_channels_first(image: Image.Image) -> np.ndarray:
    """PIL image -> contiguous uint8 array (C, H, W)."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


def prepare_image_at(image: Image.Image, width: int, height: int, channels: int, center_crop: bool = True,
                     ) -> tuple[np.ndarray, tuple[int, int]]:
    """PIL image -> uint8 array (C, height, width) and the crop's (top, left) in the resized image."""
    image, crop = fit_and_crop(convert_mode(image, channels), width, height, center_crop)
    return to_channels_first(image), crop


def prepare_image(image: Image.Image, resolution: int, channels: int, center_crop: bool = True) -> np.ndarray:
    """PIL image -> uint8 array (C, H, W) at the training resolution."""
    return prepare_image_at(image, resolution, resolution, channels, center_crop)[0]


def to_model_range(images_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the seed's Normalize([0.5], [0.5]))."""
    return images_uint8.to(dtype) / 127.5 - 1.0


def from_model_range(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamped."""
    return ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def random_hflip(images: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Flip each image of a (B, C, H, W) batch left-right with probability 0.5."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    # torch.where instead of indexing keeps the step free of host-device syncs.
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_hflip_pair(images: torch.Tensor, generator: Optional[torch.Generator], masks: Optional[torch.Tensor],
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`random_hflip` of images and their loss masks with the same flips (one draw, as random_hflip's)."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if masks is not None:
        masks = torch.where(flip[:, None, None, None], masks.flip(-1), masks)
    return images, masks
