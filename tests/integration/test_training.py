"""Training-loop behaviour on tiny models: epoch intervals, mixed precision, EMA export, hub-format data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.training.loop import train

pytestmark = pytest.mark.integration


def test_epoch_intervals_and_num_epochs(tmp_path: Path):
    # 32 images, batch 8 -> 4 steps per epoch; 2 epochs = 8 steps.
    cfg = load_config("tiny/digits-class", [
        "data.max_images=32", "train.max_steps=null", "train.num_epochs=2",
        "train.checkpoint_every_steps=null", "train.checkpoint_every_epochs=1",
        "train.sample_every_steps=null", "train.sample_every_epochs=1", "train.checkpoints_total_limit=null",
    ], output_dir=str(tmp_path / "run"))
    run = train(cfg)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000004.png", "step-000008.png"]
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 8 and last["epoch"] == pytest.approx(2.0)


def test_bf16_autocast_trains_on_cpu(tmp_path: Path):
    run = train(load_config("tiny/digits-class", ["train.mixed_precision=bf16", "train.max_steps=2"],
                            output_dir=str(tmp_path / "run")))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # Master weights stay fp32 under autocast.
    weights = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_export_holds_the_ema_weights(tmp_path: Path):
    run = train(load_config("tiny/digits-class", output_dir=str(tmp_path / "run")))
    from diffusers import UNet2DModel

    exported = UNet2DModel.from_pretrained(str(run / "unet"))
    raw = load_file(run / "checkpoints" / "step-000004" / "model.safetensors")
    ema = torch.load(run / "checkpoints" / "step-000004" / "custom_checkpoint_0.pkl", weights_only=True)
    named = list(exported.named_parameters())
    assert len(ema["shadow_params"]) == len(named)
    # EMAModel keeps its shadow copies in the order of model.parameters().
    for (name, value), ema_value in zip(named, ema["shadow_params"]):
        assert torch.equal(value.detach(), ema_value), name
    assert any(not torch.equal(value.detach(), raw[name]) for name, value in named), "EMA should differ from raw"


def test_no_ema_exports_the_trained_weights(tmp_path: Path):
    run = train(load_config("tiny/digits-class", ["train.use_ema=false", "train.max_steps=2"],
                            output_dir=str(tmp_path / "run")))
    exported = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    raw = load_file(run / "checkpoints" / "step-000002" / "model.safetensors")
    assert all(torch.equal(exported[k], raw[k]) for k in exported)


def test_class_conditional_training_from_a_saved_datasets_folder(tmp_path: Path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)) for _ in range(12)]
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["cat", "dog", "owl"])})
    ds = datasets.Dataset.from_dict({"img": images, "kind": [i % 3 for i in range(12)]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = load_config("tiny/digits-class", [
        f"data.path={tmp_path / 'ds'}", "data.image_column=img", "data.label_column=kind", "data.channels=3",
        "data.max_images=null", "train.max_steps=1",
    ], output_dir=str(tmp_path / "run"))
    run = train(cfg)
    index = json.loads((run / "model_index.json").read_text())
    assert index["class_names"] == ["cat", "dog", "owl"]
    assert json.loads((run / "unet" / "config.json").read_text())["num_class_embeds"] == 4


def test_default_is_auto_and_a_finished_run_saves_the_resolved_value(tmp_path: Path):
    import yaml

    from difftrain.config import TrainConfig
    from difftrain.training.precision import precision_candidates

    assert TrainConfig().mixed_precision == "auto"
    run = train(load_config("tiny/digits-class", ["train.max_steps=1", "sample.num_inference_steps=1"],
                            output_dir=str(tmp_path / "run")))
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]["mixed_precision"]
    assert saved in precision_candidates(torch.device("cpu"))  # the choice, never "auto"
