"""Streamed training data (webdataset tar shards, parquet row groups), built here from scikit-learn digits, trained
through the loader on 2 ranks: the same batches as 1 rank with accumulation 2, an exact resume after a crash, and
every sample once per epoch across the ranks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.data.order import stream_position
from difftrain.families import family_for
from difftrain.training.loop import train

pytestmark = pytest.mark.integration

PRESET = "tiny/digits-class"
PER_RANK = ["train.batch_size=4", "train.sample_every_steps=null", "data.max_images=null"]
TIMEOUT_S = 300
FIRST_LOSS_REL, LOSS_REL, WEIGHT_ATOL = 1e-6, 1e-5, 1e-6  # as in test_distributed.py: all-reduce vs accumulation


def _digits(count: int) -> tuple[list[bytes], list[int]]:
    """The first `count` scikit-learn digits as 8x8 grayscale PNG files, and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pngs = []
    for pixels in np.clip(bunch.images[:count] * (255.0 / 16.0), 0, 255).round().astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs, [int(x) for x in bunch.target[:count]]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar_shards(folder: Path, sizes: list[int]) -> Path:
    """webdataset layout: KEY.png + KEY.cls per sample, shards of uneven size."""
    folder.mkdir(parents=True)
    pngs, labels = _digits(sum(sizes))
    at = 0
    for shard, size in enumerate(sizes):
        with tarfile.open(folder / f"digits-{shard:03d}.tar", "w") as tar:
            for i in range(at, at + size):
                _add(tar, f"sample{i:05d}.png", pngs[i])
                _add(tar, f"sample{i:05d}.cls", str(labels[i]).encode())
        at += size
    return folder


def write_parquet(folder: Path, sizes: list[int], row_group_rows: int) -> Path:
    """One parquet file per entry of `sizes`, with a datasets-style image column {bytes, path} and int labels."""
    folder.mkdir(parents=True)
    pngs, labels = _digits(sum(sizes))
    at = 0
    for part, size in enumerate(sizes):
        table = pa.table({"image": [{"bytes": b, "path": None} for b in pngs[at:at + size]],
                          "label": pa.array(labels[at:at + size], pa.int64())})
        pq.write_table(table, folder / f"train-{part:05d}.parquet", row_group_size=row_group_rows)
        at += size
    return folder


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "", **(extra or {})}


def _two_ranks(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "difftrain", "train", PRESET, "--num-processes", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=TIMEOUT_S)


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _unet(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def _one_rank_accumulating(data: Path, out: Path, *extra: str) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the ranks: thread count changes the order of sums
    try:
        return train(load_config(PRESET, [*PER_RANK, f"data.path={data}", "train.gradient_accumulation_steps=2",
                                          *extra], output_dir=str(out)))
    finally:
        torch.set_num_threads(threads)


def _assert_same_training(two: Path, one: Path) -> None:
    a, b = _losses(two), _losses(one)
    assert len(a) == len(b) == 4
    assert a[0] == pytest.approx(b[0], rel=FIRST_LOSS_REL)
    assert a == pytest.approx(b, rel=LOSS_REL)
    x, y = _unet(two), _unet(one)
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=0, atol=WEIGHT_ATOL, msg=key)


def test_each_sample_once_per_epoch_across_two_ranks(tmp_path: Path):
    data = write_tar_shards(tmp_path / "shards", [7, 5, 9, 3])
    family = family_for(load_config(PRESET, [*PER_RANK, f"data.path={data}"]))
    family.load_data()
    total = len(family.dataset)
    assert total == 24
    for epoch in range(2):
        seen = []
        for step in range(epoch * 3, epoch * 3 + 3):  # 2 ranks x 4 = 8 per step, 3 steps an epoch
            for rank in range(2):
                seen += family.rows(stream_position(step, 0, rank, 1, 2, 4), 4).tolist()
        assert sorted(seen) == list(range(total)), epoch


def test_tar_shards_on_two_ranks_match_one_rank_and_resume_exactly_after_a_crash(tmp_path: Path):
    data = write_tar_shards(tmp_path / "shards", [11, 6, 9, 14])
    run = tmp_path / "two"
    crashed = _two_ranks(tmp_path, "--output-dir", str(run), *PER_RANK, f"data.path={data}",
                         env={"DIFFTRAIN_FAIL_ON_RANK": "1", "DIFFTRAIN_FAIL_AT_STEP": "3"})
    assert crashed.returncode != 0 and "injected failure on rank 1 at step 3" in crashed.stderr
    resumed = _two_ranks(tmp_path, "--output-dir", str(run), *PER_RANK, f"data.path={data}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    log = (run / "train.log").read_text()
    assert "(step 2)" in log and "worker process" in log
    _assert_same_training(run, _one_rank_accumulating(data, tmp_path / "one"))


def test_parquet_row_groups_on_two_ranks_match_one_rank_which_resumes_bit_exactly(tmp_path: Path):
    data = write_parquet(tmp_path / "parquet", [20, 13], row_group_rows=6)
    run = tmp_path / "two"
    result = _two_ranks(tmp_path, "--output-dir", str(run), *PER_RANK, f"data.path={data}")
    assert result.returncode == 0, result.stderr[-4000:]
    one = _one_rank_accumulating(data, tmp_path / "one")
    _assert_same_training(run, one)
    stopped = tmp_path / "stopped"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(PRESET, [*PER_RANK, f"data.path={data}", "train.gradient_accumulation_steps=2"],
                          output_dir=str(stopped))
        train(cfg, stop_at_step=1)
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert _losses(stopped) == _losses(one)
    x, y = _unet(stopped), _unet(one)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_bad_shard_is_named_by_check_and_skipped_by_training(tmp_path: Path, caplog):
    from difftrain.training.preflight import run_check

    data = write_tar_shards(tmp_path / "shards", [10, 12])
    (data / "digits-002.tar").write_bytes(b"not a tar file at all" * 50)
    cfg = load_config(PRESET, [*PER_RANK, f"data.path={data}"], output_dir=str(tmp_path / "r"))
    lines: list[str] = []
    assert run_check(cfg, out=lines.append) == 1  # the bad shard is an error of the check
    text = "\n".join(lines)
    assert "digits-002.tar: unreadable shard" in text and "22 usable" in text and "loader:" in text
    with caplog.at_level("INFO", logger="difftrain"):
        run = train(cfg)
    assert "skipped shard" in caplog.text and "digits-002.tar" in caplog.text
    assert "22 images (1 skipped)" in (run / "train.log").read_text()


def test_evaluation_references_a_sample_of_a_stream_held_in_memory(tmp_path: Path):
    from difftrain.evaluation.evaluate import prepare_reference

    data = write_tar_shards(tmp_path / "shards", [7, 9])
    cfg = load_config(PRESET, [*PER_RANK, f"data.path={data}"])
    a = prepare_reference(cfg.data, 12, True, use_inception=False, use_classifier=False)
    b = prepare_reference(cfg.data, 12, True, use_inception=False, use_classifier=False)
    assert a.images.shape == (12, 1, 8, 8) and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    pngs, labels = _digits(16)
    originals = {tuple(np.asarray(Image.open(io.BytesIO(png))).ravel()): label for png, label in zip(pngs, labels)}
    for image, label in zip(a.images, a.labels):  # each is one of the set's digits, with its own label
        assert originals[tuple(image[0].numpy().ravel())] == int(label)


def test_families_that_read_the_whole_set_up_front_refuse_a_stream_in_one_line(tmp_path: Path):
    data = write_tar_shards(tmp_path / "shards", [5])
    with pytest.raises(ValueError, match=r"is streamed \(webdataset shards\), but the pixel-text family"):
        train(load_config("tiny/digits-text", [f"data.path={data}"], output_dir=str(tmp_path / "t")))
    assert not (tmp_path / "t").exists()  # refused before anything was written
