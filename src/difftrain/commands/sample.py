"""`difftrain sample`: load an exported run (or a kept checkpoint, exported on demand), generate images from seeds,
write a grid and single PNGs.

Rows are prompts (text models), class labels (class models) or nothing (unconditional). Several
guidance scales make a sweep figure: one column per scale, every column from the same seeds.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml
from PIL import Image

from difftrain.models.backbone import denoising_network
from difftrain.pipeline import load_pipeline, scheduler_for
from difftrain.sampling.args import count_problem, raise_problems
from difftrain.sampling.generate import ImageSampler
from difftrain.sampling.grid import make_grid, png_bytes_estimate, save_png_atomic
from difftrain.sampling.sample import parse_seeds
from difftrain.writes import check_file_writable, check_writable

logger = logging.getLogger(__name__)

BEST = "best"
"""The folder of a run's best export (train.keep_best_by): a pipeline folder like the run's own."""


def run_sample_defaults(run_dir: Path) -> dict:
    """The run's own `sample` section (scheduler, steps, guidance, prompts) from its config.yaml, if present; a run's
    `best/` export (train.keep_best_by) has none and takes its run's."""
    candidates = [run_dir, run_dir.parent] if run_dir.name == BEST else [run_dir]
    for folder in candidates:
        path = folder / "config.yaml"
        if path.is_file():
            try:
                return (yaml.safe_load(path.read_text()) or {}).get("sample", {}) or {}
            except (yaml.YAMLError, AttributeError):
                return {}
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


def parse_guidance_scales(text: Optional[str]) -> Optional[list[float]]:
    """'5' -> [5.0]; '0,5,10' -> a sweep; each a finite number >= 0."""
    if text is None:
        return None
    try:
        scales = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--guidance-scale {text!r}: expected a number or a comma list like '0,5,10'") from None
    if not scales or any(not math.isfinite(s) or s < 0 for s in scales):
        raise ValueError(f"--guidance-scale {text!r}: expected finite numbers >= 0 (1 = no guidance), "
                         "like 5 or a sweep 0,5,10")
    return scales


ImageCallback = Callable[[int, Path], None]
"""on_image(index, path): image `index` of the grid (row-major, as --out-dir names them) was written to `path`."""


def sample_source(run_dir: Path, checkpoint: Optional[str] = None) -> tuple[Path, str]:
    """The folder to load and what its default grid's name ends with: RUN_DIR itself (an export, a run's `best/`),
    or with `checkpoint` the export of that kept checkpoint (training/export_checkpoint.py), made now unless already
    there, and `-step-000200`."""
    if checkpoint is None:
        return run_dir, ""
    from difftrain.training.export_checkpoint import export_checkpoint

    folder = export_checkpoint(run_dir, checkpoint)
    return folder, f"-{folder.name}"


def sample_run(
    run_dir: Path,
    *,
    checkpoint: Optional[str] = None,
    scheduler: Optional[str] = None,
    num_inference_steps: Optional[int] = None,
    seed: str = "0",
    num_images: Optional[int] = None,
    class_label: Optional[str] = None,
    prompts: Optional[Sequence[str]] = None,
    negative_prompt: Optional[str] = None,
    guidance_scale: Optional[str] = None,
    batch_size: int = 64,
    device: Optional[str] = None,
    out: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    on_start: Optional[Callable[[int], None]] = None,
    on_image: Optional[ImageCallback] = None,
    load: Callable[..., Any] = load_pipeline,
) -> Path:
    """Generate a grid (or a guidance sweep) from an exported run, or from a kept checkpoint of it; returns the
    grid's path.

    Args:
        checkpoint: sample this kept checkpoint (`step-000200`, `latest`) instead of the export: its weights as the
            export would write them (EMA when the run keeps one), exported once into RUN_DIR/.difftrain/exports/.
        out_dir: also write each image as its own PNG here, as soon as its batch is done.
        on_start: called with the number of images once the model is loaded and the arguments are checked.
        on_image: called after each single image is written to `out_dir` (needs `out_dir`).
        load: `load_pipeline` or a caching stand-in for it (the web UI's).
    """
    # Arguments first, before any model loads; None means the run's default, 0 is refused.
    raise_problems(count_problem("--num-inference-steps", num_inference_steps),
                   count_problem("--num-images", num_images), count_problem("--batch-size", batch_size))
    requested_scales = parse_guidance_scales(guidance_scale)
    if on_image is not None and out_dir is None:
        raise ValueError("on_image is called with each image written to out_dir; pass out_dir too")
    defaults = run_sample_defaults(run_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source, grid_tag = sample_source(run_dir, checkpoint)
    pipe = load(source, device=device)
    sched = scheduler_for(pipe, scheduler or defaults.get("scheduler"))
    steps = num_inference_steps if num_inference_steps is not None else defaults.get("num_inference_steps", 25)
    scales = requested_scales or [float(defaults.get("guidance_scale", 1.0))]
    sampler = ImageSampler.from_pipeline(pipe)
    # Text: pixel text models (TextToImagePipeline) and Stable Diffusion style pipelines (with a VAE).
    is_text = sampler.kind == "text"
    if prompts and not is_text:
        raise ValueError(f"--prompt needs a text-conditioned model; {run_dir} is not one")
    if class_label is not None and sampler.kind != "class":
        raise ValueError(f"--class-label {class_label!r} needs a class-conditional model; {run_dir} is not one")
    if negative_prompt is not None and not is_text:
        raise ValueError(f"--negative-prompt needs a text-conditioned model; {run_dir} is not one")

    rows: list = [None]  # one entry per grid row: a prompt, a class index, or None
    row_labels: Optional[list[str]] = None
    if is_text:
        rows = list(prompts or defaults.get("prompts") or [])
        if not rows:
            raise ValueError(f"{run_dir} is a text-to-image model: give --prompt \"...\" (repeat for several)")
        row_labels = rows
    elif sampler.kind == "class":
        num_classes = sampler.num_classes
        class_names = list(getattr(pipe.config, "class_names", None) or [str(i) for i in range(num_classes)])
        rows = parse_class_labels(class_label, class_names, num_classes) if class_label else list(range(num_classes))
        row_labels = [class_names[c] for c in rows]
    elif len(scales) > 1 or scales[0] != 1.0:
        raise ValueError(f"--guidance-scale {guidance_scale} needs a conditional model; {run_dir} is unconditional")
    sweep = len(scales) > 1
    per_row = num_images if num_images is not None else (1 if sweep else (8 if rows != [None] else 16))
    base_seeds = parse_seeds(seed)
    count = len(rows) * per_row
    if len(base_seeds) == 1:
        base_seeds = [base_seeds[0] + i for i in range(count)]
    elif len(base_seeds) != count:
        raise ValueError(f"--seed lists {len(base_seeds)} seeds for {count} images")

    # Layout: for each row (prompt/class), for each image of that row, one column per guidance scale.
    # The same seed appears once per scale, so a sweep row compares scales on identical noise.
    entries = [(row, base_seeds[r * per_row + k], scale)
               for r, row in enumerate(rows) for k in range(per_row) for scale in scales]
    out = out or run_dir / "samples" / f"{'sweep' if sweep else 'sample'}{grid_tag}.png"
    _check_outputs(pipe, len(entries), out, out_dir)  # before sampling, which may take minutes
    if on_start is not None:
        on_start(len(entries))
    images = torch.empty(0, dtype=torch.uint8)
    for scale in scales:
        positions = [i for i, (_, _, sc) in enumerate(entries) if sc == scale]
        logger.info("sampling %d images with %s, %d steps, guidance %.2f on %s", len(positions),
                    type(sched).__name__, steps, scale, device)
        # One call per batch (the batches the sampler would make itself, so the images are the same), each
        # batch's single images written before the next one starts.
        for start in range(0, len(positions), batch_size):
            chunk = positions[start:start + batch_size]
            conditions = [entries[i][0] for i in chunk]
            out_images = sampler.generate(sched, [entries[i][1] for i in chunk], num_inference_steps=steps,
                                          labels=conditions if sampler.kind == "class" else None,
                                          prompts=conditions if is_text else None,
                                          negative_prompt=negative_prompt or "", guidance_scale=scale,
                                          batch_size=batch_size, device=device)
            if images.numel() == 0:
                images = torch.empty((len(entries), *out_images.shape[1:]), dtype=torch.uint8)
            images[chunk] = out_images
            if out_dir is not None:
                for i in chunk:
                    path = _save_single(images[i], entries[i], rows, sweep, out_dir)
                    if on_image is not None:
                        on_image(i, path)

    ncols = per_row * len(scales)
    if rows == [None]:
        ncols = max(1, int(round(count ** 0.5)))
    col_labels = [f"w={s:g}" for _ in range(per_row) for s in scales] if sweep else None
    save_png_atomic(make_grid(images, ncols, row_labels=row_labels, col_labels=col_labels), out, "the sample grid")
    return out


def _save_single(image: torch.Tensor, entry: tuple, rows: list, sweep: bool, out_dir: Path) -> Path:
    """One image as OUT_DIR/seed000012[-class3|-prompt0][-w5].png."""
    row, seed, scale = entry
    array = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    tag = "" if row is None else (f"-class{row}" if isinstance(row, int) else f"-prompt{rows.index(row)}")
    tag += f"-w{scale:g}" if sweep else ""
    path = out_dir / f"seed{seed:06d}{tag}.png"
    save_png_atomic(pil, path, "a sample image")
    return path


def _check_outputs(pipe, num_images: int, out: Path, out_dir: Optional[Path]) -> None:
    """Refuse an unwritable or full --out / --out-dir before sampling, with a size estimate of the images."""
    size = getattr(denoising_network(pipe).config, "sample_size", None) or 64
    size = int(max(size) if isinstance(size, (list, tuple)) else size)
    vae = getattr(pipe, "vae", None)
    if vae is not None:  # latent models: the VAE upsamples by 2 per extra block
        size *= 2 ** (len(vae.config.block_out_channels) - 1)
    per_image = png_bytes_estimate(size, size)
    # The grid adds padding and labels around the cells (each at least 64 px wide); twice the pixels is ample.
    check_file_writable(out, 2 * num_images * max(per_image, png_bytes_estimate(64, 64)), "the sample grid")
    if out_dir is not None:
        check_writable(out_dir, num_images * per_image, f"{num_images} sample images")
