"""Each decoded image's geometry (original size from the header, the crop's top-left in the resized image) reaches
the MicroBatch, for SDXL's micro-conditioning."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from difftrain.config import DataConfig
from difftrain.data.batches import MicroBatch
from difftrain.data.dataset import load_dreambooth_dataset, load_image_dataset
from difftrain.data.transforms import fit_and_crop, resize_and_crop


def _folder(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        Image.new("RGB", size, (10, 20, 30)).save(root / f"{name}.png")
    return root


def test_original_sizes_and_crops_are_recorded_per_row(tmp_path):
    folder = _folder(tmp_path / "imgs", {"a_wide": (40, 20), "b_tall": (10, 30), "c_square": (16, 16)})
    ds = load_image_dataset(DataConfig(path=str(folder), resolution=8, decode_workers=1), want_labels=False)
    batch = ds.gather(torch.tensor([0, 1, 2]))
    assert batch.original_sizes.dtype == torch.long and batch.crops_top_left.dtype == torch.long
    assert batch.original_sizes.tolist() == [[20, 40], [30, 10], [16, 16]]  # (height, width)
    # a_wide resized to 16x8 -> left crop 4; b_tall to 8x24 -> top crop 8; square: none
    assert batch.crops_top_left.tolist() == [[0, 4], [8, 0], [0, 0]]
    pinned = batch if not torch.cuda.is_available() else batch.pin_memory()
    assert pinned.original_sizes.tolist() == batch.original_sizes.tolist()


def test_pin_memory_keeps_every_field():
    micro = MicroBatch(torch.arange(2), torch.zeros(2, 1, 4, 4, dtype=torch.uint8), None,
                       torch.ones(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    if torch.cuda.is_available():
        pinned = micro.pin_memory()
        assert pinned.labels is None and torch.equal(pinned.original_sizes, micro.original_sizes)


def test_fit_and_crop_matches_resize_and_crop_for_squares():
    image = Image.new("RGB", (37, 23), (1, 2, 3))
    out, crop = fit_and_crop(image, 16, 16)
    assert out.size == (16, 16) and crop == (0, (round(37 * 16 / 23) - 16) // 2)
    assert list(out.getdata()) == list(resize_and_crop(image, 16).getdata())
    wide, crop = fit_and_crop(image, 32, 8)  # covers 32x8: width decides, height cropped
    assert wide.size == (32, 8) and crop == ((round(23 * 32 / 37) - 8) // 2, 0)


def test_dreambooth_dataset_carries_geometry(tmp_path):
    inst = _folder(tmp_path / "inst", {"x": (20, 10), "y": (10, 10)})
    cls = _folder(tmp_path / "cls", {"z": (12, 24)})
    cfg = DataConfig(instance_dir=str(inst), instance_prompt="a sks dog", class_prompt="a dog", resolution=8,
                     decode_workers=1, num_class_images=1)
    ds, n = load_dreambooth_dataset(cfg, cls)
    assert n == 2 and ds.original_sizes.tolist() == [[10, 20], [10, 10], [24, 12]]
    assert ds.gather(torch.tensor([2])).crops_top_left.tolist() == [[4, 0]]
