"""Latent class-conditional and unconditional DiTs through the CLI: the export is a folder that plain diffusers'
DiTPipeline loads and samples (with and without guidance), and a latent DiT run resumes exactly.

The runs end with a preview grid drawn by difftrain's ImageSampler, so these tests need the sampler that calls
transformers (sampling/generate.py on the dit branch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.diffusion.objectives import OBJECTIVES
from difftrain.training.loop import train

from .test_cli import run_cli
from .test_resume import _assert_same, _losses

pytestmark = pytest.mark.integration


def _plain_diffusers(script: str) -> str:
    """Run `script` in a fresh interpreter that imports diffusers only; returns its stdout."""
    script = "import sys\nfrom diffusers import DiTPipeline\n" + script + "assert 'difftrain' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def class_dit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dit")
    result = run_cli("train", "tiny/latent-dit", "--output-dir", str(root / "dit"), cwd=root)
    assert result.returncode == 0, result.stderr
    assert "VAE stage: 4 steps" in result.stderr
    return root / "dit"


def test_latent_class_dit_loads_in_plain_dit_pipeline_and_samples_with_and_without_guidance(class_dit: Path):
    index = json.loads((class_dit / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    # The scheduler the run's previews sampled with (sample.scheduler on the objective's schedule).
    cfg = load_config("tiny/latent-dit", [], output_dir="unused")
    expected = OBJECTIVES[cfg.diffusion.objective].from_config(cfg.diffusion, latent=True).inference_scheduler(
        cfg.sample.scheduler)
    saved = json.loads((class_dit / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == type(expected).__name__ == "DDIMScheduler"
    assert {k: saved[k] for k in expected.config if not k.startswith("_")} == json.loads(
        json.dumps({k: v for k, v in expected.config.items() if not k.startswith("_")}))
    assert (class_dit / "samples" / "step-000004.png").is_file()
    card = (class_dit / "README.md").read_text()
    assert "DiTPipeline.from_pretrained" in card and "guidance_scale=3" in card
    out = _plain_diffusers(
        f"pipe = DiTPipeline.from_pretrained({str(class_dit)!r})\n"
        "assert pipe.transformer.config.num_embeds_ada_norm == 1000  # class 1000 is the null class of guidance\n"
        "for scale in (3.0, 1.0):\n"
        "    images = pipe(class_labels=[0, 9], num_inference_steps=2, guidance_scale=scale).images\n"
        "    print(len(images), images[0].size)\n"
        "print(pipe.get_label_ids(['3']))\n"
    )
    assert out.split("\n")[:3] == ["2 (16, 16)", "2 (16, 16)", "[3]"]


def test_latent_unconditional_dit_loads_in_plain_dit_pipeline(tmp_path: Path):
    run = tmp_path / "uncond"
    result = run_cli("train", "tiny/latent-dit", "--output-dir", str(run), "model.conditioning=none",
                     "sample.guidance_scale=1.0", "sample.num_images=2", "train.max_steps=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "class_labels=[0] * 4, guidance_scale=1.0" in (run / "README.md").read_text()
    out = _plain_diffusers(
        f"pipe = DiTPipeline.from_pretrained({str(run)!r})\n"
        "assert pipe.transformer.config.num_embeds_ada_norm == 1\n"
        "print(pipe(class_labels=[0] * 2, guidance_scale=1.0, num_inference_steps=2).images[1].size)\n"
    )
    assert out.strip() == "(16, 16)"


def test_latent_class_dit_resumes_exactly(tmp_path: Path):
    overrides = ["train.checkpoints_total_limit=null", "train.sample_every_steps=null"]
    straight = train(load_config("tiny/latent-dit", overrides, output_dir=str(tmp_path / "straight")))
    resumed_dir = str(tmp_path / "resumed")
    train(load_config("tiny/latent-dit", overrides, output_dir=resumed_dir), stop_at_step=2)
    resumed = train(load_config("tiny/latent-dit", overrides, output_dir=resumed_dir))
    assert _losses(straight) == _losses(resumed)
    a, b = straight / "checkpoints" / "step-000004", resumed / "checkpoints" / "step-000004"
    for name in ("model.safetensors",):
        _assert_same(load_file(a / name), load_file(b / name), name)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    _assert_same(load_file(straight / weights), load_file(resumed / weights), weights)
