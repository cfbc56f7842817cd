"""difftrain: train, sample and export diffusion image models with diffusers from one typed config.

Public API (imported lazily, so `difftrain --help` does not load torch):
    load_config, RunConfig, ConfigError                 configuration (difftrain.config)
    train                                               run or resume training (difftrain.training.loop)
    load_pipeline, ClassConditionalPipeline,            inference on exported runs (difftrain.pipeline)
    TextToImagePipeline, UnconditionalPipeline
    generate, generate_from_text                        sampling from a UNet or transformer (difftrain.sampling.generate)
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ConfigError": "difftrain.config",
    "RunConfig": "difftrain.config",
    "load_config": "difftrain.config",
    "train": "difftrain.training.loop",
    "ClassConditionalPipeline": "difftrain.pipeline",
    "generate": "difftrain.sampling.generate",
    "load_pipeline": "difftrain.pipeline",
    "TextToImagePipeline": "difftrain.pipeline",
    "UnconditionalPipeline": "difftrain.pipeline",
    "generate_from_text": "difftrain.sampling.generate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'difftrain' has no attribute {name!r}")
