"""Exact resume: 4 steps straight == 2 steps, stop, resume, 2 more steps (bit-identical on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.training.loop import train

pytestmark = pytest.mark.integration


def _losses(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows]


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("preset, extra", [
    ("tiny/digits-class", []),
    # gradient accumulation, random flips and offset noise on RGB folder data
    ("tiny/folder-uncond", []),
    # text conditioning with a trained from-scratch encoder (saved as a second model) and caption dropout
    ("tiny/digits-text", []),
    # captions that vary per step (a prefix, shuffled and dropped tags), tokenized in the step
    ("tiny/digits-text", ["data.caption_template=digit {label}, handwritten, small, gray", "data.caption_prefix=sks",
                          "data.shuffle_tags=true", "data.keep_tokens=1", "data.tag_dropout=0.3"]),
    # flow matching: class conditioning, logit-normal times, the resolution shift
    ("tiny/digits-flow", []),
    # flow matching with SD3's mode density and cosmap weighting, accumulation, flips and offset noise
    ("tiny/folder-uncond", ["diffusion.objective=flow_matching", "diffusion.timestep_sampling=mode",
                            "diffusion.loss_weighting=cosmap", "sample.scheduler=heun"]),
])
def test_resume_is_bit_identical(tmp_path: Path, preset: str, extra: list[str], flowers_dir: Path):
    overrides = [*extra, "train.checkpoints_total_limit=null"]
    if preset == "tiny/folder-uncond":
        overrides.append(f"data.path={flowers_dir / 'daisy'}")
    straight = train(load_config(preset, overrides, output_dir=str(tmp_path / "straight")))
    resumed_dir = str(tmp_path / "resumed")
    train(load_config(preset, overrides, output_dir=resumed_dir), stop_at_step=2)
    assert not (Path(resumed_dir) / "model_index.json").exists(), "an interrupted run must not export"
    resumed = train(load_config(preset, overrides, output_dir=resumed_dir))

    # Same data order, noise and LR at every step: identical per-step losses and learning rates.
    assert _losses(straight) == _losses(resumed)
    assert [s for s, _, _ in _losses(resumed)] == [1, 2, 3, 4]

    a, b = straight / "checkpoints" / "step-000004", resumed / "checkpoints" / "step-000004"
    for weights in sorted(p.name for p in a.glob("model*.safetensors")):  # UNet, and a trained text encoder
        _assert_same(load_file(a / weights), load_file(b / weights), weights)
    for name in ("optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl"):  # AdamW, LR schedule, EMA
        _assert_same(torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True), name)
    _assert_same(
        load_file(straight / "unet" / "diffusion_pytorch_model.safetensors"),
        load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors"),
        "exported EMA unet",
    )
    progress = json.loads((b / "progress.json").read_text())
    assert progress["step"] == 4 and progress["images_seen"] == 4 * progress["config"]["train"]["batch_size"] * progress["config"]["train"]["gradient_accumulation_steps"]


# Golden losses of the first 4 steps of tiny/digits-class (seed 0). They pin the whole training
# path (data order, noise, timesteps, loss weighting, optimizer). Regenerate only after a deliberate
# change, from runs/<dir>/metrics.jsonl of `difftrain train tiny/digits-class --output-dir <dir>`.
GOLDEN_LOSSES = [0.36108654737472534, 0.501179039478302, 0.3064388632774353, 0.3225298523902893]


def test_golden_losses(tmp_path: Path):
    run = train(load_config("tiny/digits-class", output_dir=str(tmp_path / "run")))
    losses = [loss for _, loss, _ in _losses(run)]
    assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-4)
