"""Transformer backbones (model.backbone = dit) end to end: tiny runs through the CLI for every conditioning in pixel
space and latent text (PixArt), each export loaded as its model card says and sampled; the patch and head refusals;
exact resume of a DiT run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.training.loop import train

from .test_cli import run_cli
from .test_resume import _assert_same, _losses

pytestmark = pytest.mark.integration

DIT = ["model.backbone=dit", "model.size=tiny", "train.max_steps=2", "train.checkpoint_every_steps=2",
       "train.sample_every_steps=2", "sample.num_inference_steps=2"]


def _card_code(run: Path) -> str:
    """The python block of the run's model card (its 'How to load')."""
    return re.search(r"```python\n(.*?)```", (run / "README.md").read_text(), re.S).group(1)


@pytest.mark.parametrize("preset, extra, pipeline, network", [
    ("tiny/folder-uncond", ["data.path=digits", "data.channels=1", "data.resolution=8"],
     "UnconditionalPipeline", "DiTTransformer2DModel"),
    ("tiny/digits-class", [], "ClassConditionalPipeline", "DiTTransformer2DModel"),
    ("tiny/digits-text", [], "TextToImagePipeline", "PixArtTransformer2DModel"),
])
def test_pixel_dit_runs_export_difftrain_pipelines(tmp_path: Path, preset, extra, pipeline, network):
    import difftrain

    run = tmp_path / "run"
    result = run_cli("train", preset, "--output-dir", str(run), *extra, *DIT, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    index = json.loads((run / "model_index.json").read_text())
    assert index["_class_name"] == pipeline and index["transformer"] == ["diffusers", network]
    assert index["unet"] == [None, None] and not (run / "unet").exists()
    card = (run / "README.md").read_text()
    assert f"`{pipeline}`" in card and f"{network}.from_pretrained" in card

    assert "difftrain.load_pipeline(" in _card_code(run)
    pipe = difftrain.load_pipeline(run)
    condition = {"UnconditionalPipeline": dict(batch_size=2), "ClassConditionalPipeline": dict(class_labels=[0, 1]),
                 "TextToImagePipeline": dict(prompt=["A handwritten digit 3"] * 2)}[pipeline]
    images = pipe(**condition, num_inference_steps=2, output_type="np").images
    assert images.shape[1:] == (8, 8, 1) and images.min() >= 0 and images.max() <= 1
    if pipeline == "ClassConditionalPipeline":
        assert pipe.num_classes == 10 and pipe.transformer.config.num_embeds_ada_norm == 1000
        with pytest.raises(ValueError, match=r"classes 0\.\.9"):
            pipe(class_labels=[10], num_inference_steps=1)

    sampled = run_cli("sample", str(run), "--num-images", "1", "--num-inference-steps", "2", "--out",
                      str(tmp_path / "grid.png"), *(["--prompt", "A handwritten digit 3"] if "text" in preset else []),
                      cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    assert (tmp_path / "grid.png").is_file()


def test_latent_text_dit_exports_a_pixart_sigma_pipeline_that_plain_diffusers_runs(tmp_path: Path):
    run = tmp_path / "lt"
    result = run_cli("train", "tiny/mini-sd", "--output-dir", str(run), *DIT, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    index = json.loads((run / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    code = _card_code(run)
    assert "PixArtSigmaPipeline.from_pretrained" in code and "max_sequence_length=8" in code
    # The card's code as written (20 steps by default), in a process that never imports difftrain.
    script = code + "assert 'difftrain' not in __import__('sys').modules\nprint(image.size)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("(16, 16)")


def test_bad_patch_size_and_heads_are_refused_before_anything_is_written(tmp_path: Path):
    run = tmp_path / "run"
    result = run_cli("train", "tiny/digits-class", "--output-dir", str(run), "model.backbone=dit", "model.size=custom",
                     "model.patch_size=3", "model.depth=1", "model.width=64", "model.num_heads=5", cwd=tmp_path)
    assert result.returncode != 0
    assert "model.patch_size = 3 does not divide the network's sample size 8" in result.stderr
    assert "model.num_heads = 5 does not divide model.width = 64" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run.exists()


def test_dit_resume_is_bit_identical(tmp_path: Path):
    overrides = ["model.backbone=dit", "model.size=custom", "model.patch_size=2", "model.depth=1", "model.width=32",
                 "model.num_heads=2", "train.checkpoints_total_limit=null", "train.condition_dropout=0.5"]
    straight = train(load_config("tiny/digits-class", overrides, output_dir=str(tmp_path / "straight")))
    resumed_dir = str(tmp_path / "resumed")
    train(load_config("tiny/digits-class", overrides, output_dir=resumed_dir), stop_at_step=2)
    resumed = train(load_config("tiny/digits-class", overrides, output_dir=resumed_dir))
    assert _losses(straight) == _losses(resumed)
    a, b = straight / "checkpoints" / "step-000004", resumed / "checkpoints" / "step-000004"
    _assert_same(load_file(a / "model.safetensors"), load_file(b / "model.safetensors"), "checkpoint")
    _assert_same(torch.load(a / "custom_checkpoint_0.pkl", weights_only=True),
                 torch.load(b / "custom_checkpoint_0.pkl", weights_only=True), "EMA")
    name = "transformer/diffusion_pytorch_model.safetensors"
    _assert_same(load_file(straight / name), load_file(resumed / name), "exported EMA transformer")
