"""vae.cache_latents_to_disk on tiny latent runs (mini-sd: a VAE trained in the run, digits and aspect-ratio buckets
with flips): training draws its latents from the memory-mapped disk cache and trains bit for bit as with the RAM cache;
a second run, whose VAE stage trains the same weights, reuses the store without running the VAE encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.training.loop import train

from .test_buckets import _mixed_folder

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("buckets", [False, True])
def test_disk_latent_cache_trains_as_the_ram_cache_and_is_reused(tmp_path: Path, monkeypatch, caplog, buckets):
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path / "cache"))
    base = ["train.max_steps=2", "train.checkpoint_every_steps=2", "train.sample_every_steps=null"]
    if buckets:
        data = _mixed_folder(tmp_path / "mixed", classes=("cat", "dog"))
        base += [f"data.path={data}", "data.max_images=null", "data.buckets=auto", "data.random_flip=true"]
    weights = {}
    for name, disk in (("ram", False), ("disk", True), ("disk-again", True)):
        caplog.clear()
        with caplog.at_level("INFO", logger="difftrain"):
            run = train(load_config("tiny/mini-sd", [*base, f"vae.cache_latents_to_disk={str(disk).lower()}"],
                                    output_dir=str(tmp_path / name)))
        weights[name] = load_file(str(run / "checkpoints" / "step-000002" / "model.safetensors"))
        if name == "disk":
            assert "written: the VAE encoder ran once" in caplog.text, caplog.text
        if name == "disk-again":
            assert "reused: the VAE encoder did not run" in caplog.text and "tensor cache: wrote" not in caplog.text
        if buckets and disk:
            assert " buckets memory-mapped from " in caplog.text
    assert len(list((tmp_path / "cache" / "latents").glob("[0-9a-f]*"))) == 1
    for name in ("disk", "disk-again"):
        assert weights[name].keys() == weights["ram"].keys()
        assert all(torch.equal(weights[name][k], weights["ram"][k]) for k in weights["ram"]), name


def test_sdxl_dreambooth_with_both_disk_caches_trains_as_with_the_ram_caches(tmp_path: Path, monkeypatch, caplog):
    """A pretrained VAE (the tiny SDXL base's), instance and generated class images (prior preservation), and the
    text-encoder outputs on disk too: the low-memory setup of a large fine-tuning set."""
    from ..instances import write_instance_images
    from ..tiny_sdxl import build_tiny_sdxl

    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path / "cache"))
    base = [f"model.pretrained={build_tiny_sdxl(tmp_path / 'sdxl')}",
            f"data.instance_dir={write_instance_images(tmp_path / 'instance')}", f"data.class_dir={tmp_path / 'class'}",
            "data.random_flip=true", "train.sample_every_steps=null"]
    weights = {}
    for name, disk in (("ram", False), ("disk", True), ("disk-again", True)):
        caplog.clear()
        flag = str(disk).lower()
        with caplog.at_level("INFO", logger="difftrain"):
            run = train(load_config("tiny/dreambooth-sdxl-lora",
                                    [*base, f"vae.cache_latents_to_disk={flag}", f"text_encoder.cache_to_disk={flag}"],
                                    output_dir=str(tmp_path / name)))
        weights[name] = load_file(str(run / "pytorch_lora_weights.safetensors"))
        if name == "disk-again":
            assert "reused: the VAE encoder did not run" in caplog.text and "tensor cache: wrote" not in caplog.text
    assert len(list((tmp_path / "cache" / "latents").glob("[0-9a-f]*"))) == 1
    assert len(list((tmp_path / "cache" / "sdxl-text").glob("[0-9a-f]*"))) == 1
    for name in ("disk", "disk-again"):
        assert weights[name].keys() == weights["ram"].keys()
        assert all(torch.equal(weights[name][k], weights["ram"][k]) for k in weights["ram"]), name
