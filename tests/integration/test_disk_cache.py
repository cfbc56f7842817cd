"""Data over the memory budget is decoded once into a memory-mapped disk cache: the same batches and weights as
the RAM path, reuse by later runs, a build that resumes after a kill, a truncated cache rebuilt, a corrupt chunk
found by its checksums and repaired, and an unwritable cache folder refused in one line."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
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
from tests.filesystems import read_only_folder

pytestmark = pytest.mark.integration

TINY_BUDGET = ["data.max_memory_gb=1.0e-6"]  # 1 KB: any data set goes to disk


def test_disk_path_gives_the_ram_path_data_and_weights_and_is_reused(tmp_path: Path, caplog):
    cache = [f"data.cache_dir={tmp_path / 'cache'}"]
    ram_cfg = load_config("tiny/digits-class", output_dir=str(tmp_path / "ram"))
    disk_cfg = load_config("tiny/digits-class", TINY_BUDGET + cache, output_dir=str(tmp_path / "disk"))
    ram, disk = load_image_dataset(ram_cfg.data, True), load_image_dataset(disk_cfg.data, True)
    assert torch.equal(ram.images, disk.images) and torch.equal(ram.labels, disk.labels)
    assert ram.names == list(disk.names) and not disk.in_memory
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
        cache = disk_cache.decode_to_disk(_source(count), cfg, count, None, _pixels)
    assert "(2 of 3 chunks already there)" in caplog.text
    assert cache.rows.tolist() == list(range(count)) and not cache.skipped
    assert torch.equal(cache.images[:, 0, 0, 0], torch.tensor([i % 251 for i in range(count)], dtype=torch.uint8))


def test_skipped_items_are_compacted_out_and_a_truncated_cache_is_rebuilt(tmp_path: Path, caplog):
    cfg = load_config("tiny/digits-class", TINY_BUDGET + [f"data.cache_dir={tmp_path}", "data.resolution=4"]).data
    count = 20

    def every_third_unreadable(i: int) -> np.ndarray:
        if i % 3 == 0:
            raise OSError("cannot identify image file")
        return _pixels(i)

    cache = disk_cache.decode_to_disk(_source(count), cfg, count, None, every_third_unreadable)
    keep = cache.rows.tolist()
    assert keep == [i for i in range(count) if i % 3] and len(cache.skipped) == 7
    assert torch.equal(cache.images[:, 0, 0, 0], torch.tensor(keep, dtype=torch.uint8))
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    with open(folder / disk_cache.IMAGES, "r+b") as f:
        f.truncate(5)
    with caplog.at_level(logging.WARNING, logger="difftrain"):
        again = disk_cache.decode_to_disk(_source(count), cfg, count, None, every_third_unreadable)
    assert "truncated" in caplog.text and "rebuilding" in caplog.text
    assert again.rows.tolist() == keep and torch.equal(again.images, cache.images)


def test_a_corrupt_chunk_is_found_by_its_checksums_and_decoded_again(tmp_path: Path, caplog):
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=8", "data.max_images=1200"]
    ram = load_image_dataset(load_config("tiny/digits-class", overrides).data, True)
    disk_cfg = load_config("tiny/digits-class", TINY_BUDGET + overrides).data
    load_image_dataset(disk_cfg, True)  # builds the cache
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    row_bytes = 3 * 8 * 8 if ram.images.shape[1] == 3 else 8 * 8
    bad_row = disk_cache.CHUNK_ITEMS + 7  # in the second chunk
    with open(folder / disk_cache.IMAGES, "r+b") as f:  # flip bytes inside one row, as a disk fault would
        f.seek(bad_row * row_bytes + 3)
        f.write(bytes(255 - b for b in f.read(5)))
    disk = load_image_dataset(disk_cfg, True)  # start-up reads no row: the corruption is not seen yet
    assert not torch.equal(disk.images[bad_row], ram.images[bad_row])

    with caplog.at_level(logging.WARNING, logger="difftrain"):
        for position in range(0, 4 * len(ram), 64):  # the same positions of the data stream from both paths
            rows = ram.rows(len(ram), 0, position, 64)
            a, b = ram.gather(rows), disk.gather(rows)
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(folder / disk_cache.IMAGES) in warnings[0]
    assert f"rows {disk_cache.CHUNK_ITEMS}-{2 * disk_cache.CHUNK_ITEMS - 1}" in warnings[0]
    assert "digits[" in warnings[0]  # the source item it came from
    fresh = load_image_dataset(disk_cfg, True)  # repaired on disk, not only in that process
    assert torch.equal(fresh.images, ram.images)


def test_an_unwritable_cache_folder_is_one_line_before_anything_is_written(tmp_path: Path):
    with read_only_folder(tmp_path / "ro") as ro:
        done = subprocess.run([sys.executable, "-m", "difftrain", "train", "tiny/digits-class", "--output-dir",
                               str(tmp_path / "run"), *TINY_BUDGET, f"data.cache_dir={ro / 'cache'}"],
                              capture_output=True, text=True)
        assert done.returncode != 0 and "Traceback" not in done.stderr
        lines = [line for line in done.stderr.splitlines() if "data.cache_dir" in line]
        assert len(lines) == 1 and str(ro) in lines[0] and "not writable" in lines[0], done.stderr
        assert not list(ro.iterdir())


def test_skipped_files_and_dangling_links_are_named_by_cold_and_warm_starts_alike(tmp_path: Path, caplog):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"not a png")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    overrides = [f"data.path={folder}", f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=8",
                 "data.channels=3"]
    ram = load_image_dataset(load_config("tiny/folder-uncond", overrides).data, False)
    starts = []
    for _ in ("cold", "warm"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="difftrain"):
            disk = load_image_dataset(load_config("tiny/folder-uncond", TINY_BUDGET + overrides).data, False)
        starts.append([r.getMessage() for r in caplog.records])
        assert torch.equal(disk.images, ram.images) and list(disk.names) == ram.names and disk.skipped == ram.skipped
    assert starts[0] == starts[1]
    assert any(str(folder / "3.png") in m for m in starts[0]) and any("gone.png" in m for m in starts[0])
    assert "skipped 2 of 7 images" in starts[0][-1]


def test_a_warm_start_on_class_folders_lists_nothing_and_repairs_from_the_folder(tmp_path: Path, monkeypatch,
                                                                                 caplog):
    from PIL import Image

    from difftrain.data import dataset as dataset_module

    for i in range(9):
        folder = tmp_path / "images" / ("cat", "dog", "eel")[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 25 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    overrides = [f"data.path={tmp_path / 'images'}", f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=8",
                 "data.channels=3"]
    ram = load_image_dataset(load_config("tiny/folder-uncond", overrides).data, True)
    disk_cfg = load_config("tiny/folder-uncond", TINY_BUDGET + overrides).data
    load_image_dataset(disk_cfg, True)  # cold: lists the folders and builds the cache
    (cache,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    with open(cache / disk_cache.IMAGES, "r+b") as f:
        f.seek(5 * 3 * 8 * 8)
        f.write(b"\x01\x02\x03")

    def no_listing(*args, **kwargs):
        raise AssertionError("a warm start listed the folder")

    with monkeypatch.context() as patched:
        patched.setattr(dataset_module, "open_source", no_listing)
        patched.setattr(dataset_module, "folder_source", no_listing)
        warm = load_image_dataset(disk_cfg, True)
    assert isinstance(warm, dataset_module.CachedImageDataset) and not warm.in_memory
    assert torch.equal(warm.labels, ram.labels) and list(warm.names) == ram.names
    assert warm.class_names == ram.class_names == ["cat", "dog", "eel"] and warm.description == ram.description
    with caplog.at_level(logging.WARNING, logger="difftrain"):
        batch = warm.gather(torch.arange(len(ram)))
    assert torch.equal(batch.images, ram.images) and torch.equal(batch.labels, ram.labels)
    assert "failed their checksum" in caplog.text and ram.names[5] in caplog.text


def test_a_cache_cut_short_during_a_run_and_a_read_only_corrupt_cache_still_give_the_ram_batches(tmp_path: Path,
                                                                                               caplog):
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=8", "data.max_images=600"]
    ram = load_image_dataset(load_config("tiny/digits-class", overrides).data, True)
    disk_cfg = load_config("tiny/digits-class", TINY_BUDGET + overrides).data
    disk = load_image_dataset(disk_cfg, True)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    size = (folder / disk_cache.IMAGES).stat().st_size
    with open(folder / disk_cache.IMAGES, "r+b") as f:  # after start-up: its size check cannot see it
        f.truncate(size - 1000)
    with caplog.at_level(logging.WARNING, logger="difftrain"):
        assert torch.equal(disk.gather(torch.arange(len(ram))).images, ram.images)  # no SIGBUS
    assert "failed their checksum" in caplog.text and (folder / disk_cache.IMAGES).stat().st_size == size

    with open(folder / disk_cache.IMAGES, "r+b") as f:
        f.seek(17)
        f.write(b"\xff\x00\xff")
    with read_only_folder(tmp_path / "ro", fill_from=tmp_path / "cache") as ro:
        ro_cfg = load_config("tiny/digits-class", TINY_BUDGET + overrides + [f"data.cache_dir={ro}"]).data
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="difftrain"):
            read_only = load_image_dataset(ro_cfg, True)  # reused, not rebuilt: reading needs no write
            for _ in range(2):
                assert torch.equal(read_only.gather(torch.arange(len(ram))).images, ram.images)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "could not write them back" in warnings[0], warnings


_FORKED: dict = {}


def _gather_in_worker(rows: list[int]) -> torch.Tensor:
    return _FORKED["data"].gather(torch.tensor(rows)).images


def test_gather_in_forked_workers_reads_the_same_rows(tmp_path: Path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=8", "data.max_images=300"]
    ram = load_image_dataset(load_config("tiny/digits-class", overrides).data, True)
    disk = load_image_dataset(load_config("tiny/digits-class", TINY_BUDGET + overrides).data, True)
    disk.gather(torch.arange(4))  # the parent has its own descriptor open before the fork
    _FORKED["data"] = disk
    try:
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
            batches = list(pool.map(_gather_in_worker, [list(range(i, len(ram), 7)) for i in range(7)]))
    finally:
        _FORKED.clear()
    for i, images in enumerate(batches):
        assert torch.equal(images, ram.images[i::7])


def test_two_processes_build_one_cache_and_resume_exactly_on_the_disk_path(tmp_path: Path):
    """Both ranks reach the missing cache together: one builds it under the lock, the other reuses it. A run whose
    rank 1 dies at step 3 resumes from step 2 on the disk path to the uninterrupted run's weights, bit for bit."""
    from tests.integration.test_distributed import PER_RANK, _difftrain_n

    keys = [*PER_RANK, *TINY_BUDGET, f"data.cache_dir={tmp_path / 'cache'}", "train.sample_every_steps=null"]
    straight = _difftrain_n(tmp_path, "--output-dir", str(tmp_path / "straight"), *keys)
    assert straight.returncode == 0, straight.stderr[-4000:]
    assert len(list((tmp_path / "cache").glob(f"*/{disk_cache.MANIFEST}"))) == 1
    # Rank 0 logs (the other rank is quiet): it built the cache, or waited for rank 1 to build it and reused it.
    assert "decoded data: 256 images into" in straight.stderr or "reusing the disk cache" in straight.stderr

    run = tmp_path / "resumed"
    crashed = _difftrain_n(tmp_path, "--output-dir", str(run), *keys,
                           env={"DIFFTRAIN_FAIL_ON_RANK": "1", "DIFFTRAIN_FAIL_AT_STEP": "3"})
    assert crashed.returncode != 0 and "injected failure on rank 1 at step 3" in crashed.stderr
    resumed = _difftrain_n(tmp_path, "--output-dir", str(run), *keys)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "(step 2)" in (run / "train.log").read_text() and "worker process" in (run / "train.log").read_text()
    a = load_file(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
