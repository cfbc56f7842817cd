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


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_channels_last_changes_the_memory_layout_not_the_math(tmp_path: Path):
    common = ["train.max_steps=2", "train.mixed_precision=no", "sample.num_inference_steps=1"]
    plain = train(load_config("tiny/digits-class", common, output_dir=str(tmp_path / "plain")))
    last = train(load_config("tiny/digits-class", common + ["train.channels_last=true"],
                             output_dir=str(tmp_path / "channels-last")))
    assert _losses(last) == pytest.approx(_losses(plain), rel=1e-4)
    # The export is an ordinary diffusers folder with the same tensors (saved contiguous).
    a = load_file(plain / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(last / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5, msg=name)


def test_compile_is_in_place_so_parameter_names_stay_plain(tmp_path: Path):
    from difftrain.families import family_for
    from difftrain.training.setup import build_trainables, make_accelerator, plan_run

    cfg = load_config("tiny/digits-class", ["train.compile=true", "train.mixed_precision=no"],
                      output_dir=str(tmp_path / "run"))
    accelerator = make_accelerator(cfg, tmp_path / "run")
    family = family_for(cfg)
    parts = build_trainables(cfg, family, plan_run(cfg, family).max_steps, accelerator)
    unet = accelerator.unwrap_model(parts.network)
    # nn.Module.compile() wraps the module's call, not the module: no OptimizedModule, no "_orig_mod."
    # prefixes in checkpoints, the EMA or the export. (Compilation itself happens at the first call.)
    assert unet._compiled_call_impl is not None
    assert type(unet).__name__ == "UNet2DModel"
    assert not any("_orig_mod" in name for name in unet.state_dict())


@pytest.mark.slow
def test_compiled_run_trains_resumes_and_exports(tmp_path: Path):
    # Minutes on 2 CPU cores (inductor compiles the forward and backward graphs).
    common = ["train.compile=true", "train.mixed_precision=no", "sample.num_inference_steps=1"]
    out = str(tmp_path / "run")
    train(load_config("tiny/digits-class", common + ["train.max_steps=2", "train.checkpoint_every_steps=1"],
                      output_dir=out))
    run = train(load_config("tiny/digits-class", common + ["train.max_steps=3"], output_dir=out))
    plain = train(load_config("tiny/digits-class", ["train.mixed_precision=no", "sample.num_inference_steps=1",
                                                    "train.max_steps=3"], output_dir=str(tmp_path / "plain")))
    assert _losses(run) == pytest.approx(_losses(plain), rel=1e-3)
    from diffusers import UNet2DModel

    UNet2DModel.from_pretrained(str(run / "unet"))
