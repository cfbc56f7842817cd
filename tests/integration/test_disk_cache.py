"""Data over the memory budget is decoded once into a memory-mapped disk cache: the same batches and weights as
the RAM path, reuse by later runs, a build that resumes after a kill, and a truncated cache rebuilt."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.data import disk_cache
from difftrain.data.dataset import load_image_dataset
from difftrain.training.loop import train

pytestmark = pytest.mark.integration

TINY_BUDGET = ["data.max_memory_gb=1.0e-6"]  # 1 KB: any data set goes to disk


def test_disk_path_gives_the_ram_path_data_and_weights_and_is_reused(tmp_path: Path, caplog):
    cache = [f"data.cache_dir={tmp_path / 'cache'}"]
    ram_cfg = load_config("tiny/digits-class", output_dir=str(tmp_path / "ram"))
    disk_cfg = load_config("tiny/digits-class", TINY_BUDGET + cache, output_dir=str(tmp_path / "disk"))
    ram, disk = load_image_dataset(ram_cfg.data, True), load_image_dataset(disk_cfg.data, True)
    assert torch.equal(ram.images, disk.images) and torch.equal(ram.labels, disk.labels) and ram.names == disk.names
    assert len(list((tmp_path / "cache").glob(f"*/{disk_cache.MANIFEST}"))) == 1  # it came from the disk cache

    with caplog.at_level(logging.INFO, logger="difftrain"):
        a = train(ram_cfg)
        b = train(disk_cfg)
    assert "reusing the disk cache" in caplog.text  # the training run found what load_image_dataset built
    weights_a = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    weights_b = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def _source(count: int) -> SimpleNamespace:
    return SimpleNamespace(description="generated", names=[f"gen[{i}]" for i in range(count)], labels=None, root=None)


def _pixels(i: int) -> np.ndarray:
    return np.full((1, 4, 4), i % 251, dtype=np.uint8)


def test_a_killed_build_resumes_with_the_chunks_it_has_not_recorded(tmp_path: Path, caplog):
    cfg = load_config("tiny/digits-class", TINY_BUDGET + [f"data.cache_dir={tmp_path}", "data.resolution=4",
                                                          "data.decode_workers=1"]).data
    count = 2 * disk_cache.CHUNK_ITEMS + 10  # three chunks, decoded in order by one worker

    def dies_in_the_last_chunk(i: int) -> np.ndarray:
        if i == 2 * disk_cache.CHUNK_ITEMS + 5:
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process, as if the machine killed it
        return _pixels(i)

    with pytest.raises(Exception):
        disk_cache.decode_to_disk(_source(count), cfg, count, None, dies_in_the_last_chunk)
    with caplog.at_level(logging.INFO, logger="difftrain"):
        images, keep, skipped = disk_cache.decode_to_disk(_source(count), cfg, count, None, _pixels)
    assert "(2 of 3 chunks already there)" in caplog.text
    assert keep == list(range(count)) and not skipped
    assert torch.equal(images[:, 0, 0, 0], torch.tensor([i % 251 for i in range(count)], dtype=torch.uint8))


def test_skipped_items_are_compacted_out_and_a_truncated_cache_is_rebuilt(tmp_path: Path, caplog):
    cfg = load_config("tiny/digits-class", TINY_BUDGET + [f"data.cache_dir={tmp_path}", "data.resolution=4"]).data
    count = 20

    def every_third_unreadable(i: int) -> np.ndarray:
        if i % 3 == 0:
            raise OSError("cannot identify image file")
        return _pixels(i)

    images, keep, skipped = disk_cache.decode_to_disk(_source(count), cfg, count, None, every_third_unreadable)
    assert keep == [i for i in range(count) if i % 3] and len(skipped) == 7
    assert torch.equal(images[:, 0, 0, 0], torch.tensor(keep, dtype=torch.uint8))
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    with open(folder / disk_cache.IMAGES, "r+b") as f:
        f.truncate(5)
    with caplog.at_level(logging.WARNING, logger="difftrain"):
        again, keep_again, _ = disk_cache.decode_to_disk(_source(count), cfg, count, None, every_third_unreadable)
    assert "truncated" in caplog.text and "rebuilding" in caplog.text
    assert keep_again == keep and torch.equal(again, images)
