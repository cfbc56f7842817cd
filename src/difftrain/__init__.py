"""difftrain: train, sample and export diffusion image models with diffusers from one typed config.

Public API:
    load_config, RunConfig, ConfigError   -- configuration (difftrain.config)
    train                                 -- run or resume training (difftrain.training.loop)
    load_pipeline, ClassConditionalPipeline, generate -- inference on exported runs (difftrain.pipeline)
"""

__version__ = "0.1.0"

from difftrain.config import ConfigError, RunConfig, load_config  # noqa: E402
from difftrain.pipeline import ClassConditionalPipeline, generate, load_pipeline  # noqa: E402


def train(cfg, stop_at_step=None):
    """Train (or resume) a run; see difftrain.training.loop.train."""
    from difftrain.training.loop import train as _train

    return _train(cfg, stop_at_step=stop_at_step)


__all__ = [
    "__version__", "ConfigError", "RunConfig", "load_config", "train",
    "ClassConditionalPipeline", "generate", "load_pipeline",
]
