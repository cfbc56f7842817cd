"""Latent text-to-image from scratch and DreamBooth LoRA fine-tuning, end to end through the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.training.loop import train

from ..instances import write_instance_images
from .test_cli import run_cli

pytestmark = pytest.mark.integration

PIPELINE_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny latent text-to-image run (VAE trained first), the base model of the DreamBooth tests."""
    root = tmp_path_factory.mktemp("sd")
    result = run_cli("train", "tiny/mini-sd", "--output-dir", str(root / "sd"), cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "sd"


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    """Four photos of 'the subject': scikit-learn digit 7s as 16 px RGB PNGs."""
    return write_instance_images(tmp_path_factory.mktemp("instance"))


def test_mini_sd_exports_a_stable_diffusion_pipeline_that_plain_diffusers_runs(tiny_sd: Path):
    for name in PIPELINE_PARTS:
        assert (tiny_sd / name).exists(), name
    assert json.loads((tiny_sd / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert (tiny_sd / "samples" / "vae-reconstructions.png").is_file()
    assert (tiny_sd / "samples" / "step-000004.png").is_file()
    vae_config = json.loads((tiny_sd / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215  # measured on the data, not diffusers' default
    assert "StableDiffusionPipeline.from_pretrained" in (tiny_sd / "README.md").read_text()
    script = (
        "import sys\n"
        "from diffusers import StableDiffusionPipeline\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({str(tiny_sd)!r})\n"
        "image = pipe('a photo of a 3', num_inference_steps=2).images[0]\n"
        "assert 'difftrain' not in sys.modules\n"
        "print(image.size)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("(16, 16)")


def test_latent_flow_matching_run_exports_a_pipeline_that_plain_diffusers_runs(tiny_sd: Path, tmp_path: Path):
    run = tmp_path / "flow-sd"
    result = run_cli("train", "tiny/mini-sd", "--output-dir", str(run), f"vae.pretrained={tiny_sd}",
                     "train.max_steps=2", "diffusion.objective=flow_matching",
                     "diffusion.flow_shift_by_resolution=true",
                     "sample.scheduler=dpm++", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scheduler = json.loads((run / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DPMSolverMultistepScheduler" and scheduler["use_flow_sigmas"]
    script = (
        "from diffusers import StableDiffusionPipeline\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({str(run)!r})\n"
        "print(pipe('a photo of a 3', num_inference_steps=2, output_type='np').images.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("(1, 16, 16, 3)")
    from difftrain.cli import main

    for name in ("euler", "unipc"):  # difftrain's own loop steps every flow sampler on the latent export
        assert main(["sample", str(run), "--prompt", "a photo of a 3", "--scheduler", name, "--num-inference-steps",
                     "2", "--num-images", "1", "--out", str(tmp_path / f"{name}.png")]) == 0


def test_dreambooth_lora_through_the_cli(tiny_sd: Path, instance_dir: Path, tmp_path: Path):
    run = tmp_path / "db"
    args = ["train", "tiny/dreambooth-lora", "--output-dir", str(run), f"model.pretrained={tiny_sd}",
            f"data.instance_dir={instance_dir}"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list((run / "class_images").glob("class-*.png"))) == 4
    weights = load_file(run / "pytorch_lora_weights.safetensors")
    assert weights and all("lora" in key for key in weights)
    checkpoint = load_file(run / "checkpoints" / "step-000004" / "model.safetensors")
    assert checkpoint and all("lora" in key for key in checkpoint), "checkpoints hold the adapters, not the base"
    card = (run / "README.md").read_text()
    assert "load_lora_weights" in card and "a photo of sks digit" in card

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(run))
    assert pipe("a photo of sks digit", num_inference_steps=2).images[0].size == (16, 16)

    # Running again finds the class images there and does not regenerate them.
    stamp = (run / "class_images" / "class-00000.png").stat().st_mtime_ns
    again = run_cli(*args, "train.max_steps=5", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "none to generate" in again.stderr
    assert (run / "class_images" / "class-00000.png").stat().st_mtime_ns == stamp

    sampled = run_cli("sample", str(run), "--prompt", "a photo of sks digit", "--num-images", "2",
                      "--num-inference-steps", "2", "--out", str(tmp_path / "s.png"), cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr


def test_lora_run_resumes_exactly(tiny_sd: Path, instance_dir: Path, tmp_path: Path):
    overrides = [f"model.pretrained={tiny_sd}", f"data.instance_dir={instance_dir}", "lora.train_text_encoder=true",
                 f"data.class_dir={tmp_path / 'class'}", "train.checkpoints_total_limit=null"]
    straight = train(load_config("tiny/dreambooth-lora", overrides, output_dir=str(tmp_path / "straight")))
    resumed_dir = str(tmp_path / "resumed")
    train(load_config("tiny/dreambooth-lora", overrides, output_dir=resumed_dir), stop_at_step=2)
    resumed = train(load_config("tiny/dreambooth-lora", overrides, output_dir=resumed_dir))
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in a) and any(k.startswith("unet.") for k in a)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # diffusers reads the export back, the text encoder's adapters included (peft's injection, not add_adapter).
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(resumed))
    assert any("lora" in name for name, _ in pipe.text_encoder.named_parameters())
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_lora_export_merged_writes_a_plain_pipeline_folder(tiny_sd: Path, instance_dir: Path, tmp_path: Path):
    """lora.export_merged: the base with the adapters fused, saved through writes.save_folder_atomically."""
    overrides = [f"model.pretrained={tiny_sd}", f"data.instance_dir={instance_dir}", "lora.export_merged=true",
                 f"data.class_dir={tmp_path / 'class'}", "train.max_steps=2"]
    run = train(load_config("tiny/dreambooth-lora", overrides, output_dir=str(tmp_path / "merged-run")))
    from diffusers import StableDiffusionPipeline

    merged = StableDiffusionPipeline.from_pretrained(str(run / "merged"))
    base = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    assert not any("lora" in name for name, _ in merged.unet.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(merged.unet.parameters(), base.unet.parameters()))
    assert not (run / ".merged-tmp").exists()


def test_dora_and_kohya_lora_runs_export_what_diffusers_loads(tiny_sd: Path, instance_dir: Path, tmp_path: Path):
    """lora.use_dora trains and its diffusers-format export loads; lora.export_format=both with per-module rank and
    alpha (and gradient checkpointing on the UNet and the LoRA text encoder) writes both files, the kohya one loading
    to the same UNet output as the diffusers one."""
    from diffusers import StableDiffusionPipeline

    from difftrain.models.lora import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME

    common = [f"model.pretrained={tiny_sd}", f"data.instance_dir={instance_dir}", f"data.class_dir={tmp_path / 'class'}",
              "train.max_steps=2", "train.checkpoint_every_steps=null", "train.sample_every_steps=null",
              "lora.train_text_encoder=true"]
    dora = train(load_config("tiny/dreambooth-lora", common + ["lora.use_dora=true"], output_dir=str(tmp_path / "dora")))
    weights = load_file(dora / LORA_WEIGHTS_NAME)
    assert any("lora_magnitude_vector" in k for k in weights)
    assert "DoRA adapters" in (dora / "README.md").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(dora))
    assert pipe.unet.peft_config["default_0"].use_dora
    assert pipe("a photo of sks digit", num_inference_steps=2).images[0].size == (16, 16)

    both = train(load_config("tiny/dreambooth-lora", common + [
        "lora.export_format=both", "lora.alpha=4", "lora.rank_pattern={attn2.to_k: 3}", "train.gradient_checkpointing=true",
        "lora.alpha_pattern={attn1.to_q: 1}"], output_dir=str(tmp_path / "both")))
    kohya = load_file(both / KOHYA_WEIGHTS_NAME)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te"}
    assert {v.shape[0] for k, v in kohya.items() if "attn2_to_k.lora_down" in k} == {3}
    outputs = []
    for name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
        pipe.load_lora_weights(str(both), weight_name=name)
        states = pipe.text_encoder(pipe.tokenizer(["a photo of sks digit"], return_tensors="pt").input_ids)[0]
        latents = torch.randn(1, pipe.unet.config.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outputs.append(pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=states).sample)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    assert KOHYA_WEIGHTS_NAME in (both / "README.md").read_text()


def test_latent_setup_errors_come_before_any_model_loads(tmp_path: Path, instance_dir: Path):
    ddpm = tmp_path / "ddpm"
    ddpm.mkdir()
    (ddpm / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DModel"],
         "scheduler": ["diffusers", "DDPMScheduler"]}))
    out = tmp_path / "out"
    base_args = ["train", "tiny/dreambooth-lora", "--output-dir", str(out)]
    result = run_cli(*base_args, f"model.pretrained={ddpm}", f"data.instance_dir={instance_dir}", cwd=tmp_path)
    assert result.returncode == 1 and "not a Stable Diffusion style pipeline" in result.stderr, result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(*base_args, f"model.pretrained={ddpm}", f"data.instance_dir={empty}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    result = run_cli(*base_args, f"model.pretrained={ddpm}", f"data.instance_dir={instance_dir}",
                     "data.class_prompt=null", cwd=tmp_path)
    assert result.returncode == 2 and "data.class_prompt" in result.stderr
    assert not out.exists(), "nothing is written before the checks pass"


def test_empty_instance_folder_is_named(tmp_path: Path, tiny_sd: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("train", "tiny/dreambooth-lora", "--output-dir", str(tmp_path / "out"),
                     f"model.pretrained={tiny_sd}", f"data.instance_dir={empty}", cwd=tmp_path)
    assert result.returncode == 1 and f"data.instance_dir = '{empty}'" in result.stderr, result.stderr
    assert "holds no images" in result.stderr or "no usable images" in result.stderr


def test_base_model_as_a_hub_id_resolves_through_the_hub_cache(tiny_sd: Path, instance_dir: Path, tmp_path: Path):
    """The hub code path, offline: the tiny pipeline is placed in a hub cache as repo difftrain-tests/tiny-sd."""
    cache = tmp_path / "hub"
    repo = cache / "models--difftrain-tests--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in PIPELINE_PARTS:
        source = tiny_sd / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # What an online download records for a file the hub answered 404 for: the tokenizer folder of a
    # pipeline has no config.json, and transformers' AutoTokenizer asks for one.
    missing = repo / ".no_exist" / commit / "tokenizer" / "config.json"
    missing.parent.mkdir(parents=True)
    missing.touch()
    run = tmp_path / "db"
    result = run_cli("train", "tiny/dreambooth-lora", "--output-dir", str(run), "model.pretrained=difftrain-tests/tiny-sd",
                     f"data.instance_dir={instance_dir}", "train.max_steps=2", cwd=tmp_path,
                     env_extra={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "adapter_base.json").read_text())["base_model"] == "difftrain-tests/tiny-sd"


def test_train_vae_then_a_latent_run_on_that_vae_encoding_every_step(tmp_path: Path):
    vae_run = tmp_path / "vae"
    result = run_cli("train-vae", "tiny/mini-sd", "--output-dir", str(vae_run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (vae_run / "vae" / "config.json").is_file() and (vae_run / "samples" / "vae-reconstructions.png").is_file()
    run = tmp_path / "sd"
    result = run_cli("train", "tiny/mini-sd", "--output-dir", str(run), f"vae.pretrained={vae_run}",
                     "vae.cache_latents=false", "train.max_steps=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "training a" not in result.stderr  # no VAE stage: the given VAE is used
    saved = json.loads((run / "vae" / "config.json").read_text())
    assert saved["scaling_factor"] == json.loads((vae_run / "vae" / "config.json").read_text())["scaling_factor"]


def test_check_of_a_from_scratch_latent_run_passes_and_says_why_the_step_is_not_timed(tmp_path: Path):
    """Its VAE does not exist before `train`, so check cannot time the denoising step: a note, not a failure."""
    checked = run_cli("check", "tiny/mini-sd", "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "step: not timed: this latent run trains its VAE first" in checked.stdout
    assert "check: OK" in checked.stdout
    assert not (tmp_path / "run").exists()
