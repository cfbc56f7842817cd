"""vae.cache_latents_to_disk on tiny latent runs (mini-sd: a VAE trained in the run, digits and aspect-ratio buckets
with flips): training draws its latents from the memory-mapped disk cache and trains bit for bit as with the RAM cache;
a second run, whose VAE stage trains the same weights, reuses the store without running the VAE encoder."""

from __future__ import annotations

from pathlib import Path

import pytest


from ..caches import assert_disk_runs_trained_as_ram, train_ram_then_disk
from .test_buckets import _mixed_folder

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("buckets", [False, True])
def test_disk_latent_cache_trains_as_the_ram_cache_and_is_reused(tmp_path: Path, monkeypatch, caplog, buckets):
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path / "cache"))
    base = ["train.max_steps=2", "train.checkpoint_every_steps=2", "train.sample_every_steps=null"]
    if buckets:
        data = _mixed_folder(tmp_path / "mixed", classes=("cat", "dog"))
        base += [f"data.path={data}", "data.max_images=null", "data.buckets=auto", "data.random_flip=true"]
    runs = train_ram_then_disk("tiny/mini-sd", base, ["vae.cache_latents_to_disk"],
                               "checkpoints/step-000002/model.safetensors", tmp_path, caplog)
    assert "written: the VAE encoder ran once" in runs["disk"][1], runs["disk"][1]
    log = runs["disk-again"][1]
    assert "reused: the VAE encoder did not run" in log and "tensor cache: wrote" not in log
    if buckets:
        assert all(" buckets memory-mapped from " in runs[name][1] for name in ("disk", "disk-again"))
    assert len(list((tmp_path / "cache" / "latents").glob("[0-9a-f]*"))) == 1
    assert_disk_runs_trained_as_ram(runs)


def test_sdxl_dreambooth_with_both_disk_caches_trains_as_with_the_ram_caches(tmp_path: Path, monkeypatch, caplog):
    """A pretrained VAE (the tiny SDXL base's), instance and generated class images (prior preservation), and the
    text-encoder outputs on disk too: the low-memory setup of a large fine-tuning set."""
    from ..instances import write_instance_images
    from ..tiny_sdxl import build_tiny_sdxl

    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path / "cache"))
    base = [f"model.pretrained={build_tiny_sdxl(tmp_path / 'sdxl')}",
            f"data.instance_dir={write_instance_images(tmp_path / 'instance')}", f"data.class_dir={tmp_path / 'class'}",
            "data.random_flip=true", "train.sample_every_steps=null"]
    runs = train_ram_then_disk("tiny/dreambooth-sdxl-lora", base,
                               ["vae.cache_latents_to_disk", "text_encoder.cache_to_disk"],
                               "pytorch_lora_weights.safetensors", tmp_path, caplog)
    log = runs["disk-again"][1]
    assert "reused: the VAE encoder did not run" in log and "tensor cache: wrote" not in log
    assert len(list((tmp_path / "cache" / "latents").glob("[0-9a-f]*"))) == 1
    assert len(list((tmp_path / "cache" / "sdxl-text").glob("[0-9a-f]*"))) == 1
    assert_disk_runs_trained_as_ram(runs)
