"""Train a small AutoencoderKL from scratch (reconstruction MSE + weighted KL), the first stage of a
latent run without a pretrained VAE, or the `difftrain train-vae` task on its own.

Its length is vae.train_steps, or when that is unset, as many steps as the diffusion stage trains (at most
DEFAULT_MAX_VAE_STEPS), so a short run has a short VAE stage. The first steps are timed and the stage's length and
estimated time are logged before the rest runs.

The finished VAE is written whole to OUTPUT_DIR/vae (temporary name, then rename) with its measured
latent scaling factor in its config; a run that finds it there skips this stage.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from difftrain.config import RunConfig
from difftrain.data.transforms import from_model_range, random_hflip, to_model_range
from difftrain.models.vae import build_scratch_vae, encode_distribution_params, measure_scaling_factor, sample_latents
from difftrain.sampling.grid import make_grid, save_png_atomic
from difftrain.data.order import sample_indices, step_generator
from difftrain.writes import save_folder_atomically, state_bytes

logger = logging.getLogger(__name__)

# Separate random streams from the diffusion stage's, so both stages can share train.seed.
_VAE_SEED_OFFSET = 0x7AE


# The VAE stage of a run that leaves vae.train_steps unset follows its diffusion stage up to this many steps: mini-sd's
# 500 steps (batch 8, 64 px) took 10.8 min of its 58-min budget and gave flowers of the prompted species (BENCHMARKS.md).
DEFAULT_MAX_VAE_STEPS = 500
# Steps timed before the stage's estimate is logged (the first one, which allocates, is timed apart).
_TIMED_STEPS = 4


def vae_train_steps(cfg: RunConfig, num_images: int) -> tuple[int, str]:
    """Steps of the VAE stage and where the number comes from: vae.train_steps, else the diffusion stage's steps
    (train.max_steps, or train.num_epochs passes over `num_images` on one process), at most DEFAULT_MAX_VAE_STEPS."""
    v, t = cfg.vae, cfg.train
    if v.train_steps is not None:
        return int(v.train_steps), "vae.train_steps"
    if t.max_steps is not None:
        steps, basis = int(t.max_steps), f"train.max_steps = {t.max_steps}"
    elif t.num_epochs is None:  # `difftrain train-vae` of a config without a diffusion length
        return DEFAULT_MAX_VAE_STEPS, "vae.train_steps, train.max_steps and train.num_epochs unset"
    else:
        per_epoch = math.ceil(num_images / (t.batch_size * t.gradient_accumulation_steps))
        steps = int(t.num_epochs) * per_epoch
        basis = f"train.num_epochs = {t.num_epochs}: {steps} steps"
    return min(steps, DEFAULT_MAX_VAE_STEPS), (f"vae.train_steps unset: as many as the diffusion stage ({basis}), "
                                               f"at most {DEFAULT_MAX_VAE_STEPS}")


def vae_is_complete(vae_dir: Path) -> bool:
    return (vae_dir / "config.json").is_file() and any(vae_dir.glob("diffusion_pytorch_model*.safetensors"))


def train_vae(cfg: RunConfig, images_uint8: torch.Tensor, output_dir: Path, device: torch.device) -> AutoencoderKL:
    """Train, measure the latent scale, save to OUTPUT_DIR/vae and write a reconstruction grid."""
    v, seed = cfg.vae, cfg.train.seed + _VAE_SEED_OFFSET
    torch.manual_seed(seed)
    vae = build_scratch_vae(v, cfg.data.channels, cfg.data.resolution).to(device)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=v.learning_rate)
    n = images_uint8.shape[0]
    num_steps, basis = vae_train_steps(cfg, n)
    logger.info("training a %.2fM-parameter AutoencoderKL for %d steps (%s; batch %d) on %d images",
                sum(p.numel() for p in vae.parameters()) / 1e6, num_steps, basis, v.batch_size, n)
    progress = tqdm(range(num_steps), desc="vae", dynamic_ncols=True, mininterval=1.0)
    start, loss_sum, since_log = time.perf_counter(), torch.zeros((), device=device), 0
    first_step_s = 0.0
    for step in progress:
        generator = step_generator(seed, step, 0, 0, device)
        images = images_uint8[sample_indices(n, seed, step * v.batch_size, v.batch_size)].to(device)
        if cfg.data.random_flip:
            images = random_hflip(images, generator)
        x = to_model_range(images)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, x) + v.kl_weight * posterior.kl().mean()
        loss.backward()
        if cfg.train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        since_log += 1
        if step == 0:
            first_step_s = _seconds_since(start, device)
        if step + 1 == min(_TIMED_STEPS, num_steps):
            _log_estimate(num_steps, step + 1, first_step_s, _seconds_since(start, device))
        if (step + 1) % cfg.train.log_every_steps == 0 or step + 1 == num_steps:
            mean = (loss_sum / since_log).item()
            progress.set_postfix(loss=f"{mean:.4f}")
            logger.debug("vae step %d loss %.5f", step + 1, mean)
            loss_sum.zero_()
            since_log = 0
    progress.close()
    vae.eval()
    params = encode_distribution_params(vae, images_uint8)
    scale = measure_scaling_factor(sample_latents(params, torch.Generator(device=device).manual_seed(seed)))
    vae.register_to_config(scaling_factor=scale)
    logger.info("VAE trained in %.0f s; latent scaling factor %.4f (1/std of the data's latents)",
                time.perf_counter() - start, scale)
    _save_vae(vae, output_dir / "vae")
    _reconstruction_grid(vae, images_uint8[:8], output_dir / "samples" / "vae-reconstructions.png")
    return vae


def _seconds_since(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the steps were only queued
    return time.perf_counter() - start


def _log_estimate(num_steps: int, timed: int, first_step_s: float, elapsed_s: float) -> None:
    """'VAE stage: N steps, about M min', from the first step and the mean of the ones after it."""
    per_step = (elapsed_s - first_step_s) / (timed - 1) if timed > 1 else first_step_s
    estimate_s = first_step_s + per_step * (num_steps - 1)
    about = f"{estimate_s / 60:.1f} min" if estimate_s >= 60 else f"{estimate_s:.0f} s"
    logger.info("VAE stage: %d steps, about %s (%.2f s per step over the first %d); set vae.train_steps to change it",
                num_steps, about, per_step, timed)


def _save_vae(vae: AutoencoderKL, vae_dir: Path) -> None:
    save_folder_atomically(vae_dir, vae_dir.with_name(vae_dir.name + ".tmp"), "the trained VAE", state_bytes([vae]),
                           lambda tmp: vae.save_pretrained(str(tmp), safe_serialization=True))


@torch.no_grad()
def _reconstruction_grid(vae: AutoencoderKL, images_uint8: torch.Tensor, path: Path) -> None:
    """Originals (top row) over their reconstructions from the latent mean (bottom row)."""
    x = to_model_range(images_uint8.to(vae.device))
    reconstruction = from_model_range(vae.decode(vae.encode(x).latent_dist.mode()).sample).cpu()
    grid = make_grid(torch.cat([images_uint8, reconstruction]), ncols=images_uint8.shape[0],
                     row_labels=["original", "reconstruction"])
    save_png_atomic(grid, path, "the VAE reconstruction grid")
