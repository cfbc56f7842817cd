"""Model families: one class per kind of model behind the interface in base.py, chosen once per run.

To add a family, write one module with a `Family` subclass and list it in FAMILIES (docs/architecture.md).
The entries are "module:Class" strings, imported only when asked for, so reading a config loads no model code.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from difftrain.config import ConfigError, RunConfig

if TYPE_CHECKING:
    from difftrain.families.base import Family

# Asked in order; the first family whose `handles(cfg)` is true trains the run.
FAMILIES: dict[str, str] = {
    "stable-diffusion-xl": "difftrain.families.sdxl:StableDiffusionXLFamily",
    "stable-diffusion": "difftrain.families.stable_diffusion:StableDiffusionFamily",
    "latent-text": "difftrain.families.latent:LatentTextFamily",
    "latent-class": "difftrain.families.latent_class:LatentClassFamily",
    "latent-unconditional": "difftrain.families.latent_class:LatentUnconditionalFamily",
    "pixel-text": "difftrain.families.text:TextPixelFamily",
    "pixel-class": "difftrain.families.class_conditional:ClassConditionalPixelFamily",
    "pixel-unconditional": "difftrain.families.unconditional:UnconditionalPixelFamily",
}


def family_class(name: str) -> type["Family"]:
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r}: expected one of {', '.join(FAMILIES)}")
    module, _, cls = FAMILIES[name].partition(":")
    return getattr(import_module(module), cls)


def family_for(cfg: RunConfig) -> "Family":
    """The family that trains `cfg`, constructed (no model is built or loaded)."""
    for name in FAMILIES:
        cls = family_class(name)
        if cls.handles(cfg):
            return cls(cfg)
    m = cfg.model
    raise ConfigError([f"no model family trains model.conditioning = {m.conditioning!r} with model.space = "
                       f"{m.space!r} and model.pretrained = {m.pretrained!r} (families: {', '.join(FAMILIES)})"])
