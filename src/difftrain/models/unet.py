"""Build diffusers UNet2DModel / UNet2DConditionModel backbones from a size preset plus explicit kwargs."""

from __future__ import annotations

import inspect
from typing import Any, Optional

from diffusers import UNet2DConditionModel, UNet2DModel

# Attention only at the lowest resolutions: on CPU full-resolution attention costs far more than it
# buys (see shared/design/calibration.md), and small data sets do not need it.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    "small": dict(
        block_out_channels=(64, 128, 128, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=32,
    ),
    # The butterflies tutorial's UNet (113.7M parameters at 3 channels).
    "base": dict(
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=8,
    ),
}


# Text-conditioned UNet2DConditionModel presets: cross-attention on the lower-resolution levels.
COND_UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    "small": dict(
        block_out_channels=(64, 128, 128, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=8,
    ),
    "base": dict(
        block_out_channels=(128, 256, 256, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=8,
    ),
}


def unet_kwargs(presets: dict[str, dict[str, Any]], size: str, explicit: dict, sample_size: int, channels: int,
                conditioning_kwargs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The full UNet kwargs: the size preset (none for 'custom'), the data's geometry, the family's conditioning
    kwargs (e.g. num_class_embeds, cross_attention_dim), then the config's explicit `model.unet` kwargs."""
    kwargs: dict[str, Any] = {} if size == "custom" else dict(presets[size])
    kwargs.update(sample_size=sample_size, in_channels=channels, out_channels=channels)
    kwargs.update(conditioning_kwargs or {})
    kwargs.update(explicit)
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return kwargs


def check_unet_kwargs(kwargs: dict[str, Any], resolution: int, cls: type = UNet2DModel) -> list[str]:
    """Problems that diffusers would only report as obscure shape errors (or silently ignore) for `cls`."""
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    problems = [
        f"model.unet.{key}: not a {cls.__name__} argument (allowed: {', '.join(sorted(allowed))})"
        for key in kwargs
        if key not in allowed
    ]
    channels = kwargs.get("block_out_channels", ())
    groups = kwargs.get("norm_num_groups", 32)
    for c in channels:
        if c % groups:
            problems.append(f"model.unet: block_out_channels {list(channels)} must all divide by norm_num_groups={groups}")
            break
    levels = len(channels)
    for key in ("down_block_types", "up_block_types"):
        if key in kwargs and len(kwargs[key]) != levels:
            problems.append(f"model.unet.{key} has {len(kwargs[key])} entries; block_out_channels has {levels}")
    # UNet2DConditionModel pads odd sizes on the way up (the seed trains it at 28 px); UNet2DModel cannot.
    if levels and cls is UNet2DModel and resolution % (2 ** (levels - 1)):
        problems.append(
            f"data.resolution = {resolution} must divide by 2^{levels - 1} = {2 ** (levels - 1)} for a {levels}-level UNet"
        )
    return problems


def build_unet(kwargs: dict[str, Any], cls: type = UNet2DModel) -> UNet2DModel | UNet2DConditionModel:
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"model.unet: {exc}") from exc
