"""text_encoder.cache_to_disk on a tiny text run: training reads the frozen encoder's states from the memory-mapped disk
cache and trains bit for bit as with the RAM cache; a second run reuses the cache."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.training.loop import train
from tests.integration.test_text import _save_tiny_clip


def test_disk_text_cache_trains_as_the_ram_cache_and_is_reused(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path / "cache"))
    _save_tiny_clip(tmp_path / "clip")
    base = [f"text_encoder.pretrained={tmp_path / 'clip'}", "train.max_steps=2", "train.checkpoint_every_steps=2",
            "train.sample_every_steps=null"]
    weights = {}
    for name, disk in (("ram", False), ("disk", True), ("disk-again", True)):
        caplog.clear()
        with caplog.at_level("INFO", logger="difftrain"):
            run = train(load_config("tiny/digits-text", [*base, f"text_encoder.cache_to_disk={str(disk).lower()}"],
                                    output_dir=str(tmp_path / name)))
        weights[name] = load_file(str(run / "checkpoints" / "step-000002" / "model.safetensors"))
        if name == "disk":
            assert "tensor cache: wrote frozen text-encoder outputs of 11 distinct captions" in caplog.text
        if name == "disk-again":
            assert "tensor cache: reusing" in caplog.text and "tensor cache: wrote" not in caplog.text
    assert len(list((tmp_path / "cache" / "text-states").glob("[0-9a-f]*"))) == 1
    for name in ("disk", "disk-again"):
        assert weights[name].keys() == weights["ram"].keys()
        assert all(torch.equal(weights[name][k], weights["ram"][k]) for k in weights["ram"])
