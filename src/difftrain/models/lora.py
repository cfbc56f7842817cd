"""LoRA adapters through peft (plain LoRA or DoRA, per-module rank and alpha), saved in the diffusers LoRA format that
`pipe.load_lora_weights` reads and, by config, in the kohya / A1111 / ComfyUI key format."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
import safetensors.torch

from difftrain.models.pretrained import stable_diffusion_pipeline_class
from difftrain.writes import check_writable, writing

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
"""The diffusers-format file, the one `pipe.load_lora_weights(dir)` reads without a weight_name."""
KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"
"""The same adapters with kohya's keys (lora_unet_..., lora_te_/lora_te1_..., lora_te2_..., with .alpha), which
A1111, ComfyUI and kohya's scripts read, and diffusers too: `pipe.load_lora_weights(dir, weight_name=...)`."""
LORA_FORMATS = ("diffusers", "kohya")
WEIGHT_NAMES = {"diffusers": LORA_WEIGHTS_NAME, "kohya": KOHYA_WEIGHTS_NAME}

# kohya's prefix of each pipeline component (the text encoders of a one-encoder pipeline are lora_te_, of SDXL
# lora_te1_ and lora_te2_, as kohya's scripts write them).
_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def add_lora(model: torch.nn.Module, rank: int, alpha: Optional[float], dropout: float,
             target_modules: Sequence[str], key: str, use_dora: bool = False,
             rank_pattern: Optional[Mapping[str, int]] = None,
             alpha_pattern: Optional[Mapping[str, float]] = None) -> int:
    """Freeze `model` and add trainable LoRA adapters (kept in fp32); returns the adapter parameter count.

    `rank_pattern` / `alpha_pattern` map a module name (a suffix such as "attn2.to_k", or a regex matched against
    the end of the name) to that module's rank / alpha, as peft's LoraConfig takes them; `use_dora` adds DoRA's
    magnitude vectors (peft's use_dora).
    """
    model.requires_grad_(False)
    # One config's patterns serve the UNet and the text encoders: each model gets the keys that name its modules
    # (`unmatched_pattern_keys` names those that match none of any model).
    config = PeftLoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                            init_lora_weights="gaussian", target_modules=list(target_modules), use_dora=use_dora,
                            rank_pattern=_matching(model, rank_pattern), alpha_pattern=_matching(model, alpha_pattern))
    # peft's own injection, not diffusers'/transformers' `add_adapter` wrappers: those only call it after a
    # version check of their own (transformers 5 refuses peft < 0.22), so they add a floor the code does not need.
    # It leaves `model.peft_config` (read by get_peft_model_state_dict) and the adapter "default" active.
    try:
        inject_adapter_in_model(config, model, adapter_name="default")
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"{key} = {list(target_modules)}: {exc}") from exc
    cast_training_params(model, dtype=torch.float32)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if count == 0:
        raise ValueError(f"{key} = {list(target_modules)} matched no module of the model")
    return count


def _pattern_matches(pattern: str, name: str) -> bool:
    """peft's rule (peft.utils.other.get_pattern_key): the pattern matches the end of the module name."""
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


def _matching(model: torch.nn.Module, patterns: Optional[Mapping[str, float]]) -> dict:
    names = [name for name, _ in model.named_modules()]
    return {k: v for k, v in (patterns or {}).items() if any(_pattern_matches(str(k), n) for n in names)}


def unmatched_pattern_keys(models: Sequence[torch.nn.Module], patterns: Mapping[str, float]) -> list[str]:
    """The keys of a rank/alpha pattern that name no adapted module of any of `models`."""
    adapted = [name for model in models for name in lora_layers(model)]
    return [k for k in patterns if not any(_pattern_matches(str(k), n) for n in adapted)]


def lora_layers(model: torch.nn.Module) -> dict[str, tuple[int, float]]:
    """{module name: (rank, alpha)} of every adapted module of `model` (the "default" adapter)."""
    return {name: (int(module.r["default"]), float(module.lora_alpha["default"]))
            for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and "default" in module.r}


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in diffusers' key format."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def lora_metadata(model: torch.nn.Module) -> dict:
    """The adapter's peft config (rank, alpha, patterns, DoRA, targets), which diffusers stores in the safetensors
    header and `load_lora_weights` configures the adapter from; without it a loader assumes alpha = rank."""
    config = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def kohya_state_dict(modules: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The adapters of `modules` ({"unet": ..., "text_encoder": ..., "text_encoder_2": ...}) in kohya's key format,
    through diffusers' `convert_state_dict_to_kohya`.

    The converter writes alpha = rank, which is right only when lora.alpha is unset, so the alphas are set here:
    each component's `.alpha` keys all hold its most common alpha, and a module trained with another alpha (an
    alpha_pattern entry) has its lora_up scaled by alpha / that value, which gives the same update up @ down *
    alpha / rank in every reader. (diffusers 0.42's kohya loader turns per-module UNet alphas into alpha_pattern
    keys that match no module, so differing `.alpha` values would load with the wrong scale.)
    """
    peft_sd: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    one_encoder = "text_encoder_2" not in modules
    for component, model in modules.items():
        if component not in _KOHYA_PREFIX:
            raise ValueError(f"no kohya prefix for the pipeline component {component!r}")
        # transformers 5 flattened CLIPTextModel (no `text_model.` level); kohya's keys, and the tools that read
        # them, keep it (diffusers strips it again when it loads into a flattened encoder).
        inner = "text_model." if component != "unet" and not hasattr(model, "text_model") else ""
        state = {f"{component}.{inner}{k}": v for k, v in get_peft_model_state_dict(model).items()}
        layers = lora_layers(model)
        if layers:
            written = Counter(alpha for _, alpha in layers.values()).most_common(1)[0][0]
            for name, (_, alpha) in layers.items():
                alphas[f"{_KOHYA_PREFIX[component]}_{(inner + name).replace('.', '_')}"] = written
                up = f"{component}.{inner}{name}.lora_B.weight"
                if alpha != written and up in state:
                    state[up] = state[up] * (alpha / written)
        peft_sd.update(state)
    if any("lora_magnitude_vector" in k for k in peft_sd):
        # diffusers' converter misnames DoRA's magnitudes and its SD/SDXL loaders drop kohya's dora_scale keys.
        raise ValueError("DoRA adapters have no kohya export here (lora.use_dora with lora.export_format = "
                         "'kohya' or 'both'); use lora.export_format = 'diffusers'")
    converted = convert_state_dict_to_kohya(peft_sd)
    out: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        name, _, rest = key.partition(".")
        if rest == "alpha":
            if name not in alphas:
                raise ValueError(f"kohya key {key} names no adapted module")
            value = torch.tensor(alphas[name], dtype=torch.float32)
        if one_encoder and name.startswith("lora_te1_"):
            name = "lora_te_" + name[len("lora_te1_"):]  # kohya's name for the one text encoder of SD 1.x / 2.x
        out[f"{name}.{rest}"] = value.contiguous()
    return out


def _text_encoder_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A text encoder's adapters in diffusers' format; DoRA magnitudes as `...lora_magnitude_vector.weight`, the
    name under which diffusers (0.42, transformers 5) loads them into a text encoder (the bare name peft's state
    dict gives is dropped there as an unexpected key, leaving the magnitudes at their initial values)."""
    return {f"{k}.weight" if k.endswith("lora_magnitude_vector") else k: v for k, v in lora_state_dict(model).items()}


def save_lora_weights(output_dir: Path, unet: torch.nn.Module,
                      text_encoders: Optional[Mapping[str, Optional[torch.nn.Module]]] = None,
                      pipeline_class: Optional[type] = None,
                      formats: Sequence[str] = ("diffusers",)) -> dict[str, Path]:
    """Write the adapters of `unet` and `text_encoders` ({"text_encoder": ..., "text_encoder_2": ...}: the
    pipeline's component names; None entries are skipped) into OUTPUT_DIR, one file per format; returns
    {format: path}.

    "diffusers": pytorch_lora_weights.safetensors through `pipeline_class.save_lora_weights` (default
    StableDiffusionPipeline; StableDiffusionXLPipeline for SDXL), with the adapters' peft config as metadata so
    alpha, per-module rank/alpha and DoRA load back as trained. "kohya": pytorch_lora_weights_kohya.safetensors.
    The folder is checked first (writable, room for the adapters); every file is written into `.lora-tmp/` and
    replaces an older one only once whole (a failed write removes `.lora-tmp/`).
    """
    unknown = [f for f in formats if f not in LORA_FORMATS]
    if unknown or not formats:
        raise ValueError(f"LoRA export formats {list(formats)}: choose from {list(LORA_FORMATS)}")
    pipeline_class = pipeline_class or stable_diffusion_pipeline_class()
    encoders = {name: m for name, m in (text_encoders or {}).items() if m is not None}
    layers = {"unet": lora_state_dict(unet), **{name: _text_encoder_layers(m) for name, m in encoders.items()}}
    size = len(formats) * sum(t.numel() * t.element_size() for part in layers.values() for t in part.values())
    targets = {fmt: output_dir / WEIGHT_NAMES[fmt] for fmt in formats}
    what = "the LoRA weights"
    check_writable(output_dir, size, what)
    tmp = output_dir / ".lora-tmp"
    with writing(what, targets[formats[0]], [tmp]):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if "kohya" in targets:
            safetensors.torch.save_file(kohya_state_dict({"unet": unet, **encoders}), str(tmp / KOHYA_WEIGHTS_NAME),
                      metadata={"format": "pt"})
        if "diffusers" in targets:
            kwargs = {f"{name}_lora_layers": part for name, part in layers.items()}
            kwargs.update({f"{name}_lora_adapter_metadata": lora_metadata(m)
                           for name, m in {"unet": unet, **encoders}.items()})
            pipeline_class.save_lora_weights(str(tmp), safe_serialization=True, **kwargs)
        for fmt, target in targets.items():
            (tmp / WEIGHT_NAMES[fmt]).replace(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return targets


def trainable_only_checkpoints(accelerator) -> None:
    """Checkpoint only the trained parameters of partly frozen models (LoRA), not the frozen base.

    The matching load is `accelerator.load_state(dir, strict=False)`.
    """

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model, state in zip(models, weights):
            named = list(model.named_parameters())
            trained = {name for name, p in named if p.requires_grad}
            if len(trained) < len(named):
                for name in [k for k in state if k not in trained]:
                    del state[name]

    accelerator.register_save_state_pre_hook(save_hook)
