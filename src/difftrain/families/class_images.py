"""DreamBooth prior preservation: make sure the class-image folder holds `num_class_images` images,
generating the missing ones with the base pipeline.

Each generated image is written under its own index (class-00042.png, seed = index), atomically, so an
interrupted generation resumes where it stopped and a finished folder is left alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image

from difftrain.config import RunConfig
from difftrain.data.sources import IMAGE_EXTENSIONS
from difftrain.sampling.grid import png_bytes_estimate, save_png_atomic
from difftrain.writes import check_writable

logger = logging.getLogger(__name__)


def class_dir_for(cfg: RunConfig) -> Path:
    return Path(cfg.data.class_dir).expanduser() if cfg.data.class_dir else Path(cfg.output_dir) / "class_images"


def existing_class_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def ensure_class_images(cfg: RunConfig, device: torch.device, rank: int = 0, world_size: int = 1,
                        barrier: Optional[Callable[[], None]] = None) -> Path:
    """Fill the class folder up to data.num_class_images; returns the folder.

    With several processes every rank calls this: each generates every `world_size`-th missing image
    (distinct files, so no two processes write one), and `barrier` runs after every rank has listed the
    folder, so no rank counts another's new images as already there.
    """
    from difftrain.pipeline import scheduler_for
    from difftrain.sampling.generate import ImageSampler
    from difftrain.models.pretrained import load_base_pipeline

    folder = class_dir_for(cfg)
    have = existing_class_images(folder)
    if barrier is not None:
        barrier()
    missing = cfg.data.num_class_images - len(have)
    if missing <= 0:
        logger.info("class images: %d in %s, none to generate", len(have), folder)
        return folder
    taken = {p.stem for p in have}
    indices = [i for i in range(cfg.data.num_class_images + len(have)) if f"class-{i:05d}" not in taken][:missing]
    indices = indices[rank::world_size]  # the image's seed is its index, so the split does not change the images
    logger.info("class images: %d in %s; generating %d with %s for %r (%d here, %d processes)", len(have), folder,
                missing, cfg.model.pretrained, cfg.data.class_prompt, len(indices), world_size)
    if not indices:
        return folder
    # Before the base pipeline loads and generation starts: a read-only or full class folder fails at once.
    check_writable(folder, png_bytes_estimate(cfg.data.resolution, cfg.data.resolution, count=len(indices)),
                   f"{len(indices)} class images")
    pipe = load_base_pipeline(cfg.model.pretrained)
    pipe.to(device)
    s = cfg.sample
    scheduler = scheduler_for(pipe, s.scheduler)
    sampler = ImageSampler.from_pipeline(pipe)
    for start in range(0, len(indices), s.batch_size):
        chunk = indices[start : start + s.batch_size]
        images = sampler.generate(scheduler, chunk, num_inference_steps=s.num_inference_steps,
                                  prompts=[cfg.data.class_prompt] * len(chunk), guidance_scale=s.guidance_scale,
                                  batch_size=s.batch_size, device=device)
        for index, image in zip(chunk, images):
            array = image.permute(1, 2, 0).numpy()
            save_png_atomic(Image.fromarray(array[..., 0] if array.shape[2] == 1 else array),
                            folder / f"class-{index:05d}.png", "a class image")
    del pipe, sampler
    return folder
