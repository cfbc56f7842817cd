"""text_encoder.cache_to_disk on a tiny text run: training reads the frozen encoder's states from the memory-mapped disk
cache and trains bit for bit as with the RAM cache; a second run reuses the cache."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_text import _save_tiny_clip

from ..caches import assert_disk_runs_trained_as_ram, train_ram_then_disk


def test_disk_text_cache_trains_as_the_ram_cache_and_is_reused(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path / "cache"))
    _save_tiny_clip(tmp_path / "clip")
    base = [f"text_encoder.pretrained={tmp_path / 'clip'}", "train.max_steps=2", "train.checkpoint_every_steps=2",
            "train.sample_every_steps=null"]
    runs = train_ram_then_disk("tiny/digits-text", base, ["text_encoder.cache_to_disk"],
                               "checkpoints/step-000002/model.safetensors", tmp_path, caplog)
    assert "tensor cache: wrote frozen text-encoder outputs of 11 distinct captions" in runs["disk"][1]
    log = runs["disk-again"][1]
    assert "tensor cache: reusing" in log and "tensor cache: wrote" not in log
    assert len(list((tmp_path / "cache" / "text-states").glob("[0-9a-f]*"))) == 1
    assert_disk_runs_trained_as_ram(runs)
