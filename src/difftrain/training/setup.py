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
from difftrain.data.dataset import ImageDataset, load_dreambooth_dataset, load_image_dataset
from difftrain.diffusion.schedule import build_noise_scheduler
from difftrain.models.conditioning import TextConditioner, caption_vocabulary
from difftrain.models.lora import add_lora, trainable_only_checkpoints
from difftrain.models.pretrained import (
    check_base_pipeline,
    load_base_noise_scheduler,
    load_base_unet,
    resolve,
    weight_dtype,
)
from difftrain.models.text import (
    build_caption_tokenizer,
    build_scratch_text_encoder,
    load_pretrained_text_encoder,
    text_hidden_size,
)
from difftrain.models.unet import build_unet, check_unet_kwargs, unet_kwargs
from difftrain.models.vae import downsample_factor, load_pretrained_vae
from difftrain.processes import accelerator_kwargs, quiet_other_ranks
from difftrain.training.distributed import check_supported
from difftrain.training.latents import LatentEncoder

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
    num_train_images: int = 0
    """Images the epoch count refers to (DreamBooth: the instance images; class images follow them)."""
    num_prior_images: int = 0
    """DreamBooth class images, stored after the instance images in `dataset`."""
    latent: bool = False
    vae: Optional[Any] = None
    """Frozen AutoencoderKL of a latent run (None until a from-scratch VAE is trained)."""
    base: Optional[str] = None
    """Resolved base pipeline of a fine-tuning run."""


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
    max_length: int = 77
    """Tokens per prompt."""


def plan_text(cfg: RunConfig, dataset: ImageDataset) -> TextSetup:
    te, m = cfg.text_encoder, cfg.model
    vocab, ids = caption_vocabulary(dataset.captions)
    max_length = te.max_length
    if m.pretrained is not None:
        tokenizer, encoder = load_pretrained_text_encoder(m.pretrained, pipeline=True, key="model.pretrained")
        # The base UNet was trained on prompts of the base tokenizer's length; keep it.
        max_length = int(tokenizer.model_max_length)
        trainable = bool(te.train) or (m.finetune == "lora" and cfg.lora.train_text_encoder)
    elif te.pretrained is not None:
        tokenizer, encoder = load_pretrained_text_encoder(te.pretrained)
        trainable = bool(te.train)
    else:
        tokenizer = build_caption_tokenizer(vocab, te.max_length)
        torch.manual_seed(cfg.train.seed)
        encoder = build_scratch_text_encoder(tokenizer, te)
        trainable = True
    tokenizer.model_max_length = max_length  # sampling must use the length the UNet was trained on
    return TextSetup(tokenizer, encoder, trainable, vocab, ids, max_length)


def precheck(cfg: RunConfig) -> None:
    """Checks that need files but no model: the base pipeline's layout and the DreamBooth instance folder."""
    if cfg.model.pretrained is not None:
        check_base_pipeline(cfg.model.pretrained)
    if cfg.data.instance_dir is not None:
        from difftrain.data.sources import open_source

        source = open_source(cfg.data.instance_dir, "folder", "train", "image", None, False, None)
        if len(source) == 0:
            raise ValueError(f"data.instance_dir = {cfg.data.instance_dir!r} holds no images")


def _latent_geometry(cfg: RunConfig) -> tuple[Optional[Any], int, int]:
    """(pretrained VAE or None, latent channels, pixels per latent cell)."""
    if cfg.model.pretrained is not None:
        vae = load_pretrained_vae(cfg.model.pretrained, key="model.pretrained")
    elif cfg.vae.pretrained is not None:
        vae = load_pretrained_vae(cfg.vae.pretrained)
    else:
        return None, cfg.vae.latent_channels, 2 ** (len(cfg.vae.block_out_channels) - 1)
    vae.requires_grad_(False).eval()
    return vae, int(vae.config.latent_channels), downsample_factor(vae)


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
    precheck(cfg)
    if cfg.data.instance_dir is not None:
        from difftrain.training.class_images import class_dir_for

        class_dir = class_dir_for(cfg) if cfg.train.prior_preservation else None
        dataset, num_train = load_dreambooth_dataset(cfg.data, class_dir)
    else:
        # Text runs captioned from labels keep the labels: evaluation scores samples per class.
        keep_labels = conditional or (text and cfg.data.caption_template is not None)
        dataset = load_image_dataset(cfg.data, want_labels=keep_labels, want_captions=text)
        num_train = len(dataset)
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
    latent = cfg.model.space == "latent" or cfg.model.pretrained is not None
    vae, sample_size, in_channels = None, cfg.data.resolution, cfg.data.channels
    if latent:
        vae, in_channels, factor = _latent_geometry(cfg)
        if cfg.data.resolution % factor:
            raise ConfigError([f"'data.resolution' = {cfg.data.resolution} must divide by the VAE's downsampling "
                               f"factor {factor}"])
        sample_size = cfg.data.resolution // factor
    kwargs: dict[str, Any] = {}
    if cfg.model.pretrained is None:
        kwargs = unet_kwargs(cfg.model, sample_size, in_channels, num_classes, cross_dim)
        problems = check_unet_kwargs(kwargs, sample_size, cfg.model.conditioning)
        if problems:
            raise ConfigError(problems)
    t = cfg.train
    global_batch = t.batch_size * t.gradient_accumulation_steps * world_size
    steps_per_epoch = max(1, math.ceil(num_train / global_batch))
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
        num_train_images=num_train,
        num_prior_images=len(dataset) - num_train,
        latent=latent,
        vae=vae,
        base=resolve(cfg.model.pretrained) if cfg.model.pretrained else None,
    )


def make_accelerator(cfg: RunConfig, output_dir: Path) -> Accelerator:
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(["'train.mixed_precision' = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on CPU"])
    # accelerate keeps mixed precision and accumulation settings in process-wide singletons; a second
    # run in the same process (library use, tests) must start from a clean state. The process-group
    # part (PartialState) is kept, so distributed launches are unaffected.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        # "auto" starts in fp32; training.precision resolves it once the model is planned.
        mixed_precision="no" if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        **accelerator_kwargs(),
    )
    check_supported(accelerator)
    quiet_other_ranks(accelerator)
    return accelerator


class DeviceEMAModel(EMAModel):
    """diffusers' EMAModel whose loaded state stays on the device of the weights it shadows.

    accelerate loads checkpoints on the CPU, and EMAModel.load_state_dict adopts those tensors as they
    are, so a run resumed (or rolled back) on a GPU would update CUDA weights into CPU shadows.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        device = self.shadow_params[0].device if self.shadow_params else None
        super().load_state_dict(state_dict)
        if device is not None:
            self.to(device)


@dataclass
class Trainables:
    unet: torch.nn.Module
    ema: Optional[EMAModel]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    noise_scheduler: DDPMScheduler
    text_encoder: Optional[torch.nn.Module] = None
    conditioner: Optional[TextConditioner] = None
    latents: Optional[LatentEncoder] = None
    partial_checkpoints: bool = False
    """Checkpoints hold only the trained parameters (LoRA); load them with strict=False."""

    def ema_parameters(self, accelerator: Accelerator) -> list[torch.nn.Parameter]:
        """The UNet parameters the EMA tracks: the trained ones."""
        return [p for p in accelerator.unwrap_model(self.unet).parameters() if p.requires_grad]


def _build_unet(plan: RunPlan, accelerator: Accelerator) -> torch.nn.Module:
    cfg = plan.cfg
    if plan.base is None:
        return build_unet(plan.unet_kwargs, cfg.model.conditioning)
    unet = load_base_unet(plan.base)
    if cfg.model.finetune == "lora":
        # Frozen base weights in the mixed-precision dtype; the adapters are kept in fp32.
        dtype = weight_dtype(cfg.train.mixed_precision)
        if dtype != torch.float32:
            unet.to(dtype)
        count = add_lora(unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.unet_target_modules,
                         "lora.unet_target_modules")
        logger.info("LoRA rank %d on the UNet: %d trainable parameters", cfg.lora.rank, count)
    return unet


def make_adamw(param_groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA in torch >= 2.4: one kernel for all parameters, a few
    times faster than the CPU default's per-parameter loop; benchmarks/step_components.py), else foreach."""
    try:
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError) as exc:  # e.g. parameters on a device without the fused kernel
        logger.debug("fused AdamW unavailable (%s); using foreach", exc)
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)


def build_trainables(plan: RunPlan, accelerator: Accelerator) -> Trainables:
    """Model, EMA, AdamW and LR schedule, prepared by accelerate and registered for checkpointing."""
    cfg, t = plan.cfg, plan.cfg.train
    # Weights are initialised from the run seed, so two runs of one config start identically.
    torch.manual_seed(t.seed)
    unet = _build_unet(plan, accelerator)
    if t.channels_last:
        unet.to(memory_format=torch.channels_last)
    param_groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": t.learning_rate}]
    text = plan.text
    text_encoder = None
    if text is not None:
        text_encoder = text.text_encoder
        lora_text = plan.base is not None and cfg.model.finetune == "lora" and cfg.lora.train_text_encoder
        text_encoder.requires_grad_(text.trainable and not lora_text)
        if lora_text:
            count = add_lora(text_encoder, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                             cfg.lora.text_encoder_target_modules, "lora.text_encoder_target_modules")
            logger.info("LoRA rank %d on the text encoder: %d trainable parameters", cfg.lora.rank, count)
        if text.trainable:
            text_encoder.train()
            lr = cfg.text_encoder.learning_rate or t.learning_rate
            param_groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": lr})
        else:
            text_encoder.eval()
    optimizer = make_adamw(param_groups, t.learning_rate, (t.adam_beta1, t.adam_beta2), t.adam_epsilon,
                           t.weight_decay)
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
    if t.compile:
        # In place, so parameter names, checkpoints, the EMA and the export see the plain module.
        accelerator.unwrap_model(unet).compile()
    conditioner = None
    if text is not None:
        conditioner = TextConditioner(text.tokenizer, text_encoder, text.vocab, text.max_length,
                                      text.trainable).to(accelerator.device)
        conditioner.precompute()
    prepared = [unet] + ([text_encoder] if text is not None and text.trainable else [])
    partial = any(not p.requires_grad for model in prepared for p in model.parameters())
    if partial:
        trainable_only_checkpoints(accelerator)
    parts = Trainables(unet, None, optimizer, lr_scheduler, _noise_scheduler(plan), text_encoder, conditioner,
                       partial_checkpoints=partial)
    if t.use_ema:
        # foreach: one multi-tensor update instead of one per parameter (benchmarks/step_components.py).
        parts.ema = DeviceEMAModel(parts.ema_parameters(accelerator), decay=t.ema_decay,
                                   use_ema_warmup=t.ema_warmup, foreach=True)
        parts.ema.to(accelerator.device)
        accelerator.register_for_checkpointing(parts.ema)
    if plan.latent:
        vae = plan.vae.to(accelerator.device)
        if cfg.vae.scaling_factor is not None:  # saved with the VAE, so the exported pipeline decodes alike
            vae.register_to_config(scaling_factor=cfg.vae.scaling_factor)
        scale = float(vae.config.scaling_factor)
        parts.latents = LatentEncoder(vae, scale, plan.dataset.images, cfg.data.random_flip, cfg.vae.cache_latents)
    return parts


def _noise_scheduler(plan: RunPlan) -> DDPMScheduler:
    if plan.base is None:
        return build_noise_scheduler(plan.cfg.diffusion, latent=plan.latent)
    scheduler = load_base_noise_scheduler(plan.base)
    logger.info("noise schedule of the base model: %s betas, %s prediction", scheduler.config.beta_schedule,
                scheduler.config.prediction_type)
    return scheduler
