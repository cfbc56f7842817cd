"""Runs for the disk-cache tests: the same tiny run with its RAM caches, then with the disk caches twice (built,
then reused), and the check that all three trained the same bits."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.training.loop import train

RUNS = (("ram", False), ("disk", True), ("disk-again", True))


def train_ram_then_disk(preset: str, overrides: list[str], disk_keys: list[str], weights_file: str, tmp_path: Path,
                        caplog) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    """{run name: (the weights in RUN/weights_file, the run's difftrain log)} of the three runs; `disk_keys` (e.g.
    vae.cache_latents_to_disk) are false in "ram" and true in "disk" and "disk-again"."""
    runs = {}
    for name, disk in RUNS:
        caplog.clear()
        flags = [f"{key}={str(disk).lower()}" for key in disk_keys]
        with caplog.at_level("INFO", logger="difftrain"):
            run = train(load_config(preset, [*overrides, *flags], output_dir=str(tmp_path / name)))
        runs[name] = (load_file(str(run / weights_file)), caplog.text)
    return runs


def assert_disk_runs_trained_as_ram(runs: dict[str, tuple[dict[str, torch.Tensor], str]]) -> None:
    ram = runs["ram"][0]
    for name in ("disk", "disk-again"):
        weights = runs[name][0]
        assert weights.keys() == ram.keys()
        assert all(torch.equal(weights[k], ram[k]) for k in ram), name
