"""Text-to-image runs end to end: from-scratch and local pretrained encoders, prompts, guidance sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from difftrain.config import TextEncoderConfig, load_config
from difftrain.models.text import build_caption_tokenizer, build_scratch_text_encoder
from difftrain.training.loop import train

from .test_cli import run_cli

pytestmark = pytest.mark.integration


def test_tiny_text_run_through_the_cli_and_a_guidance_sweep(tmp_path: Path):
    run = tmp_path / "t"
    result = run_cli("train", "tiny/digits-text", "--output-dir", str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    index = json.loads((run / "model_index.json").read_text())
    assert index["_class_name"] == "TextToImagePipeline"
    assert {"text_encoder", "tokenizer", "unet", "scheduler"} <= set(index)
    assert "TextToImagePipeline" in (run / "README.md").read_text()

    sweep = tmp_path / "sweep.png"
    sampled = run_cli("sample", str(run), "--prompt", "A handwritten digit 7", "--guidance-scale", "0,5,10,20,50,100",
                      "--num-inference-steps", "2", "--out", str(sweep), cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    one_column = Image.open(run / "samples" / "step-000004.png")  # 2 columns + row labels
    assert Image.open(sweep).width > 2.5 * one_column.width / 2

    from difftrain.cli import main

    grid, singles = tmp_path / "grid.png", tmp_path / "singles"
    assert main(["sample", str(run), "--prompt", "A handwritten digit 1", "--prompt", "A handwritten digit 2",
                 "--num-images", "2", "--negative-prompt", "A handwritten digit 8", "--guidance-scale", "4",
                 "--num-inference-steps", "2", "--out", str(grid), "--out-dir", str(singles)]) == 0
    assert sorted(p.name for p in singles.iterdir()) == [
        "seed000000-prompt0.png", "seed000001-prompt0.png", "seed000002-prompt1.png", "seed000003-prompt1.png"]
    assert main(["sample", str(run), "--num-inference-steps", "2"]) == 1  # a text model needs --prompt

    import difftrain

    pipe = difftrain.load_pipeline(run)
    assert isinstance(pipe, difftrain.TextToImagePipeline) and pipe.tokenizer.model_max_length == 8
    a = pipe("A handwritten digit 3", num_inference_steps=2, seed=5, output_type="np").images
    b = pipe(["A handwritten digit 3", "A handwritten digit 4"], num_inference_steps=2, seed=[5, 6], output_type="np").images
    assert a.shape == (1, 8, 8, 1)
    assert abs(a[0] - b[0]).max() <= 1 / 255 + 1e-6  # a seed gives the same image at any batch size


def _save_tiny_clip(folder: Path) -> None:
    captions = [f"A handwritten digit {d}" for d in range(10)]
    tokenizer = build_caption_tokenizer(captions, 16)
    torch.manual_seed(1)
    encoder = build_scratch_text_encoder(tokenizer, TextEncoderConfig(hidden_size=24, num_layers=1, num_heads=2, max_length=16))
    tokenizer.save_pretrained(folder)
    encoder.save_pretrained(folder)


@pytest.mark.parametrize("trained", [False, True])
def test_pretrained_encoder_from_a_local_directory_offline(tmp_path: Path, trained: bool, caplog):
    _save_tiny_clip(tmp_path / "clip")
    overrides = [f"text_encoder.pretrained={tmp_path / 'clip'}", f"text_encoder.train={str(trained).lower()}",
                 "text_encoder.learning_rate=1e-4"]
    with caplog.at_level("INFO", logger="difftrain"):
        run = train(load_config("tiny/digits-text", overrides, output_dir=str(tmp_path / "run")))
    assert (run / "text_encoder" / "config.json").is_file()
    assert json.loads((run / "unet" / "config.json").read_text())["cross_attention_dim"] == 24
    saved = sorted(p.name for p in (run / "checkpoints" / "step-000004").glob("model*.safetensors"))
    if trained:
        assert saved == ["model.safetensors", "model_1.safetensors"]
        assert "cached frozen text-encoder states" not in caplog.text
    else:
        assert saved == ["model.safetensors"]  # a frozen encoder is reloaded, not checkpointed
        assert "cached frozen text-encoder states for 11 distinct captions" in caplog.text


def test_unknown_text_encoder_path_fails_before_writing(tmp_path: Path):
    result = run_cli("train", "tiny/digits-text", "--output-dir", str(tmp_path / "out"),
                     f"text_encoder.pretrained={tmp_path / 'missing-clip'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "missing-clip" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_flow_matching_text_run_samples_with_guidance(tmp_path: Path):
    import difftrain

    run = tmp_path / "flow-text"
    result = run_cli("train", "tiny/digits-text", "--output-dir", str(run), "train.max_steps=2",
                     "diffusion.objective=flow_matching", "diffusion.beta_schedule=linear",
                     "diffusion.prediction_type=epsilon", "diffusion.snr_gamma=null", "sample.scheduler=unipc",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pipe = difftrain.load_pipeline(run)
    assert isinstance(pipe, difftrain.TextToImagePipeline) and pipe.scheduler.config.use_flow_sigmas
    images = pipe("A handwritten digit 3", num_inference_steps=2, guidance_scale=4.0).images
    assert len(images) == 1
