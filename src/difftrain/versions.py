"""Versions of difftrain and the libraries a run depends on, for `difftrain --version` and the run record."""

from __future__ import annotations

import platform
from importlib import metadata

# The libraries whose releases change what a run computes or can load; listed in this order.
TRACKED_LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "peft", "datasets", "tokenizers",
                     "huggingface_hub", "safetensors", "torchmetrics")


def library_versions() -> dict[str, str]:
    """{'python': ..., 'difftrain': ..., 'torch': ..., ...}; a library that is not installed reads 'not installed'.

    Read from package metadata, so nothing heavy (torch) is imported.
    """
    from difftrain import __version__

    versions = {"python": platform.python_version(), "difftrain": __version__}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def format_versions(versions: dict[str, str]) -> str:
    """One line: 'difftrain 0.1.0 (python 3.11.7, torch 2.13.0, ...)'."""
    rest = ", ".join(f"{name} {version}" for name, version in versions.items() if name != "difftrain")
    return f"difftrain {versions.get('difftrain', '?')} ({rest})"
