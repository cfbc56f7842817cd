"""Aspect-ratio buckets (data/buckets.py, the bucketed data set) and the masked loss (diffusion/loss.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.config import DataConfig, DiffusionConfig
from difftrain.data.buckets import BucketOrder, auto_buckets, nearest_bucket, resolve_buckets
from difftrain.data.bucketed import BucketedImageDataset
from difftrain.data.dataset import load_image_dataset
from difftrain.data.masks import MaskSizeError, check_mask_sizes
from difftrain.data.order import stream_position
from difftrain.data.sources import folder_source
from difftrain.diffusion.flow import FlowMatchingObjective
from difftrain.diffusion.objective import DDPMObjective

# -- bucket sizes -----------------------------------------------------------------------------------------------------


def test_auto_buckets_keep_the_area_multiples_and_aspect_range():
    buckets = auto_buckets(512, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512
        assert max(w, h) / min(w, h) <= 4
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios) and min(ratios) == pytest.approx(1 / 4) and max(ratios) == pytest.approx(4)


def test_nearest_bucket_by_aspect_ratio():
    buckets = [(8, 32), (16, 16), (32, 8)]
    assert nearest_bucket((100, 400), buckets) == 0
    assert nearest_bucket((300, 290), buckets) == 1
    assert nearest_bucket((1000, 300), buckets) == 2


def test_a_bucket_the_network_cannot_take_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"'520x512'.*multiples of 64"):
        resolve_buckets(["512x512", "520x512"], 512, 64)
    assert resolve_buckets(["512x768", "512x512"], 512, 64) == [(512, 768), (512, 512)]
    assert resolve_buckets("off", 512, 64) is None


# -- the order --------------------------------------------------------------------------------------------------------


def _order(counts=(5, 1, 8, 3)) -> BucketOrder:
    row_bucket = torch.cat([torch.full((n,), b) for b, n in enumerate(counts)])
    return BucketOrder(row_bucket[torch.randperm(len(row_bucket), generator=torch.Generator().manual_seed(3))],
                       len(counts))


def test_each_micro_batch_is_from_one_bucket_and_every_image_is_in_each_epoch():
    order, batch = _order(), 4
    per_epoch = order.batches_per_epoch(batch)
    assert per_epoch == 2 + 1 + 2 + 1
    for epoch in range(3):
        seen = []
        for k in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            rows = order.rows(7, k * batch, batch)
            assert len(rows) == batch and len(set(order.row_bucket[rows].tolist())) == 1
            seen += rows.tolist()
        assert set(seen) == set(range(len(order.row_bucket)))  # every image at least once (fills repeat a few)
        assert len(seen) == per_epoch * batch


def test_the_same_seed_and_position_give_the_same_rows_and_epochs_differ():
    a, b = _order(), _order()
    batch = 4
    for position in (0, 4, 20, 400):
        assert torch.equal(a.rows(11, position, batch), b.rows(11, position, batch))
    epoch0 = torch.cat([a.rows(11, k * batch, batch) for k in range(6)])
    epoch1 = torch.cat([a.rows(11, (6 + k) * batch, batch) for k in range(6)])
    assert not torch.equal(epoch0, epoch1)
    assert not torch.equal(epoch0, torch.cat([a.rows(12, k * batch, batch) for k in range(6)]))
    with pytest.raises(ValueError, match="multiple of the batch size"):
        a.rows(11, 2, batch)


def test_n_processes_read_what_one_process_with_n_times_the_accumulation_reads():
    order, batch, steps = _order(), 2, 5
    one = [order.rows(5, stream_position(s, m, 0, 4, 1, batch), batch) for s in range(steps) for m in range(4)]
    two = [order.rows(5, stream_position(s, m, r, 2, 2, batch), batch)
           for s in range(steps) for m in range(2) for r in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(one, two))


# -- the bucketed data set --------------------------------------------------------------------------------------------


def _mixed_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(20, 40), (24, 48), (48, 24), (60, 30), (30, 30), (17, 17), (41, 10)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def test_bucketed_data_set_keeps_aspect_ratios_and_records_crops(tmp_path):
    folder = _mixed_folder(tmp_path / "mixed")
    cfg = DataConfig(path=str(folder), resolution=16, decode_workers=1, buckets=["16x16", "24x12", "12x24", "32x8"])
    ds = load_image_dataset(cfg, want_labels=False)
    assert isinstance(ds, BucketedImageDataset)
    assert dict(ds.histogram()) == {"12x24": 2, "16x16": 2, "24x12": 2, "32x8": 1}
    for row in range(len(ds)):
        micro = ds.gather(torch.tensor([row]))
        h, w = micro.original_sizes[0].tolist()
        height, width = micro.images.shape[-2:]
        # the bucket of nearest ratio; crop only what the rounding to it needs
        scale = max(width / w, height / h)
        covering = (max(width, round(w * scale)), max(height, round(h * scale)))
        assert micro.crops_top_left[0].tolist() == [(covering[1] - height) // 2, (covering[0] - width) // 2]
        kept = width * height / (covering[0] * covering[1])
        assert kept >= min(w / h, width / height) / max(w / h, width / height) - 0.06
    assert ds.images.shape == (7, 3, 16, 16)  # the square view (evaluation, VAE stage)


def test_masks_follow_their_image_and_a_wrong_size_is_refused(tmp_path):
    folder = _mixed_folder(tmp_path / "mixed")
    mask = np.zeros((40, 20), dtype=np.uint8)
    mask[:, :10] = 255  # left half trained
    Image.fromarray(mask).save(folder / "img0.mask.png")
    cfg = DataConfig(path=str(folder), resolution=16, decode_workers=1, buckets=["16x16", "12x24", "24x12"])
    ds = load_image_dataset(cfg, want_labels=False)
    assert len(ds) == 7  # the mask file is not a training image
    row = ds.names.index(str(folder / "img0.png"))
    micro = ds.gather(torch.tensor([row]))
    assert micro.masks.shape == (1, 1, 24, 12)
    assert micro.masks[0, 0, :, :5].min() == 255 and micro.masks[0, 0, :, 7:].max() == 0
    other = ds.gather(torch.tensor([ds.names.index(str(folder / "img1.png"))]))
    assert other.masks.min() == 255  # no mask: trains everywhere
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(folder / "img2.mask.png")
    with pytest.raises(MaskSizeError, match=r"img2\.mask\.png is 10x10 px, but its image .*img2\.png is 48x24"):
        check_mask_sizes(folder_source(folder), cfg)


# -- masked loss ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", [
    DDPMObjective.from_config(DiffusionConfig(num_train_timesteps=100, snr_gamma=5.0)),
    FlowMatchingObjective.from_config(DiffusionConfig(objective="flow_matching", num_train_timesteps=100),
                                      sample_size=8),
], ids=["ddpm", "flow"])
def test_an_all_ones_mask_gives_exactly_the_unmasked_loss(objective):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    times = objective.sample_times(4, torch.Generator().manual_seed(1), torch.device("cpu"))
    weight = torch.randn(3, 3, 1, 1, generator=g)

    def network(x, t):
        return torch.nn.functional.conv2d(x, weight)

    plain = objective.loss(network, x0, noise, times)
    ones = objective.loss(network, x0, noise, times, mask=torch.ones(4, 1, 8, 8))
    assert torch.equal(plain, ones)
    half = torch.zeros(4, 1, 8, 8)
    half[..., :4] = 1
    masked = objective.loss(network, x0, noise, times, mask=half)
    left = objective.loss(lambda x, t: network(x, t)[..., :4], x0[..., :4], noise[..., :4], times) \
        if isinstance(objective, FlowMatchingObjective) else None
    if left is not None:  # flow's x_t is pointwise: the masked loss is the loss of the left half alone
        torch.testing.assert_close(masked, left)
    assert not torch.equal(masked, plain) and math.isfinite(float(masked.sum()))
