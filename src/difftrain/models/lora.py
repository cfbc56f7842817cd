"""LoRA adapters through peft, saved in the diffusers LoRA format that `pipe.load_lora_weights` reads."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from difftrain.models.pretrained import stable_diffusion_pipeline_class
from difftrain.writes import check_writable, writing

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora(model: torch.nn.Module, rank: int, alpha: Optional[float], dropout: float,
             target_modules: Sequence[str], key: str) -> int:
    """Freeze `model` and add trainable LoRA adapters (kept in fp32); returns the adapter parameter count."""
    model.requires_grad_(False)
    config = PeftLoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                            init_lora_weights="gaussian", target_modules=list(target_modules))
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


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in diffusers' key format."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def save_lora_weights(output_dir: Path, unet: torch.nn.Module,
                      text_encoders: Optional[dict[str, torch.nn.Module]] = None, xl: bool = False) -> Path:
    """Write OUTPUT_DIR/pytorch_lora_weights.safetensors, replacing an older file only once the new one is whole.

    `text_encoders` maps pipeline component names ("text_encoder", SDXL's "text_encoder_2") to adapted encoders;
    `xl` saves through StableDiffusionXLPipeline. The folder is checked first (writable, room for the adapters);
    a failed write removes `.lora-tmp/`.
    """
    layers = {"unet_lora_layers": lora_state_dict(unet)}
    for name, encoder in (text_encoders or {}).items():
        layers[f"{name}_lora_layers"] = lora_state_dict(encoder)
    target = output_dir / LORA_WEIGHTS_NAME
    what = "the LoRA weights"
    size = sum(t.numel() * t.element_size() for part in layers.values() for t in part.values())
    check_writable(output_dir, size, what)
    tmp = output_dir / ".lora-tmp"
    with writing(what, target, [tmp]):
        if tmp.exists():
            shutil.rmtree(tmp)
        stable_diffusion_pipeline_class(xl=xl).save_lora_weights(str(tmp), safe_serialization=True, **layers)
        (tmp / LORA_WEIGHTS_NAME).replace(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


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
