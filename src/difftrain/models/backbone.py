"""Denoising backbones: a diffusers UNet, or a transformer (DiT for unconditional and class-conditional runs,
PixArt for text), planned from `model.*` and called through one function, so families, the step and the samplers
never switch on the kind of network.

A plan is the network class plus its kwargs, checked before anything is built or written. `network_call(cls)`
gives the (module, x_t, t, condition) -> prediction function of a class; it takes the class rather than the
module because training calls the module accelerate wrapped (DDP), whose type says nothing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel

from difftrain.models.unet import build_unet, check_unet_kwargs, unet_kwargs

BACKBONES = ("unet", "dit")

# Transformer sizes: DiT-S (Peebles & Xie 2023) is 'base'; the smaller two fit CPU budgets.
DIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(patch_size=2, depth=4, width=64, num_heads=4),
    "small": dict(patch_size=2, depth=6, width=256, num_heads=4),
    "base": dict(patch_size=2, depth=12, width=384, num_heads=6),
}

# diffusers' DiTPipeline feeds class 1000 as the unconditional class for guidance (ImageNet's 1,000 classes), so
# a class-conditional DiT has a 1,000-class table whose row 1000 is the trained null class, whatever its own count
# of classes (rows between are never trained). Plain `DiTPipeline.from_pretrained(dir)` then guides correctly.
DIT_PIPELINE_NULL_CLASS = 1000

# A DiT needs a class embedding (its adaLN-Zero blocks take one): an unconditional DiT has one class, always 0.
_UNCONDITIONAL_DIT_CLASSES = 1


@dataclass(frozen=True)
class Conditioning:
    """What the network is conditioned on."""

    kind: Literal["none", "class", "text"]
    num_classes: int = 0
    text_dim: Optional[int] = None
    """Width of the text encoder's states (cross-attention input)."""


@dataclass
class NetworkPlan:
    """A network class and its kwargs: what `build` constructs (weights from the global RNG)."""

    cls: type
    kwargs: dict[str, Any]

    def build(self) -> torch.nn.Module:
        if self.cls in (UNet2DModel, UNet2DConditionModel):
            return build_unet(self.kwargs, self.cls)
        network = self.cls(**self.kwargs)
        if self.cls is DiTTransformer2DModel:
            disable_label_dropout(network)
        return network

    @property
    def null_class(self) -> Optional[int]:
        """The label index of the unconditional class of a class-conditional network (condition dropout), else None."""
        if self.cls is DiTTransformer2DModel:
            classes = self.kwargs.get("num_embeds_ada_norm")
            return None if classes == _UNCONDITIONAL_DIT_CLASSES else classes
        n = self.kwargs.get("num_class_embeds")
        return None if n is None else n - 1

    @property
    def description(self) -> dict[str, Any]:
        """For the mixed-precision probe's cache key and the logs."""
        return {"class": self.cls.__name__, **self.kwargs}


def disable_label_dropout(network: torch.nn.Module) -> None:
    """Turn off the label dropout inside DiT's class embeddings (diffusers' LabelEmbedding drops 10% of labels with
    the global RNG in training mode). difftrain drops labels itself, from the step's generator (train.
    condition_dropout), so runs stay a pure function of the seed; the table keeps its null-class row."""
    for module in network.modules():
        if hasattr(module, "token_drop") and hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0


def transformer_settings(model_cfg: Any) -> dict[str, int]:
    """patch_size, depth, width, num_heads: the `model.size` preset ('custom': none), then the explicit values."""
    settings: dict[str, Any] = {} if model_cfg.size == "custom" else dict(DIT_PRESETS[model_cfg.size])
    for key in ("patch_size", "depth", "width", "num_heads"):
        value = getattr(model_cfg, key, None)
        if value is not None:
            settings[key] = value
    return settings


def _transformer_problems(settings: dict[str, Any], sample_size: int, explicit: dict, cls: type) -> list[str]:
    problems = [f"model.{key} must be set (model.size = 'custom' has no preset)"
                for key in ("patch_size", "depth", "width", "num_heads") if key not in settings]
    if problems:
        return problems
    patch, width, heads = settings["patch_size"], settings["width"], settings["num_heads"]
    if sample_size % patch:
        problems.append(f"model.patch_size = {patch} does not divide the network's sample size {sample_size} "
                        "(data.resolution, or the latent size in latent space)")
    if width % heads:
        problems.append(f"model.num_heads = {heads} does not divide model.width = {width}")
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    problems += [f"model.transformer.{key}: not a {cls.__name__} argument (allowed: {', '.join(sorted(allowed))})"
                 for key in explicit if key not in allowed]
    return problems


def unread_backbone_settings(model_cfg: Any) -> list[str]:
    """model.* fields that are set but belong to the other backbone (model.unet with a DiT, the transformer fields
    with a UNet)."""
    if model_cfg.backbone == "dit":
        return ["unet"] if model_cfg.unet else []
    return [k for k in ("patch_size", "depth", "width", "num_heads", "transformer") if getattr(model_cfg, k)]


def plan_network(model_cfg: Any, sample_size: int, channels: int, condition: Conditioning,
                 unet_presets: dict[str, dict[str, Any]]) -> tuple[NetworkPlan, list[str]]:
    """The network of `model.backbone` for x0 of `channels` x `sample_size`^2, and the problems found in it
    (empty when it can be built)."""
    if model_cfg.backbone == "unet":
        cls = UNet2DConditionModel if condition.kind == "text" else UNet2DModel
        extra: dict[str, Any] = {}
        if condition.kind == "class":
            extra["num_class_embeds"] = condition.num_classes + 1  # the last row is the null class
        elif condition.kind == "text":
            extra["cross_attention_dim"] = condition.text_dim
        kwargs = unet_kwargs(unet_presets, model_cfg.size, model_cfg.unet, sample_size, channels, extra)
        return NetworkPlan(cls, kwargs), check_unet_kwargs(kwargs, sample_size, cls)
    if model_cfg.backbone != "dit":
        raise ValueError(f"model.backbone {model_cfg.backbone!r}: expected one of {', '.join(BACKBONES)}")
    settings = transformer_settings(model_cfg)
    cls = PixArtTransformer2DModel if condition.kind == "text" else DiTTransformer2DModel
    explicit = dict(model_cfg.transformer)
    problems = _transformer_problems(settings, sample_size, explicit, cls)
    if problems:
        return NetworkPlan(cls, {}), problems
    width, heads = settings["width"], settings["num_heads"]
    kwargs: dict[str, Any] = dict(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=channels,
                                  out_channels=channels, num_layers=settings["depth"], sample_size=sample_size,
                                  patch_size=settings["patch_size"])
    if cls is DiTTransformer2DModel:
        classes = (max(condition.num_classes, DIT_PIPELINE_NULL_CLASS) if condition.kind == "class"
                   else _UNCONDITIONAL_DIT_CLASSES)
        kwargs["num_embeds_ada_norm"] = classes
    else:
        # No resolution / aspect-ratio embeddings (PixArt-alpha's at 1024 px): square images of one size.
        kwargs.update(cross_attention_dim=width, caption_channels=condition.text_dim, use_additional_conditions=False)
    kwargs.update(explicit)
    return NetworkPlan(cls, kwargs), []


# -- calling a network -------------------------------------------------------------------------------------------

# (module, x_t, t, condition) -> prediction shaped like x_t (float32 where the module runs in lower precision).
NetworkCall = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _batched(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One time per example: transformers' timestep embeddings take (B,), samplers step with a scalar."""
    t = torch.as_tensor(t, device=x.device)
    return t.reshape(1).expand(x.shape[0]) if t.ndim == 0 else t


def _unet(module, x, t, condition):
    return module(x, t, class_labels=condition).sample


@dataclass
class TextTimeCondition:
    """The condition of an SDXL-style UNet (`addition_embed_type="text_time"`): cross-attention states, the pooled
    text embedding (B, P) and the six size/crop ids per image (B, 6): original (h, w), crop (top, left), target
    (h, w), as diffusers' SDXL pipelines pass them in `added_cond_kwargs`."""

    states: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor


def _unet_text(module, x, t, condition):
    if isinstance(condition, TextTimeCondition):
        return module(x, t, encoder_hidden_states=condition.states,
                      added_cond_kwargs={"text_embeds": condition.text_embeds, "time_ids": condition.time_ids}).sample
    states, mask = text_condition(condition)
    return module(x, t, encoder_hidden_states=states).sample


def _dit(module, x, t, condition):
    labels = condition if condition is not None else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return module(x, timestep=_batched(t, x), class_labels=labels).sample


def _pixart(module, x, t, condition):
    states, mask = text_condition(condition)
    return module(x, encoder_hidden_states=states, timestep=_batched(t, x),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, encoder_attention_mask=mask).sample


def text_condition(condition: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(states, attention mask or None) of a text condition: a states tensor, or a (states, mask) pair."""
    if isinstance(condition, (tuple, list)):
        return condition[0], condition[1]
    return condition, None


_CALLS: dict[type, NetworkCall] = {
    UNet2DModel: _unet,
    UNet2DConditionModel: _unet_text,
    DiTTransformer2DModel: _dit,
    PixArtTransformer2DModel: _pixart,
}


def network_call(cls: type) -> NetworkCall:
    """How to call a network of class `cls` (or of a subclass)."""
    for known, call in _CALLS.items():
        if issubclass(cls, known):
            return call
    raise ValueError(f"{cls.__name__} is not a backbone difftrain calls (known: "
                     f"{', '.join(c.__name__ for c in _CALLS)})")


def takes_text_mask(cls: type) -> bool:
    """Whether a text network of class `cls` is fed the tokenizer's attention mask with the text states (PixArt, as
    diffusers' PixArt pipelines feed it; the encoder sees the mask too). A UNet sees all tokens, as Stable Diffusion."""
    return issubclass(cls, PixArtTransformer2DModel)


def denoising_network(pipe: Any) -> Optional[torch.nn.Module]:
    """The denoising network of a pipeline: its `unet` (UNet pipelines) or `transformer` (DiT, PixArt), else None."""
    for name in ("unet", "transformer"):
        network = getattr(pipe, name, None)
        if network is not None:
            return network
    return None


def component_name(network: torch.nn.Module) -> str:
    """The pipeline component that holds `network`: 'unet' for UNets, 'transformer' for transformers (as diffusers'
    DiT and PixArt pipelines name it)."""
    return "unet" if isinstance(network, (UNet2DModel, UNet2DConditionModel)) else "transformer"


def null_class(network: torch.nn.Module) -> Optional[int]:
    """Index of the null (unconditional) class of a class-conditional network, else None."""
    if isinstance(network, DiTTransformer2DModel):
        classes = network.config.num_embeds_ada_norm
        return None if classes == _UNCONDITIONAL_DIT_CLASSES else int(classes)
    n = getattr(network.config, "num_class_embeds", None)
    return None if n is None else int(n) - 1


def geometry(network: torch.nn.Module) -> tuple[int, int]:
    """(channels, sample size) of the network's x_t."""
    return int(network.config.in_channels), int(network.config.sample_size)
