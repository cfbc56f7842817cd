"""`difftrain sample`: load an exported run, generate images from seeds, write a grid and single PNGs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import yaml
from PIL import Image

from difftrain.pipeline import generate, load_pipeline, null_class, scheduler_for
from difftrain.sampling.grid import make_grid, save_png_atomic
from difftrain.sampling.sample import parse_seeds

logger = logging.getLogger(__name__)


def _run_sample_defaults(run_dir: Path) -> dict:
    """The run's own `sample` section (scheduler, steps, guidance) from its config.yaml, if present."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return (yaml.safe_load(path.read_text()) or {}).get("sample", {}) or {}
    except yaml.YAMLError:
        return {}


def parse_class_labels(text: str, class_names: list[str], num_classes: int) -> list[int]:
    """'3', 'daisy', '0,2,5' -> class indices; names are matched against the run's class names."""
    labels = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part in class_names:
            labels.append(class_names.index(part))
        elif part.lstrip("-").isdigit():
            labels.append(int(part))
        else:
            raise ValueError(f"--class-label {part!r}: not a class index or one of {class_names}")
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--class-label {bad}: the model has classes 0..{num_classes - 1}")
    return labels


def sample_run(
    run_dir: Path,
    *,
    scheduler: Optional[str] = None,
    num_inference_steps: Optional[int] = None,
    seed: str = "0",
    num_images: Optional[int] = None,
    class_label: Optional[str] = None,
    guidance_scale: Optional[float] = None,
    batch_size: int = 64,
    device: Optional[str] = None,
    out: Optional[Path] = None,
    out_dir: Optional[Path] = None,
) -> Path:
    """Generate a grid from an exported run; returns the grid's path."""
    defaults = _run_sample_defaults(run_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(run_dir, device=device)
    sched = scheduler_for(pipe, scheduler or defaults.get("scheduler"))
    steps = num_inference_steps or defaults.get("num_inference_steps", 25)
    null = null_class(pipe.unet)
    labels = None
    row_labels = None
    if null is None:
        if class_label is not None:
            raise ValueError(f"--class-label {class_label!r} given, but {run_dir} is an unconditional model")
        if guidance_scale not in (None, 1.0):
            raise ValueError(f"--guidance-scale {guidance_scale} needs a conditional model; {run_dir} is unconditional")
        count = num_images or 16
        ncols = max(1, int(round(count ** 0.5)))
    else:
        class_names = list(getattr(pipe.config, "class_names", None) or [str(i) for i in range(null)])
        classes = parse_class_labels(class_label, class_names, null) if class_label else list(range(null))
        per_class = num_images or 8
        labels = [c for c in classes for _ in range(per_class)]
        count, ncols = len(labels), per_class
        row_labels = [class_names[c] for c in classes]
    scale = guidance_scale if guidance_scale is not None else defaults.get("guidance_scale", 1.0)
    seeds = parse_seeds(seed)
    if len(seeds) == 1:
        seeds = [seeds[0] + i for i in range(count)]
    elif len(seeds) != count:
        raise ValueError(f"--seed lists {len(seeds)} seeds for {count} images")
    logger.info("sampling %d images with %s, %d steps, guidance %.2f on %s",
                count, type(sched).__name__, steps, scale, device)
    images = generate(pipe.unet, sched, seeds, num_inference_steps=steps, class_labels=labels,
                      guidance_scale=scale, batch_size=batch_size, device=device)
    out = out or run_dir / "samples" / "sample.png"
    save_png_atomic(make_grid(images, ncols, row_labels=row_labels), out)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, (s, img) in enumerate(zip(seeds, images)):
            array = img.permute(1, 2, 0).numpy()
            pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
            suffix = f"-class{labels[i]}" if labels is not None else ""
            pil.save(out_dir / f"seed{s:06d}{suffix}.png")
    return out
