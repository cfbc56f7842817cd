"""Aspect-ratio buckets and loss masks end to end: bucketed (and masked) runs resume bit for bit, pixel and latent;
the bad-input refusals are one line before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.training.loop import train

from .test_cli import run_cli

pytestmark = pytest.mark.integration

SIZES = [(20, 40), (24, 48), (18, 36), (48, 24), (60, 30), (40, 20), (30, 30), (17, 17), (25, 24), (41, 10)]


def _mixed_folder(root: Path, classes: tuple[str, ...] = ("",), masks: bool = False) -> Path:
    """Portrait, landscape and square PNGs (in class subfolders when `classes` name them); with `masks`, every other
    image has a NAME.mask.png that trains its left half."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, (w, h) in enumerate(SIZES):
            base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8) // (2 if c else 1)
            Image.fromarray(base).save(folder / f"img{i}.png")
            if masks and i % 2 == 0:
                mask = np.zeros((h, w), dtype=np.uint8)
                mask[:, : w // 2] = 255
                Image.fromarray(mask).save(folder / f"img{i}.mask.png")
    return root


def _same_weights(a: Path, b: Path, name: str) -> None:
    wa, wb = load_file(a / name), load_file(b / name)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_bucketed_masked_pixel_run_resumes_exactly(tmp_path: Path):
    data = _mixed_folder(tmp_path / "mixed", masks=True)
    overrides = [f"data.path={data}", "data.buckets=auto", "train.checkpoints_total_limit=null"]
    straight = train(load_config("tiny/folder-uncond", overrides, output_dir=str(tmp_path / "straight")))
    resumed_dir = str(tmp_path / "resumed")
    train(load_config("tiny/folder-uncond", overrides, output_dir=resumed_dir), stop_at_step=2)
    resumed = train(load_config("tiny/folder-uncond", overrides, output_dir=resumed_dir))
    _same_weights(straight / "unet", resumed / "unet", "diffusion_pytorch_model.safetensors")
    losses = _losses(straight)
    assert losses and all(np.isfinite(loss) for _, loss in losses)
    assert losses == _losses(resumed)


def test_bucketed_latent_run_from_scratch_resumes_exactly(tmp_path: Path):
    """mini-sd (VAE stage on the square view, then latents cached per bucket), labels from class folders."""
    data = _mixed_folder(tmp_path / "mixed", classes=("cat", "dog"))
    overrides = [f"data.path={data}", "data.max_images=null", "data.buckets=auto", "data.random_flip=true",
                 "train.checkpoints_total_limit=null"]
    straight = train(load_config("tiny/mini-sd", overrides, output_dir=str(tmp_path / "straight")))
    resumed_dir = str(tmp_path / "resumed")
    train(load_config("tiny/mini-sd", overrides, output_dir=resumed_dir), stop_at_step=2)
    resumed = train(load_config("tiny/mini-sd", overrides, output_dir=resumed_dir))
    _same_weights(straight / "unet", resumed / "unet", "diffusion_pytorch_model.safetensors")
    assert _losses(straight) == _losses(resumed)


def test_bad_buckets_and_masks_are_refused_in_one_line_before_any_model(tmp_path: Path):
    data = _mixed_folder(tmp_path / "mixed")
    out = tmp_path / "runs" / "bad"
    # folder-uncond's 2-level UNet takes sides that are multiples of 2
    result = run_cli("train", "tiny/folder-uncond", "--output-dir", str(out), f"data.path={data}",
                     "data.buckets=[16x16, 15x16]", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert "data.buckets entry '15x16'" in lines[0] and "multiples of 2" in lines[0]
    assert not out.exists()
    Image.fromarray(np.zeros((12, 12), dtype=np.uint8)).save(data / "img3.mask.png")  # img3 is 48x24
    result = run_cli("train", "tiny/folder-uncond", "--output-dir", str(out), f"data.path={data}", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert "img3.mask.png is 12x12 px" in lines[0] and "img3.png is 48x24 px" in lines[0]
    assert not out.exists()
    # a DiT that unpatchifies squares only
    result = run_cli("train", "tiny/folder-uncond", "--output-dir", str(out), f"data.path={data}",
                     "data.buckets=auto", "model.backbone=dit", "model.size=tiny", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "square inputs only" in lines[0], result.stderr


def test_check_prints_the_bucket_histogram(tmp_path: Path):
    data = _mixed_folder(tmp_path / "mixed")
    result = run_cli("check", "tiny/folder-uncond", "--output-dir", str(tmp_path / "r"), f"data.path={data}",
                     "data.buckets=[16x16, 24x12, 12x24]", "--no-step", cwd=tmp_path)
    assert "bucket 12x24: 3 images" in result.stdout and "bucket 24x12: 4 images" in result.stdout, result.stdout
    assert "bucket 16x16: 3 images" in result.stdout  # 41x10 goes to 24x12
