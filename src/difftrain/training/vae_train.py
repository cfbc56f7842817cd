"""`difftrain train-vae`: the VAE stage of a latent run on its own (families/vae_stage.py does the training)."""

from __future__ import annotations

from pathlib import Path

import torch

from difftrain.config import RunConfig, dump_config
from difftrain.data.dataset import load_image_dataset
from difftrain.families.vae_stage import train_vae
from difftrain.training.run_dir import check_run_dir, claim_run_dir, write_marker
from difftrain.writes import atomic_write_text


def train_vae_run(cfg: RunConfig) -> Path:
    """`difftrain train-vae`: the VAE stage alone; OUTPUT_DIR/vae then serves as `vae.pretrained=OUTPUT_DIR`."""
    output_dir = Path(cfg.output_dir)
    check_run_dir(output_dir)  # a folder that is not difftrain's is refused before the data is decoded
    dataset = load_image_dataset(cfg.data, want_labels=False)
    with claim_run_dir(output_dir, "train-vae"):
        atomic_write_text(output_dir / "config.yaml", dump_config(cfg), "the run's config")
        write_marker(output_dir, cfg.to_dict())
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        train_vae(cfg, dataset.images, output_dir, device)
    return output_dir / "vae"
