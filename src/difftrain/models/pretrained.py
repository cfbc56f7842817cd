"""Base pipelines for fine-tuning: check that a path is a Stable Diffusion style pipeline, load its parts.

The check reads only `model_index.json` (one small download for a hub id), so a wrong base path is
reported before any weights are loaded.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

# What a Stable Diffusion style pipeline must hold for difftrain to fine-tune it.
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# An SDXL base adds the second text encoder (penultimate states concatenated, pooled embedding) and its tokenizer.
SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()


def resolve(path: str) -> str:
    """A local path made absolute (so it stays valid from another working directory); hub ids as given."""
    return str(Path(path).expanduser().resolve()) if looks_local(path) else path


def check_base_pipeline(path: str, key: str = "model.pretrained", components: tuple[str, ...] = SD_COMPONENTS,
                        kind: str = "a Stable Diffusion style pipeline") -> dict:
    """The pipeline's model_index.json; ValueError/FileNotFoundError naming what is wrong: `components` (each
    listed in model_index.json, with its folder for a local pipeline) must all be there."""
    if looks_local(path):
        local = Path(path).expanduser()
        if not local.is_dir():
            raise FileNotFoundError(f"{key} = {path!r}: no such directory")
        if not (local / "model_index.json").is_file():
            raise ValueError(
                f"{key} = {path!r} is not a diffusers pipeline folder (no model_index.json); "
                "expected a Stable Diffusion style pipeline with unet/, vae/, text_encoder/, tokenizer/, scheduler/"
            )
    try:
        index = DiffusionPipeline.load_config(resolve(path))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"{key} = {path!r}: could not read its model_index.json ({exc}). Give a local pipeline folder, "
            "or a hub id on a machine with internet."
        ) from exc
    missing = [name for name in components if not (isinstance(index.get(name), (list, tuple)) and index[name][0])]
    if looks_local(path):  # listed in model_index.json but its folder is gone
        missing += [name for name in components if name not in missing
                    and not (Path(path).expanduser() / name).is_dir()]
    if missing:
        raise ValueError(
            f"{key} = {path!r} ({index.get('_class_name', 'unknown pipeline')}) is not {kind}: "
            f"it lacks {', '.join(missing)} (needs {', '.join(components)})"
        )
    for name in components:
        problem = _component_class_problem(name, *index[name][:2])
        if problem:
            raise ValueError(f"{key} = {path!r}: model_index.json: {problem}")
    unet_class = index["unet"][1]
    if unet_class != "UNet2DConditionModel":
        raise ValueError(f"{key} = {path!r}: its UNet is {unet_class}; fine-tuning supports UNet2DConditionModel")
    return dict(index)


@lru_cache(maxsize=8)
def is_sdxl_base(path: str) -> bool:
    """Whether `path` is an SDXL-style base (its model_index.json names an SDXL pipeline or lists a second text
    encoder, or its UNet takes SDXL's size/crop ids): read from the two small config files only. False where they
    cannot be read (the Stable Diffusion family's check then names the problem)."""
    try:
        index = DiffusionPipeline.load_config(resolve(path))
    except (OSError, ValueError):
        return False
    if "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index:
        return True
    try:
        return load_base_unet_config(path).get("addition_embed_type") == "text_time"
    except (OSError, ValueError):
        return False


def _component_class_problem(name: str, library: str, class_name: str) -> Optional[str]:
    """None when diffusers/transformers has the component's class; else what is wrong (without importing it
    from anywhere else: a library named by a model folder is never imported just because it is named)."""
    if library not in ("diffusers", "transformers"):
        return f"its {name} comes from {library!r}; difftrain loads diffusers and transformers components only"
    module = importlib.import_module(library)
    if getattr(module, class_name, None) is None:
        return f"its {name} class {class_name!r} is not in {library} {module.__version__}"
    return None


def load_base_unet(path: str) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(resolve(path), subfolder="unet")


def load_base_unet_config(path: str) -> dict:
    """The base model's UNet config (its config.json) without loading weights."""
    return UNet2DConditionModel.load_config(resolve(path), subfolder="unet")


def load_base_noise_scheduler(path: str) -> DDPMScheduler:
    """The base model's training schedule (betas, prediction type) as a DDPMScheduler.

    Base models are latent models: x0 is never clipped to [-1, 1], even where the base's scheduler
    config (e.g. an Euler one) does not say clip_sample=false and DDPM's default would clip.
    """
    config = DDPMScheduler.load_config(resolve(path), subfolder="scheduler")
    return DDPMScheduler.from_config(config, clip_sample=False)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """dtype of frozen weights under mixed precision (trained weights stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def stable_diffusion_pipeline_class(xl: bool = False):
    """diffusers' StableDiffusionPipeline (`xl`: StableDiffusionXLPipeline), imported with transformers' notices
    about torchvision silenced (difftrain never uses the image processors they are about)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    finally:
        transformers.logging.set_verbosity(verbosity)
    return StableDiffusionXLPipeline if xl else StableDiffusionPipeline


def load_base_pipeline(path: str):
    """The base pipeline of a fine-tuning run (Stable Diffusion or SDXL, by its model_index.json), for class
    images, merged LoRA exports and sampling a LoRA run; no safety checker."""
    if is_sdxl_base(path):
        return stable_diffusion_pipeline_class(xl=True).from_pretrained(resolve(path))
    return stable_diffusion_pipeline_class().from_pretrained(resolve(path), safety_checker=None,
                                                             requires_safety_checker=False)
