"""Runs that survive kill -9, bad numerics, bad files and unsafe resumes (issue 7), on tiny real models."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.training.checkpoint import list_checkpoints
from difftrain.training.numerics import INJECT_ENV, INJECT_TIMES_ENV, NonFiniteError
from difftrain.training.loop import train
from tests.integration.test_cli import run_cli

pytestmark = pytest.mark.integration

UNET = Path("unet") / "diffusion_pytorch_model.safetensors"


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def test_sigkill_mid_run_then_same_command_gives_identical_weights(tmp_path: Path):
    """kill -9 after two checkpoints, damage the newest one and leave a half-written one behind: the
    same command reports the damage, resumes from the checkpoint before it and ends bit-identical."""
    overrides = ["train.max_steps=60", "train.checkpoint_every_steps=4", "train.checkpoints_total_limit=null",
                 "train.sample_every_steps=null", "sample.num_inference_steps=1", "train.log_every_steps=5"]
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "difftrain", "train", "tiny/digits-class", "--output-dir", str(run), *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(list_checkpoints(run / "checkpoints")) < 2:
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoints appeared"
            time.sleep(0.02)
        assert proc.poll() is None, "the kill must land mid-run"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model_index.json").exists()
    found = list_checkpoints(run / "checkpoints")
    (newest_step, newest), (previous_step, previous) = found[-1], found[-2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # e.g. a disk that lied about fsync
    stale = run / "checkpoints" / f".tmp-step-{newest_step + 4:06d}"  # a kill during a checkpoint write
    stale.mkdir(exist_ok=True)
    (stale / "model.safetensors").write_bytes(b"partial")

    resumed = run_cli("train", "tiny/digits-class", "--output-dir", str(run), *overrides, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint {newest} could not be loaded" in resumed.stderr
    assert f"resumed from {previous} (step {previous_step})" in resumed.stderr
    assert "removing incomplete checkpoint" in resumed.stderr and not stale.exists()

    straight = train(load_config("tiny/digits-class", overrides, output_dir=str(tmp_path / "straight")))
    _assert_same_tensors(load_file(straight / UNET), load_file(run / UNET), "exported EMA unet")
    last = f"step-{60:06d}"
    _assert_same_tensors(load_file(straight / "checkpoints" / last / "model.safetensors"),
                         load_file(run / "checkpoints" / last / "model.safetensors"), "raw weights at step 60")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 61, 5))  # rows of the redone steps were trimmed, none is doubled


NAN_OVERRIDES = ["train.max_steps=8", "train.checkpoint_every_steps=2", "train.nonfinite_max_skips=3",
                 "train.nonfinite_max_rollbacks=1", "train.nonfinite_remedy=lower_lr", "sample.num_inference_steps=1"]


def test_nan_steps_are_skipped_then_rolled_back_then_stop(tmp_path: Path, monkeypatch, caplog):
    """A batch that is non-finite on every replay: 3 skips, a rollback with half the LR, 3 skips, stop."""
    caplog.set_level(logging.INFO, logger="difftrain")  # as the CLI does; train.log then has the INFO lines
    monkeypatch.setenv(INJECT_ENV, "3,4,5")
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteError) as info:
        train(load_config("tiny/digits-class", NAN_OVERRIDES, output_dir=str(run)))
    message = str(info.value)
    assert "training stopped at step 5" in message and "3 consecutive steps (3, 4, 5)" in message
    assert "rolled back to step-000002, learning rate x0.5" in message
    assert "Batch of step 5: digits[" in message  # digits has no files: rows are named by index
    log = (run / "train.log").read_text()
    assert "non-finite loss/gradient policy: skip the step" in log and "at most 1 time(s)" in log
    for step in (3, 4, 5):
        assert f"step {step}: non-finite loss or gradient (loss nan, gradient norm nan); step skipped" in log
    assert "rollback 1 at step 5 after 3 non-finite steps: rolled back to step-000002" in log
    assert log.index("rollback 1 at step 5") < log.rindex("step 3: non-finite")  # step 3 was replayed
    assert "ERROR difftrain.training.numerics: training stopped at step 5" in log
    # No periodic checkpoint was written inside the streak, and nothing was exported.
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    assert not (run / "model_index.json").exists()


def test_transient_nan_is_skipped_not_applied_and_recovers_after_rollback(tmp_path: Path, monkeypatch):
    straight = train(load_config("tiny/digits-class", NAN_OVERRIDES, output_dir=str(tmp_path / "straight")))
    monkeypatch.setenv(INJECT_ENV, "3,4,5")
    monkeypatch.setenv(INJECT_TIMES_ENV, "1")  # a transient fault: the replay after the rollback is clean
    run = train(load_config("tiny/digits-class", NAN_OVERRIDES, output_dir=str(tmp_path / "nan")))
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    reference = {r["step"]: r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == list(range(1, 9)) and rows[8]["skipped_steps"] == 3
    assert all(np.isfinite(rows[s]["loss"]) for s in rows)  # the NaN rows were trimmed by the rollback
    # Steps 1-2 are untouched; from the rollback on, the whole schedule runs at half the learning rate.
    assert rows[2]["loss"] == reference[2]["loss"]
    for step in range(3, 9):
        assert rows[step]["lr"] == pytest.approx(reference[step]["lr"] * 0.5)
    weights = load_file(run / UNET)
    assert all(torch.isfinite(w).all() for w in weights.values())
    progress = json.loads((run / "checkpoints" / "step-000008" / "progress.json").read_text())
    assert progress["numerics"]["rollbacks"] == 1 and progress["numerics"]["lr_scale"] == 0.5
    assert "learning rate x0.5" in progress["numerics"]["actions"][0]


def test_raised_precision_really_trains_in_fp32_and_survives_resume(tmp_path: Path, monkeypatch, caplog):
    """bf16 run, NaN at steps 3-5 once: the rollback to step 2 raises the precision to fp32. Steps 3-8 must
    then be bit-identical to a bf16 run stopped at step 2 and resumed with mixed_precision=no."""
    caplog.set_level(logging.INFO, logger="difftrain")
    overrides = ["train.max_steps=8", "train.checkpoint_every_steps=2", "train.checkpoints_total_limit=null",
                 "train.mixed_precision=bf16", "sample.num_inference_steps=1"]
    reference = tmp_path / "reference"
    train(load_config("tiny/digits-class", overrides, output_dir=str(reference)), stop_at_step=2)
    train(load_config("tiny/digits-class", [*overrides, "train.mixed_precision='no'"], output_dir=str(reference)))
    monkeypatch.setenv(INJECT_ENV, "3,4,5")
    monkeypatch.setenv(INJECT_TIMES_ENV, "1")
    run = train(load_config("tiny/digits-class", overrides, output_dir=str(tmp_path / "nan")))
    assert "rolled back to step-000002, precision raised to fp32" in (run / "train.log").read_text()
    for step in (6, 8):
        name = f"step-{step:06d}"
        _assert_same_tensors(load_file(reference / "checkpoints" / name / "model.safetensors"),
                             load_file(run / "checkpoints" / name / "model.safetensors"), f"weights at {name}")
    assert json.loads((run / "checkpoints" / "step-000008" / "progress.json").read_text())["numerics"]["precision"] == "no"
    # A resume keeps the raised precision: still identical to the fp32 reference two steps later.
    train(load_config("tiny/digits-class", [*overrides, "train.max_steps=10"], output_dir=str(run)))
    train(load_config("tiny/digits-class", [*overrides, "train.mixed_precision='no'", "train.max_steps=10"],
                      output_dir=str(reference)))
    assert "keeping precision fp32 from the checkpoint" in (run / "train.log").read_text()
    _assert_same_tensors(load_file(reference / "checkpoints" / "step-000010" / "model.safetensors"),
                         load_file(run / "checkpoints" / "step-000010" / "model.safetensors"), "weights at step 10")


def test_a_skipped_step_advances_neither_the_schedule_nor_the_ema(tmp_path: Path, monkeypatch):
    overrides = ["train.max_steps=4", "train.checkpoint_every_steps=4", "sample.num_inference_steps=1"]
    straight = train(load_config("tiny/digits-class", overrides, output_dir=str(tmp_path / "straight")))
    monkeypatch.setenv(INJECT_ENV, "2")
    run = train(load_config("tiny/digits-class", overrides, output_dir=str(tmp_path / "nan")))
    a, b = straight / "checkpoints" / "step-000004", run / "checkpoints" / "step-000004"
    assert torch.load(a / "scheduler.bin", weights_only=True)["last_epoch"] == 4
    assert torch.load(b / "scheduler.bin", weights_only=True)["last_epoch"] == 3
    assert torch.load(a / "custom_checkpoint_0.pkl", weights_only=True)["optimization_step"] == 4
    assert torch.load(b / "custom_checkpoint_0.pkl", weights_only=True)["optimization_step"] == 3
    adam = torch.load(b / "optimizer.bin", weights_only=True)["state"]
    assert all(int(s["step"]) == 3 for s in adam.values())  # AdamW applied 3 of 4 steps
    assert "step 2: non-finite loss or gradient" in (run / "train.log").read_text()


def _png_bytes(array: np.ndarray, path: Path, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def make_bad_folder(root: Path) -> dict[str, list[Path]]:
    """Class folders holding one file of every kind `difftrain check` knows, plus good images."""
    rng = np.random.default_rng(0)
    good, mixed, empty = root / "good", root / "mixed", root / "empty_class"
    for folder in (good, mixed, empty):
        folder.mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    for i in range(6):
        _png_bytes(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), good / f"ok{i}.png")
    zero = mixed / "zero.png"
    zero.write_bytes(b"")
    full = _png_bytes(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), mixed / "whole.png")
    truncated = mixed / "truncated.png"
    truncated.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    full.unlink()
    fake = mixed / "fake.jpg"
    fake.write_text("this is a text file with an image extension\n")
    cmyk = mixed / "cmyk.jpg"
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(cmyk)
    sixteen = mixed / "sixteen.png"
    Image.fromarray((rng.integers(0, 65535, (20, 20))).astype(np.uint16)).save(sixteen)
    alpha = _png_bytes(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), mixed / "alpha.png")
    palette = mixed / "palette.png"
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("P").save(palette)
    tiny = _png_bytes(rng.integers(0, 255, (3, 3, 3), dtype=np.uint8), mixed / "tiny.png")
    huge = _png_bytes(rng.integers(0, 255, (20, 9000, 3), dtype=np.uint8), mixed / "huge.png")
    return {
        "errors": [zero, truncated, fake, empty],
        "warnings": [cmyk, sixteen, alpha, palette, tiny, huge],
        "skipped": [zero, truncated, fake],
    }


def test_check_lists_every_bad_file_and_train_skips_them(tmp_path: Path):
    data = tmp_path / "data"
    kinds = make_bad_folder(data)
    checked = run_cli("check", "tiny/folder-uncond", f"data.path={data}", cwd=tmp_path)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    expected = {"zero.png": "ERROR   {}: zero-byte file", "truncated.png": "ERROR   {}: truncated",
                "fake.jpg": "ERROR   {}: not an image", "empty_class": "ERROR   {}: empty label folder",
                "cmyk.jpg": "WARNING {}: CMYK", "sixteen.png": "WARNING {}: high bit depth",
                "alpha.png": "WARNING {}: alpha", "palette.png": "WARNING {}: palette",
                "tiny.png": "WARNING {}: tiny", "huge.png": "WARNING {}: huge"}
    for path in kinds["errors"] + kinds["warnings"]:
        prefix = expected[path.name].format(path)
        assert any(line.startswith(prefix) for line in lines), f"{prefix!r} not in:\n{checked.stdout}"
    assert not any("ok0.png" in line for line in lines)  # good files are not reported
    assert "15 items scanned" in checked.stdout and "12 usable, 4 error(s)" in checked.stdout
    assert "6 warning(s)" in checked.stdout and "images/s" in checked.stdout and "peak" in checked.stdout
    assert "check: FAILED (4 error(s), 6 warning(s))" in checked.stdout

    run = tmp_path / "run"
    trained = run_cli("train", "tiny/folder-uncond", "--output-dir", str(run), f"data.path={data}",
                      "train.max_steps=2", "sample.num_images=1", "sample.num_inference_steps=1", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    for path in kinds["skipped"]:
        assert f"skipped {path} (" in trained.stderr
    assert "skipped 3 of 15 images" in trained.stderr
    log = (run / "train.log").read_text()
    for path in kinds["skipped"]:  # decoded before train.log existed, and still named in it
        assert log.count(f"skipped {path} (") == 1
    assert "12 images (3 skipped)" in log
    assert "3 file(s) skipped" in (run / "README.md").read_text()


def test_dangling_links_and_oversized_images_are_reported_and_named_in_train_log(tmp_path: Path):
    """Issue 16: a link that points nowhere and an image over data.max_image_pixels are never dropped silently."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        _png_bytes(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), data / f"ok{i}.png")
    link = data / "moved.png"
    link.symlink_to(tmp_path / "elsewhere" / "moved.png")
    big = _png_bytes(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8), data / "big.png")
    limit = "data.max_image_pixels=50000"
    too_large = "300x200 px = 60,000 pixels is over data.max_image_pixels = 50,000"

    checked = run_cli("check", "tiny/folder-uncond", f"data.path={data}", limit, "--no-step", cwd=tmp_path)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    target = tmp_path / "elsewhere" / "moved.png"
    assert f"ERROR   {link}: dangling link: it points to {target}, which does not exist" in lines
    assert any(line.startswith(f"ERROR   {big}: too large: {too_large}") for line in lines), checked.stdout
    assert "8 items scanned" in checked.stdout and "6 usable, 2 error(s)" in checked.stdout

    run = train(load_config("tiny/folder-uncond", [f"data.path={data}", limit, "train.max_steps=2",
                                                   "sample.num_images=1", "sample.num_inference_steps=1"],
                            output_dir=str(tmp_path / "run")))
    log = (run / "train.log").read_text()
    assert log.count(f"skipped {link} (dangling link: it points to") == 1
    assert log.count(f"skipped {big} (ImageTooLarge: {too_large}") == 1
    assert "skipped 2 of 8 images" in log
    assert "2 file(s) skipped (unreadable, too large, dangling links" in (run / "README.md").read_text()


def test_resume_with_a_changed_model_shape_is_refused_with_the_key_diff(tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="difftrain")
    run = tmp_path / "run"
    train(load_config("tiny/digits-class", output_dir=str(run)), stop_at_step=2)
    before = sorted(p.name for p in run.rglob("*"))
    changed = load_config("tiny/digits-class", ["model.unet.block_out_channels=[8,32]", "data.max_images=128",
                                                "train.max_steps=6"], output_dir=str(run))
    with pytest.raises(ValueError) as info:
        train(changed)
    text = str(info.value)
    assert f"refusing to resume {run / 'checkpoints' / 'step-000002'}" in text
    assert "model.unet: {" in text and "'block_out_channels': [8, 16]" in text and "'block_out_channels': [8, 32]" in text
    assert "data.max_images: 256 -> 128" in text
    assert "max_steps" not in text  # a safe change is not part of the refusal
    assert sorted(p.name for p in run.rglob("*")) == before  # refused before anything was written

    from difftrain.cli import main

    assert main(["check", "tiny/digits-class", "--output-dir", str(run), "--no-step",
                 "model.unet.block_out_channels=[8,32]"]) == 1
    safe = train(load_config("tiny/digits-class", ["train.max_steps=6"], output_dir=str(run)))
    assert "config change on resume: train.max_steps: 4 -> 6" in (safe / "train.log").read_text()
    assert (safe / "model_index.json").is_file()
