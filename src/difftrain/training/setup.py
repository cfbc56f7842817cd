"""Everything built before the first step: the run plan (data, sizes, intervals), accelerator, model, optimizer.

`plan_run` reads the data and checks the model shape without writing anything, so every user error
is reported before an output directory is created.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from difftrain.config import ConfigError, RunConfig
from difftrain.data.dataset import ImageDataset, load_image_dataset
from difftrain.diffusion.schedule import build_noise_scheduler
from difftrain.models.conditioning import TextConditioner, caption_vocabulary
from difftrain.models.text import (
    build_caption_tokenizer,
    build_scratch_text_encoder,
    load_pretrained_text_encoder,
    text_hidden_size,
)
from difftrain.models.unet import build_unet, check_unet_kwargs, unet_kwargs

logger = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """What a config resolves to once the data is known."""

    cfg: RunConfig
    dataset: ImageDataset
    num_classes: int
    unet_kwargs: dict[str, Any]
    global_batch_size: int
    steps_per_epoch: int
    max_steps: int
    checkpoint_every_steps: Optional[int]
    sample_every_steps: Optional[int]
    text: Optional["TextSetup"] = None


@dataclass
class TextSetup:
    """Text conditioning of a run: the encoder, its tokenizer and the captions as ids."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    trainable: bool
    vocab: list[str]
    """Distinct captions; the last entry is the empty prompt."""
    caption_ids: torch.Tensor
    """(N,) index into vocab per image."""


def plan_text(cfg: RunConfig, dataset: ImageDataset) -> TextSetup:
    te = cfg.text_encoder
    vocab, ids = caption_vocabulary(dataset.captions)
    if te.pretrained is not None:
        tokenizer, encoder = load_pretrained_text_encoder(te.pretrained)
        trainable = bool(te.train)
    else:
        tokenizer = build_caption_tokenizer(vocab, te.max_length)
        torch.manual_seed(cfg.train.seed)
        encoder = build_scratch_text_encoder(tokenizer, te)
        trainable = True
    tokenizer.model_max_length = te.max_length  # sampling must use the length the UNet was trained on
    return TextSetup(tokenizer, encoder, trainable, vocab, ids)


def _every(steps: Optional[int], epochs: Optional[int], steps_per_epoch: int) -> Optional[int]:
    if steps is not None:
        return steps
    if epochs is not None:
        return epochs * steps_per_epoch
    return None


def plan_run(cfg: RunConfig, world_size: int = 1) -> RunPlan:
    """Load the data and resolve sizes and intervals. Raises ValueError/FileNotFoundError/ConfigError."""
    conditional = cfg.model.conditioning == "class"
    text = cfg.model.conditioning == "text"
    dataset = load_image_dataset(cfg.data, want_labels=conditional, want_captions=text)
    num_classes = 0
    if conditional:
        num_classes = cfg.model.num_classes or dataset.num_classes
        if dataset.labels is not None and int(dataset.labels.max()) >= num_classes:
            raise ConfigError(
                [f"'model.num_classes' = {num_classes} but the data has labels up to {int(dataset.labels.max())}"]
            )
        if not dataset.class_names or len(dataset.class_names) != num_classes:
            dataset.class_names = [str(i) for i in range(num_classes)]
    text_setup = plan_text(cfg, dataset) if text else None
    cross_dim = text_hidden_size(text_setup.text_encoder) if text_setup else None
    kwargs = unet_kwargs(cfg.model, cfg.data.resolution, cfg.data.channels, num_classes, cross_dim)
    problems = check_unet_kwargs(kwargs, cfg.data.resolution, cfg.model.conditioning)
    if problems:
        raise ConfigError(problems)
    t = cfg.train
    global_batch = t.batch_size * t.gradient_accumulation_steps * world_size
    steps_per_epoch = max(1, math.ceil(len(dataset) / global_batch))
    max_steps = t.max_steps if t.max_steps is not None else t.num_epochs * steps_per_epoch
    return RunPlan(
        cfg=cfg,
        dataset=dataset,
        num_classes=num_classes,
        unet_kwargs=kwargs,
        global_batch_size=global_batch,
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        checkpoint_every_steps=_every(t.checkpoint_every_steps, t.checkpoint_every_epochs, steps_per_epoch),
        sample_every_steps=_every(t.sample_every_steps, t.sample_every_epochs, steps_per_epoch),
        text=text_setup,
    )


def make_accelerator(cfg: RunConfig, output_dir: Path) -> Accelerator:
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(["'train.mixed_precision' = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on CPU"])
    # accelerate keeps mixed precision and accumulation settings in process-wide singletons; a second
    # run in the same process (library use, tests) must start from a clean state. The process-group
    # part (PartialState) is kept, so distributed launches are unaffected.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


@dataclass
class Trainables:
    unet: torch.nn.Module
    ema: Optional[EMAModel]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    noise_scheduler: DDPMScheduler
    text_encoder: Optional[torch.nn.Module] = None
    conditioner: Optional[TextConditioner] = None


def build_trainables(plan: RunPlan, accelerator: Accelerator) -> Trainables:
    """Model, EMA, AdamW and LR schedule, prepared by accelerate and registered for checkpointing."""
    cfg, t = plan.cfg, plan.cfg.train
    # Weights are initialised from the run seed, so two runs of one config start identically.
    torch.manual_seed(t.seed)
    unet = build_unet(plan.unet_kwargs, cfg.model.conditioning)
    param_groups = [{"params": list(unet.parameters()), "lr": t.learning_rate}]
    text = plan.text
    text_encoder = None
    if text is not None:
        text_encoder = text.text_encoder
        text_encoder.requires_grad_(text.trainable)
        if text.trainable:
            text_encoder.train()
            lr = cfg.text_encoder.learning_rate or t.learning_rate
            param_groups.append({"params": list(text_encoder.parameters()), "lr": lr})
        else:
            text_encoder.eval()
    optimizer = torch.optim.AdamW(
        param_groups,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        weight_decay=t.weight_decay,
    )
    # accelerate steps a prepared LR scheduler once per process per optimizer step, so the step
    # counts are scaled by the world size (as diffusers' training scripts do).
    lr_scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=t.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=plan.max_steps * accelerator.num_processes,
    )
    if text is not None and text.trainable:
        # Prepared (and so checkpointed and synchronised) only when trained; a frozen encoder is reloaded.
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        if text_encoder is not None:
            text_encoder.to(accelerator.device)
    conditioner = None
    if text is not None:
        conditioner = TextConditioner(text.tokenizer, text_encoder, text.vocab, cfg.text_encoder.max_length,
                                      text.trainable).to(accelerator.device)
        conditioner.precompute()
    ema = None
    if t.use_ema:
        ema = EMAModel(
            accelerator.unwrap_model(unet).parameters(),
            decay=t.ema_decay,
            use_ema_warmup=t.ema_warmup,
            model_cls=type(accelerator.unwrap_model(unet)),
            model_config=accelerator.unwrap_model(unet).config,
        )
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    return Trainables(unet, ema, optimizer, lr_scheduler, build_noise_scheduler(cfg.diffusion), text_encoder, conditioner)
