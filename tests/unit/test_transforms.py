"""Image transforms: PIL mode conversion, resize/crop, array layout, value ranges and flips."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.data.transforms import (
    ImageTooLarge,
    check_pixel_limit,
    convert_mode,
    draft_for_resolution,
    from_model_range,
    prepare_image,
    random_hflip,
    resize_and_crop,
    to_model_range,
)

# ------------------------------------------------------------------------------------------------
# convert_mode


def _palette_image(transparent_index=None) -> Image.Image:
    """A 2x1 palette image: pixel 0 uses palette entry 0 (red), pixel 1 entry 1 (blue)."""
    image = Image.new("P", (2, 1))
    palette = [255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254
    image.putpalette(palette)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def test_palette_without_transparency_becomes_its_palette_colours():
    out = convert_mode(_palette_image(), 3)
    assert out.mode == "RGB"
    assert np.asarray(out).tolist() == [[[255, 0, 0], [0, 0, 255]]]


def test_palette_with_transparency_composites_transparent_entry_over_white():
    out = convert_mode(_palette_image(transparent_index=0), 3)
    assert out.mode == "RGB"
    # Entry 0 (red) is transparent -> white; entry 1 stays blue.
    assert np.asarray(out).tolist() == [[[255, 255, 255], [0, 0, 255]]]


def test_rgba_transparent_pixel_becomes_white_and_opaque_pixel_keeps_colour():
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent
    image.putpixel((1, 0), (10, 20, 30, 255))  # opaque
    image.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black over white -> mid grey
    out = np.asarray(convert_mode(image, 3))
    assert out.shape == (1, 3, 3)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert np.all(np.abs(out[0, 2].astype(int) - 127) <= 2)


def test_rgba_to_grayscale_transparent_is_white():
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 0, 255))
    out = convert_mode(image, 1)
    assert out.mode == "L"
    assert np.asarray(out).tolist() == [[255, 0]]


def test_la_transparent_pixel_becomes_white():
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (0, 0))  # black, transparent
    image.putpixel((1, 0), (40, 255))  # dark grey, opaque
    out = convert_mode(image, 1)
    assert out.mode == "L"
    assert np.asarray(out).tolist() == [[255, 40]]
    rgb = convert_mode(image, 3)
    assert rgb.mode == "RGB"
    assert np.asarray(rgb).tolist() == [[[255, 255, 255], [40, 40, 40]]]


def test_cmyk_converts_to_rgb():
    image = Image.new("CMYK", (3, 1))
    image.putpixel((0, 0), (0, 255, 255, 0))  # red
    image.putpixel((1, 0), (0, 0, 0, 0))  # white (no ink)
    image.putpixel((2, 0), (0, 0, 0, 255))  # black
    out = convert_mode(image, 3)
    assert out.mode == "RGB"
    assert np.asarray(out).tolist() == [[[255, 0, 0], [255, 255, 255], [0, 0, 0]]]


def test_16_bit_values_scale_to_8_bits():
    array = np.array([[0, 65535, 32768, 257 * 100]], dtype=np.uint16)
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    out = convert_mode(image, 1)
    assert out.mode == "L"
    assert np.asarray(out).tolist() == [[0, 255, 128, 100]]
    rgb = np.asarray(convert_mode(image, 3))
    assert rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 255, 128, 100]


def test_dark_16_bit_image_still_scales_by_the_16_bit_range():
    array = np.array([[0, 100, 200, 255]], dtype=np.uint16)  # very dark in 16-bit terms
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    out = np.asarray(convert_mode(image, 1))
    # 255 / 65535 * 255 ~= 0.99 -> at most 1 after rounding.
    assert out.max() <= 1


def test_grayscale_to_rgb_replicates_channel():
    image = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    out = convert_mode(image, 3)
    assert out.mode == "RGB"
    arr = np.asarray(out)
    for c in range(3):
        assert arr[0, :, c].tolist() == [0, 77, 255]


def test_rgb_to_grayscale():
    image = Image.fromarray(np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], dtype=np.uint8))
    out = convert_mode(image, 1)
    assert out.mode == "L"
    arr = np.asarray(out)
    assert arr[0, 0] == 255 and arr[0, 1] == 0
    assert 70 <= arr[0, 2] <= 80  # ITU-R 601 luma of pure red ~ 76


def test_matching_mode_is_returned_unchanged():
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert convert_mode(image, 3) is image
    gray = Image.new("L", (4, 4), 9)
    assert convert_mode(gray, 1) is gray


# ------------------------------------------------------------------------------------------------
# resize_and_crop


@pytest.mark.parametrize("size", [(64, 32), (32, 64), (40, 40), (7, 5), (300, 17)])
@pytest.mark.parametrize("center_crop", [True, False])
def test_resize_and_crop_gives_square_at_resolution(size, center_crop):
    image = Image.new("RGB", size, (100, 150, 200))
    out = resize_and_crop(image, 16, center_crop=center_crop)
    assert out.size == (16, 16)
    assert out.mode == "RGB"


def _three_bands(width: int, height: int, horizontal: bool) -> Image.Image:
    """Black outer thirds, white middle third (left-right if horizontal, else top-bottom)."""
    array = np.zeros((height, width), dtype=np.uint8)
    if horizontal:
        array[:, width // 3 : 2 * width // 3] = 255
    else:
        array[height // 3 : 2 * height // 3, :] = 255
    return Image.fromarray(array)


def test_center_crop_keeps_the_centre_of_a_wide_image():
    image = _three_bands(96, 32, horizontal=True)
    out = np.asarray(resize_and_crop(image, 16, center_crop=True))
    assert out.shape == (16, 16)
    assert (out > 127).mean() > 0.9


def test_center_crop_keeps_the_centre_of_a_tall_image():
    image = _three_bands(32, 96, horizontal=False)
    out = np.asarray(resize_and_crop(image, 16, center_crop=True))
    assert out.shape == (16, 16)
    assert (out > 127).mean() > 0.9


def test_squash_keeps_the_whole_wide_image():
    image = _three_bands(96, 32, horizontal=True)
    out = np.asarray(resize_and_crop(image, 16, center_crop=False))
    white = (out > 127).mean()
    # The whole image is kept: about a third white, both black sides still present.
    assert 0.2 < white < 0.5
    assert out[:, 0].max() < 64 and out[:, -1].max() < 64


def test_square_image_at_resolution_is_unchanged():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    out = resize_and_crop(Image.fromarray(array), 16, center_crop=True)
    np.testing.assert_array_equal(np.asarray(out), array)


def test_upscales_small_images():
    image = Image.new("L", (4, 8), 200)
    out = resize_and_crop(image, 32, center_crop=True)
    assert out.size == (32, 32)
    assert np.all(np.asarray(out) == 200)


# ------------------------------------------------------------------------------------------------
# prepare_image


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "LA"])
def test_prepare_image_returns_uint8_channels_first(mode, channels):
    image = Image.new("RGB", (40, 24), (10, 200, 30)).convert(mode)
    out = prepare_image(image, 8, channels)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.uint8
    assert out.shape == (channels, 8, 8)
    assert out.flags["C_CONTIGUOUS"]


def test_prepare_image_channel_order_is_rgb():
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    out = prepare_image(image, 4, 3)
    assert out[0].min() == 255 and out[1].max() == 0 and out[2].max() == 0


# ------------------------------------------------------------------------------------------------
# value ranges


def test_model_range_round_trips_every_uint8_value():
    values = torch.arange(256, dtype=torch.uint8)
    scaled = to_model_range(values)
    assert scaled.dtype == torch.float32
    assert scaled.min().item() == -1.0 and scaled.max().item() == 1.0
    assert scaled[0].item() == -1.0 and scaled[255].item() == 1.0
    assert torch.all(scaled[1:] > scaled[:-1])
    back = from_model_range(scaled)
    assert back.dtype == torch.uint8
    assert torch.equal(back, values)


def test_model_range_round_trips_in_half_precision_types():
    values = torch.arange(256, dtype=torch.uint8)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        scaled = to_model_range(values, dtype)
        assert scaled.dtype == dtype
        assert scaled[0].item() == -1.0 and scaled[-1].item() == 1.0
    # float64 and float16 hold every k/127.5 - 1 closely enough to round back exactly.
    for dtype in (torch.float64, torch.float16):
        assert torch.equal(from_model_range(to_model_range(values, dtype)), values)


def test_from_model_range_clamps_out_of_range_values():
    out = from_model_range(torch.tensor([-5.0, -1.0, 0.0, 1.0, 7.0]))
    assert out.tolist() == [0, 0, 128, 255, 255]


def test_to_model_range_does_not_modify_uint8_input():
    images = torch.full((2, 1, 2, 2), 255, dtype=torch.uint8)
    to_model_range(images)
    assert torch.all(images == 255)


# ------------------------------------------------------------------------------------------------
# random_hflip


def _distinct_batch(n: int) -> torch.Tensor:
    # Each image is asymmetric left-right, so a flip is always visible.
    base = torch.arange(n * 2 * 3 * 4, dtype=torch.float32).reshape(n, 2, 3, 4)
    return base


def test_random_hflip_is_deterministic_for_a_seeded_generator():
    images = _distinct_batch(64)
    a = random_hflip(images, torch.Generator().manual_seed(123))
    b = random_hflip(images, torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    c = random_hflip(images, torch.Generator().manual_seed(124))
    assert not torch.equal(a, c)


def test_random_hflip_flips_about_half_and_flips_are_exact():
    images = _distinct_batch(1000)
    out = random_hflip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    flipped_ref = images.flip(-1)
    is_flipped = (out == flipped_ref).flatten(1).all(1)
    is_same = (out == images).flatten(1).all(1)
    # Every image is either untouched or exactly its mirror image, never both (all are asymmetric).
    assert torch.all(is_flipped ^ is_same)
    assert 400 <= int(is_flipped.sum()) <= 600


def test_random_hflip_works_on_uint8_and_does_not_modify_input():
    images = torch.arange(8 * 1 * 2 * 3, dtype=torch.uint8).reshape(8, 1, 2, 3)
    original = images.clone()
    out = random_hflip(images, torch.Generator().manual_seed(5))
    assert out.dtype == torch.uint8
    assert torch.equal(images, original)
    for i in range(8):
        assert torch.equal(out[i], images[i]) or torch.equal(out[i], images[i].flip(-1))


# ------------------------------------------------------------------------------------------------
# decoding large images at reduced size (issue 16)


def _gradient_rgb(width: int, height: int) -> Image.Image:
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([x, y, (x + y) / 2], -1).round().astype(np.uint8))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_a_large_jpeg_decodes_at_reduced_scale_with_the_same_result():
    data = _encoded(_gradient_rgb(256, 192), "JPEG")
    full = Image.open(io.BytesIO(data))
    full.load()
    drafted = Image.open(io.BytesIO(data))
    draft_for_resolution(drafted, 16)
    drafted.load()
    # 1/4 scale: the largest whose short side (48) stays >= 2 x 16.
    assert drafted.size == (64, 48)
    a, b = prepare_image(full, 16, 3).astype(int), prepare_image(drafted, 16, 3).astype(int)
    assert a.shape == b.shape == (3, 16, 16)
    assert np.abs(a - b).max() <= 2


@pytest.mark.parametrize("fmt, size", [("PNG", (256, 192)), ("JPEG", (60, 40)), ("JPEG", (256, 192))])
def test_images_not_drafted_decode_exactly_as_before(fmt, size):
    data = _encoded(_gradient_rgb(*size), fmt)
    full = Image.open(io.BytesIO(data))
    full.load()
    resolution = 16 if size == (60, 40) else 128  # < 4x smaller: the JPEG decoder is left at full scale
    opened = Image.open(io.BytesIO(data))
    draft_for_resolution(opened, resolution)
    opened.load()
    assert opened.size == size
    assert np.array_equal(prepare_image(opened, resolution, 3), prepare_image(full, resolution, 3))


def test_an_image_within_the_pixel_limit_passes():
    check_pixel_limit((100, 50), 5000)
    with pytest.raises(ImageTooLarge, match=r"100x51 px = 5,100 pixels is over data.max_image_pixels = 5,000"):
        check_pixel_limit((100, 51), 5000)


# Resident memory from /proc/self/status, not getrusage: a child's ru_maxrss starts at its parent's peak
# (Linux keeps the old peak across exec), so it would measure pytest. VmHWM is this process's own peak;
# writing 5 to clear_refs resets it to the current size, and if that is refused the import's peak stays
# in VmHWM, which can only overstate the decode's.
_DECODE_PEAK = r"""
import sys
from pathlib import Path

from difftrain.config import DataConfig
from difftrain.data.dataset import decode_item
from difftrain.data.sources import folder_source

def status_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024

source = folder_source(Path(sys.argv[1]))
cfg = DataConfig(resolution=64, max_image_pixels=150_000_000)  # 144 MP: over the 50 MP default
before = status_mib("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
array, facts = decode_item(source, 0, cfg)
print(array.shape, facts.size, status_mib("VmHWM") - before)
"""

_MAKE_JPEG = r"""
import sys
import numpy as np
from PIL import Image

side = 12000
ramp = Image.fromarray(np.broadcast_to(np.linspace(0, 255, side).astype(np.uint8), (side, side)).copy())
Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.TRANSPOSE), Image.new("L", (side, side), 96))).save(
    sys.argv[1], quality=80)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc (Linux)")
def test_decoding_a_12000px_jpeg_to_64px_peaks_under_200_mb(tmp_path):
    """Acceptance (issue 16): a full decode would need 432 MB for the RGB pixels alone."""
    folder = tmp_path / "big"
    folder.mkdir()
    # Made and decoded in child processes, so neither this process's memory nor its history counts.
    subprocess.run([sys.executable, "-c", _MAKE_JPEG, str(folder / "12000.jpg")], check=True, timeout=120)
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", _DECODE_PEAK, str(folder)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("(3, 64, 64) (12000, 12000) "), done.stdout
    # Peak resident memory over the memory in use just before the decode (the imports excluded).
    assert float(done.stdout.split()[-1]) < 200, done.stdout
