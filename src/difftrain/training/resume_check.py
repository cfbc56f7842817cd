"""Resuming safely: refuse config changes that would corrupt a run, log the safe ones, and load the
newest checkpoint that reads back whole (falling back to older ones).

A checkpoint's `progress.json` holds the full config the run was trained with, so the comparison is
against the state actually being resumed, not against `config.yaml` (which a crash may have cut short).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator

from difftrain.config import ConfigError, RunConfig, config_from_dict
from difftrain.training import checkpoint as ckpt
from difftrain.training.progress import read_progress

logger = logging.getLogger(__name__)

ALL = "*"
# Keys whose change makes the saved weights, optimizer state or data order mean something else: a
# different model shape, different training images, or a different diffusion process. Everything
# else (max_steps, intervals, learning rate, precision, evaluation, sampling...) may change on resume.
UNSAFE_KEYS: dict[str, Any] = {
    "model": ALL,
    "data": {"path", "source", "split", "image_column", "label_column", "resolution", "channels", "center_crop",
             "captions", "caption_template", "caption_column", "max_images", "max_image_pixels", "instance_dir",
             "instance_prompt", "class_prompt", "class_dir", "num_class_images"},
    "diffusion": {"objective", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                  "flow_shift", "flow_shift_by_resolution"},
    "text_encoder": {"pretrained", "train", "max_length", "hidden_size", "num_layers", "num_heads"},
    "vae": {"pretrained", "scaling_factor", "block_out_channels", "layers_per_block", "latent_channels"},
    "lora": {"rank", "alpha", "unet_target_modules", "train_text_encoder", "text_encoder_target_modules", "use_dora",
             "rank_pattern", "alpha_pattern"},
    "train": {"use_ema", "prior_preservation", "optimizer"},
}


def is_unsafe(section: str, key: str) -> bool:
    rule = UNSAFE_KEYS.get(section)
    return rule == ALL or (rule is not None and key in rule)


def config_changes(saved: dict, now: RunConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) of every key that differs; output_dir is not compared."""
    try:
        # Fills keys added to the schema since the checkpoint was written with their defaults.
        saved = config_from_dict(saved).to_dict()
    except ConfigError as exc:
        logger.warning("the saved config does not validate with this difftrain version (%s); comparing as is", exc)
    changes = []
    for section, values in now.to_dict().items():
        old = saved.get(section)
        if not isinstance(values, dict):
            continue
        old = old if isinstance(old, dict) else {}
        for key, value in values.items():
            if (section, key, value) == ("train", "mixed_precision", "auto"):
                continue  # "auto" resolves to what the run resolved to before (precision.resolve_mixed_precision)
            if old.get(key) != value:
                changes.append((f"{section}.{key}", old.get(key), value))
    return changes


def check_resume_config(saved: dict, now: RunConfig, where: Path) -> list[tuple[str, Any, Any]]:
    """Raise ValueError listing every unsafe change (saved -> now); return the safe ones."""
    changes = config_changes(saved, now)
    unsafe = [c for c in changes if is_unsafe(*c[0].split(".", 1))]
    if unsafe:
        lines = "\n".join(f"  - {key}: {old!r} -> {new!r}" for key, old, new in unsafe)
        raise ValueError(
            f"refusing to resume {where}: these keys differ from the checkpoint and would corrupt the run "
            f"(model shape, data set or diffusion process):\n{lines}\n"
            "Use the saved values (see its config.yaml) or start a new run with another --output-dir."
        )
    return changes


@dataclasses.dataclass(frozen=True)
class SavedConfig:
    """The config a run in an output directory was last trained with, read once before resuming."""

    values: Optional[dict]  # None: a fresh output directory (or nothing readable in it)
    checkpoint: Optional[Path]  # the checkpoint it came from; None when it came from config.yaml


def read_saved_config(output_dir: Path) -> SavedConfig:
    """The config in the newest checkpoint whose progress file reads back, else config.yaml's."""
    values, path = _checkpoint_config(output_dir)
    if values is not None:
        return SavedConfig(values, path)
    return SavedConfig(_yaml_config(output_dir), None)


def check_before_resume(cfg: RunConfig, output_dir: Path, saved: Optional[SavedConfig] = None,
                        ) -> list[tuple[str, Any, Any]]:
    """Refuse unsafe config changes against the newest checkpoint; return every change for the run log.

    Writes nothing. With no checkpoint yet nothing can be corrupted, so changes against config.yaml are
    returned to be logged but never refused. `saved` is what `read_saved_config(output_dir)` returned
    (read here when not given).
    """
    saved = saved if saved is not None else read_saved_config(output_dir)
    if saved.values is None:
        return []
    if saved.checkpoint is not None:
        return check_resume_config(saved.values, cfg, saved.checkpoint)
    return config_changes(saved.values, cfg)


def _checkpoint_config(output_dir: Path) -> tuple[Optional[dict], Optional[Path]]:
    """The config saved in the newest checkpoint whose progress file reads back."""
    for _, path in reversed(ckpt.list_checkpoints(output_dir / "checkpoints")):
        try:
            return read_progress(path).config, path
        except (OSError, ValueError):
            continue  # a damaged checkpoint is reported when it is loaded; the one before it decides
    return None, None


def _yaml_config(output_dir: Path) -> Optional[dict]:
    saved_path = output_dir / "config.yaml"
    if not saved_path.is_file():
        return None
    import yaml

    try:
        saved = yaml.safe_load(saved_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        logger.warning("could not read the previous %s: %s", saved_path, exc)
        return None
    return saved if isinstance(saved, dict) else None


def load_newest_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, partial: bool = False,
                           load_extra=None) -> tuple[int, Optional[Path]]:
    """Load the newest checkpoint that reads back whole; returns (step, path), or (0, None) with none.

    A checkpoint that fails to verify or load is reported and the one before it is tried. When every
    one fails the run stops: starting again from step 0 would silently throw away the training done.

    Args:
        partial: checkpoints hold only trained parameters (LoRA); loaded with strict=False.
        load_extra: called with the checkpoint path after `load_state` (state difftrain stores itself).
    """
    found = ckpt.list_checkpoints(checkpoints_dir)
    failures = []
    for step, path in reversed(found):
        try:
            ckpt.verify_checkpoint(path)
            if partial:
                accelerator.load_state(str(path), strict=False)
            else:
                accelerator.load_state(str(path))
            if load_extra is not None:
                load_extra(path)
        except Exception as exc:  # noqa: BLE001 - any failure means "try the previous checkpoint"
            failures.append(f"{path.name}: {type(exc).__name__}: {str(exc)[:300]}")
            logger.warning("checkpoint %s could not be loaded (%s: %s); trying the previous one", path,
                           type(exc).__name__, str(exc)[:300])
            continue
        return read_progress(path).step, path
    if failures:
        raise ValueError(f"no checkpoint in {checkpoints_dir} could be loaded:\n" + "\n".join(
            f"  - {f}" for f in failures) + "\nMove the checkpoints folder away to start this run from step 0.")
    return 0, None
