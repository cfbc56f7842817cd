"""Streamed sets (data/streaming.py): tar shards and parquet row groups generated here, read by sample id."""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from difftrain.config import DataConfig
from difftrain.config.checks import check_config
from difftrain.config.schema import RunConfig
from difftrain.data.dataset import decode_item
from difftrain.data.order import stream_position
from difftrain.data.shard_index import hub_split_files
from difftrain.data.sources import ImageSource, open_source, streamed_kind
from difftrain.data.streaming import StreamingSet, open_streaming_set

SEED = 7

# ------------------------------------------------------------------------------------------------
# helpers


def _png(seed: int, size=(12, 10)) -> bytes:
    """A small image whose pixels differ per seed (so a wrong sample shows)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _tar_shards(folder: Path, counts=(5, 7, 4), labels: bool = True) -> dict[str, bytes]:
    """Shards of png samples (labelled by cls text or json), plus members that are not samples; returns
    {key: png bytes}."""
    images = {}
    for s, count in enumerate(counts):
        members = [("readme", b"no extension: not a sample"), (f"d/s{s}_meta.json", b"{}")]  # no image: no sample
        for i in range(count):
            key = f"d/s{s}_{i:02d}"
            images[key] = _png(100 * s + i)
            members.append((f"{key}.png", images[key]))
            if labels and i % 2:
                members.append((f"{key}.json", f'{{"label": {(3, 7, 9)[i % 3]}, "caption": "c{s}{i}"}}'.encode()))
            elif labels:
                members.append((f"{key}.cls", f"{(3, 7, 9)[i % 3]}\n".encode()))
                members.append((f"{key}.txt", f"t{s}{i}".encode()))
        _write_tar(folder / f"shard-{s:03d}.tar", members)
    return images


def _cfg(path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), resolution=8, channels=3, cache_dir=str(tmp_path / "cache"), decode_workers=2,
                      **kw)


def _decode(data: bytes, cfg: DataConfig) -> np.ndarray:
    """The in-memory path's decode of the original file bytes."""
    return decode_item(ImageSource("x", ["x"], lambda _: Image.open(io.BytesIO(data))), 0, cfg)[0]


def _parquet_folder(folder: Path, rows_per_file=(8, 5), row_group_size: int = 3) -> list[bytes]:
    """Parquet files with a plain binary image column and integer labels, several row groups each."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for f, count in enumerate(rows_per_file):
        data = [_png(1000 + 10 * f + i) for i in range(count)]
        images += data
        table = pa.table({"image": pa.array(data, pa.binary()), "label": [2 * (i % 2) for i in range(count)]})
        pq.write_table(table, folder / f"part-{f}.parquet", row_group_size=row_group_size)
    return images


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def tar_set(tmp_path):
    images = _tar_shards(tmp_path / "shards")
    return open_streaming_set(_cfg(tmp_path / "shards", tmp_path), want_labels=True), images, tmp_path


# ------------------------------------------------------------------------------------------------
# counts and order


def test_tar_samples_are_counted_by_key(tar_set):
    ds, _, _ = tar_set
    assert isinstance(ds, StreamingSet) and not ds.in_memory
    assert len(ds) == 16 and ds.num_pieces == 3 and ds.skipped == []
    assert ds.row_names([0, 5, 15]) == [f"{ds.files[0]}:d/s0_00", f"{ds.files[1]}:d/s1_00", f"{ds.files[2]}:d/s2_03"]


def test_every_sample_once_per_epoch_and_pieces_stay_together(tar_set):
    ds, _, _ = tar_set
    n = len(ds)
    for epoch in range(3):
        ids = ds.rows(n, SEED, epoch * n, n)
        assert sorted(ids.tolist()) == list(range(n))
        piece_of = np.searchsorted([5, 12, 16], ids.numpy(), side="right")
        assert int((np.diff(piece_of) != 0).sum()) == ds.num_pieces - 1  # each piece read in one run
    assert not torch.equal(ds.rows(n, SEED, 0, n), ds.rows(n, SEED, n, n))  # epochs are reshuffled
    # A read across the epoch boundary is the end of one epoch and the start of the next.
    assert torch.equal(ds.rows(n, SEED, n - 3, 6), torch.cat([ds.rows(n, SEED, n - 3, 3), ds.rows(n, SEED, n, 3)]))


def test_two_ranks_partition_each_epoch(tar_set):
    ds, _, _ = tar_set
    n, batch, world = len(ds), 3, 2
    seen: dict[int, dict[int, list[int]]] = {}  # epoch -> rank -> ids
    for step in range(12):  # 12 steps x 6 positions covers 4 epochs of 16
        for rank in range(world):
            start = stream_position(step, 0, rank, 1, world, batch)
            for position, row in zip(range(start, start + batch), ds.rows(n, SEED, start, batch).tolist()):
                seen.setdefault(position // n, {}).setdefault(rank, []).append(row)
    for epoch in range(4):
        both = seen[epoch][0] + seen[epoch][1]
        assert sorted(both) == list(range(n)) and not set(seen[epoch][0]) & set(seen[epoch][1])


def test_rows_are_a_pure_function(tar_set, caplog):
    ds, _, tmp_path = tar_set
    n = len(ds)
    first = [ds.rows(n, SEED, p, 4) for p in (0, 13, 40)]
    with caplog.at_level(logging.INFO, logger="difftrain"):
        fresh = open_streaming_set(_cfg(tmp_path / "shards", tmp_path), want_labels=True)
    assert "shard index: 3 of 3 shards reused" in caplog.text and "0 indexed" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first, [fresh.rows(n, SEED, p, 4) for p in (0, 13, 40)]))
    assert all(torch.equal(a, b) for a, b in zip(first, [ds.rows(n, SEED, p, 4) for p in (0, 13, 40)]))
    assert not torch.equal(ds.rows(n, SEED, 0, n), ds.rows(n, SEED + 1, 0, n))
    with pytest.raises(ValueError, match="reads all of its 16 samples"):
        ds.rows(10, SEED, 0, 4)


# ------------------------------------------------------------------------------------------------
# reading


def test_gather_decodes_as_the_in_memory_path_with_labels_and_captions(tar_set):
    ds, images, _ = tar_set
    keys = list(images)  # id order: shards in order, samples in tar order
    rows = ds.rows(len(ds), SEED, 2, 8)
    batch = ds.gather(rows)
    assert torch.equal(batch.rows, rows) and batch.images.dtype == torch.uint8
    assert batch.images.shape == (8, 3, 8, 8)
    for row, image, label in zip(rows.tolist(), batch.images, batch.labels.tolist()):
        assert np.array_equal(image.numpy(), _decode(images[keys[row]], ds.cfg))
        assert ds.class_names[label] == str((3, 7, 9)[int(keys[row][-2:]) % 3])
    assert ds.class_names == ["3", "7", "9"] and ds.labels_available
    assert ds.captions([0, 1]) == ["t00", "c01"]


def test_gather_in_a_loader_worker_reads_the_same(tar_set):
    ds, _, _ = tar_set
    rows = [ds.rows(len(ds), SEED, p, 6) for p in (0, 6)]
    here = [ds.gather(r) for r in rows]  # the main process has readers open before the workers fork
    loader = torch.utils.data.DataLoader(rows, batch_size=None, num_workers=2, collate_fn=ds.gather,
                                         multiprocessing_context="fork")
    for a, b in zip(here, loader):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.rows, b.rows)
    with ThreadPoolExecutor(4) as pool:  # threads have readers of their own (no interleaved seek + read)
        threaded = list(pool.map(ds.gather, rows * 4))
    assert all(torch.equal(a.images, b.images) for a, b in zip(here * 4, threaded))


def test_unlabelled_set_and_labels_required(tmp_path):
    _tar_shards(tmp_path / "plain", counts=(3,), labels=False)
    ds = open_streaming_set(_cfg(tmp_path / "plain", tmp_path), want_labels=False)
    assert ds.gather(torch.tensor([0, 2])).labels is None and not ds.labels_available and ds.class_names == []
    with pytest.raises(ValueError, match=r"needs labels, but 3 samples of .*shard-000.tar have none"):
        open_streaming_set(_cfg(tmp_path / "plain", tmp_path), want_labels=True)


def test_parquet_row_groups_are_pieces(tmp_path):
    images = _parquet_folder(tmp_path / "pq")
    ds = open_streaming_set(_cfg(tmp_path / "pq", tmp_path), want_labels=True)
    assert len(ds) == 13 and ds.num_pieces == 5  # 3+3+2 and 3+2
    assert sorted(ds.rows(13, SEED, 13, 13).tolist()) == list(range(13))
    batch = ds.gather(torch.arange(13))
    for row in range(13):
        assert np.array_equal(batch.images[row].numpy(), _decode(images[row], ds.cfg))
    assert ds.class_names == ["0", "2"] and batch.labels.tolist() == [(i % 2) for i in range(8)] + [
        (i % 2) for i in range(5)]
    assert ds.row_names([4, 9]) == [f"{ds.files[0]}[row 4]", f"{ds.files[1]}[row 1]"]
    limited = open_streaming_set(_cfg(tmp_path / "pq", tmp_path, max_images=7), want_labels=False)
    assert len(limited) == 7 and sorted(limited.rows(7, SEED, 0, 7).tolist()) == list(range(7))


def test_datasets_parquet_with_image_feature_and_class_names(tmp_path):
    import datasets

    data = [_png(i) for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "fish"])})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in data],
                                     "label": [i % 3 for i in range(6)]}, features=features)
    ds.to_parquet(str(tmp_path / "hf" / "train-0.parquet"))
    streamed = open_streaming_set(_cfg(str(tmp_path / "hf" / "*.parquet"), tmp_path), want_labels=True)
    assert streamed.class_names == ["cat", "dog", "fish"]
    batch = streamed.gather(torch.tensor([5, 1]))
    assert batch.labels.tolist() == [2, 1]
    assert np.array_equal(batch.images[0].numpy(), _decode(data[5], streamed.cfg))


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_shards_are_skipped_and_named(tmp_path, caplog):
    _tar_shards(tmp_path / "s", counts=(4, 3))
    (tmp_path / "s" / "zz-not-a-tar.tar").write_bytes(b"this is not a tar file" * 40)
    whole = (tmp_path / "s" / "shard-001.tar").read_bytes()
    (tmp_path / "s" / "zz-truncated.tar").write_bytes(whole[:1600])  # cut inside a member's data
    with caplog.at_level(logging.WARNING, logger="difftrain"):
        ds = open_streaming_set(_cfg(tmp_path / "s", tmp_path), want_labels=False)
    assert len(ds) == 7 and [Path(p).name for p, _ in ds.skipped] == ["zz-not-a-tar.tar", "zz-truncated.tar"]
    assert f"skipped shard {tmp_path / 's' / 'zz-not-a-tar.tar'} (" in caplog.text
    assert "zz-truncated.tar (ReadError: " in caplog.text
    collect = _Collect()  # write_skipped_to replays the lines into this handler alone (train.log)
    ds.write_skipped_to(collect)
    assert len(collect.lines) == 2 and collect.lines[0].startswith("skipped shard ")

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "bad.parquet").write_bytes(b"PAR1 not really" * 10)
    with pytest.raises(ValueError, match=r"data.path = '.*p' \(parquet shards .*\) has no usable shard \(of 1; first"
                                         r" problem: .*bad.parquet: ArrowInvalid"):
        open_streaming_set(_cfg(tmp_path / "p", tmp_path), want_labels=False)


def test_a_sample_that_does_not_decode_is_replaced_and_named(tmp_path, caplog):
    good = [_png(i) for i in range(3)]
    _write_tar(tmp_path / "s" / "a.tar", [("k0.png", good[0]), ("k1.png", b"not a png"), ("k2.png", good[2])])
    ds = open_streaming_set(_cfg(tmp_path / "s", tmp_path), want_labels=False)
    with caplog.at_level(logging.WARNING, logger="difftrain"):
        batch = ds.gather(torch.tensor([1, 0, 1]))
    assert batch.rows.tolist() == [2, 0, 2] and batch.images.shape[0] == 3
    assert np.array_equal(batch.images[0].numpy(), _decode(good[2], ds.cfg))
    assert caplog.text.count("skipped sample") == 1  # named once per process
    assert f"skipped sample {ds.files[0]}:k1 (UnidentifiedImageError" in caplog.text
    _write_tar(tmp_path / "t" / "b.tar", [("k0.png", b"not a png"), ("k1.jpg", b"nor a jpeg")])
    hopeless = open_streaming_set(_cfg(tmp_path / "t", tmp_path), want_labels=False)
    with pytest.raises(ValueError, match=r"no sample of .*b.tar decodes \(first problem: UnidentifiedImageError"):
        hopeless.gather(torch.tensor([0]))
    (tmp_path / "t" / "b.tar").write_bytes(b"gone")
    fresh = pickle.loads(pickle.dumps(hopeless))  # as a spawned worker gets it: nothing opened yet
    with pytest.raises(ValueError, match=r"streamed shard .*b.tar no longer reads \(ReadError"):
        fresh.gather(torch.tensor([0]))


def test_index_cache_is_reused_and_a_changed_shard_reindexed(tmp_path, caplog):
    _tar_shards(tmp_path / "s", counts=(2, 3))
    cfg = _cfg(tmp_path / "s", tmp_path)
    open_streaming_set(cfg, want_labels=False)
    _write_tar(tmp_path / "s" / "shard-001.tar", [(f"n{i}.png", _png(i)) for i in range(5)])  # was 3 samples
    with caplog.at_level(logging.INFO, logger="difftrain"):
        ds = open_streaming_set(cfg, want_labels=False)
    assert len(ds) == 7 and "1 of 2 shards reused" in caplog.text and "1 indexed" in caplog.text


# ------------------------------------------------------------------------------------------------
# which paths stream, and configuration errors


def test_auto_detection(tmp_path):
    _tar_shards(tmp_path / "tars", counts=(1,))
    _parquet_folder(tmp_path / "pq", rows_per_file=(2,))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.tar").write_bytes(b"")
    (tmp_path / "mixed" / "b.png").write_bytes(_png(0))
    assert streamed_kind(str(tmp_path / "tars"), "auto") == "webdataset"
    assert streamed_kind(str(tmp_path / "pq"), "auto") == "parquet"
    assert streamed_kind(str(tmp_path / "tars" / "*.tar"), "auto") == "webdataset"
    assert streamed_kind(str(tmp_path / "pq" / "part-0.parquet"), "auto") == "parquet"
    assert streamed_kind(str(tmp_path / "mixed"), "auto") is None
    assert streamed_kind(str(tmp_path / "tars"), "folder") is None
    assert streamed_kind("owner/name", "auto", streaming=True) == "hub"
    assert streamed_kind("owner/name", "auto") is None and streamed_kind("digits", "auto", streaming=True) is None
    assert open_streaming_set(_cfg("digits", tmp_path), want_labels=False) is None
    with pytest.raises(ValueError, match="is a set of webdataset shards: it is streamed"):
        open_source(str(tmp_path / "tars"), "auto", "train", "image", None, False)


def test_configuration_errors_are_one_line(tmp_path):
    _parquet_folder(tmp_path / "pq", rows_per_file=(2,))
    (tmp_path / "empty").mkdir()
    cases = [
        (_cfg(tmp_path / "empty", tmp_path, source="webdataset"), FileNotFoundError, "no .tar files there"),
        (_cfg(tmp_path / "nowhere", tmp_path, source="parquet"), FileNotFoundError, "no such folder or file"),
        (_cfg(tmp_path / "pq", tmp_path, image_column="img"), ValueError, "has no image column 'img' .data.image_column"),
        (_cfg(tmp_path / "empty", tmp_path, streaming=True), ValueError, "data.streaming = true needs a hub id"),
    ]
    for cfg, error, message in cases:
        with pytest.raises(error, match=message) as info:
            open_streaming_set(cfg, want_labels=False)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no label column 'kind' .data.label_column"):
        open_streaming_set(_cfg(tmp_path / "pq", tmp_path, label_column="kind"), want_labels=True)
    cfg = RunConfig()
    cfg.data.streaming, cfg.data.source = True, "folder"
    assert any("'data.streaming' = true" in p for p in check_config(cfg))


def test_hub_split_files():
    converted = ["default/train/0000.parquet", "default/train/0001.parquet", "default/test/0000.parquet",
                 "other/train/0000.parquet"]
    assert hub_split_files(converted, "train") == ["default/train/0000.parquet", "default/train/0001.parquet"]
    assert hub_split_files(["plain_text/partial-train/0000.parquet"], "train") == [
        "plain_text/partial-train/0000.parquet"]
    main = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/test-00000-of-00001.parquet"]
    assert hub_split_files(main, "test") == ["data/test-00000-of-00001.parquet"]
    assert hub_split_files(["cifar10/cifar10-train.parquet"], "train") == ["cifar10/cifar10-train.parquet"]
    assert hub_split_files(main, "validation") == []
