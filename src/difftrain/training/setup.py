"""Everything built before the first step: the run plan (sizes, intervals), the accelerator, and the trainables
(the family's models prepared by accelerate, AdamW, the LR schedule, the EMA).

`plan_run` reads the data and checks the model shape without writing anything, so every user error is
reported before an output directory is created.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from difftrain.config import ConfigError, RunConfig
from difftrain.data.batches import TrainingData
from difftrain.data.loader import BatchLoader, loader_workers
from difftrain.data.order import stream_position
from difftrain.diffusion.objective import Objective
from difftrain.diffusion.objectives import OBJECTIVES
from difftrain.families.base import Family
from difftrain.models.lora import trainable_only_checkpoints
from difftrain.processes import accelerator_kwargs, launched_local_size, quiet_other_ranks
from difftrain.training.distributed import check_supported

logger = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """What a config resolves to once the data is known: sizes and intervals in optimizer steps."""

    cfg: RunConfig
    dataset: TrainingData
    """Decoded (RAM or disk cache) or streamed."""
    global_batch_size: int
    steps_per_epoch: int
    max_steps: int
    checkpoint_every_steps: Optional[int]
    sample_every_steps: Optional[int]
    num_train_images: int
    """Images the epoch count refers to (DreamBooth: the instance images; class images follow them)."""


def _every(steps: Optional[int], epochs: Optional[int], steps_per_epoch: int) -> Optional[int]:
    if steps is not None:
        return steps
    if epochs is not None:
        return epochs * steps_per_epoch
    return None


def plan_run(cfg: RunConfig, family: Family, world_size: int = 1) -> RunPlan:
    """Load the data through the family (after `family.check_files`) and resolve sizes and intervals. Raises
    ValueError/FileNotFoundError/ConfigError; writes nothing."""
    family.load_data()
    family.plan()
    t = cfg.train
    num_train = family.num_train_images
    global_batch = t.batch_size * t.gradient_accumulation_steps * world_size
    steps_per_epoch = max(1, math.ceil(num_train / global_batch))
    max_steps = t.max_steps if t.max_steps is not None else t.num_epochs * steps_per_epoch
    return RunPlan(
        cfg=cfg,
        dataset=family.dataset,
        global_batch_size=global_batch,
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        checkpoint_every_steps=_every(t.checkpoint_every_steps, t.checkpoint_every_epochs, steps_per_epoch),
        sample_every_steps=_every(t.sample_every_steps, t.sample_every_epochs, steps_per_epoch),
        num_train_images=num_train,
    )


def build_objective(cfg: RunConfig, family: Family) -> Objective:
    """The training objective, on the base model's schedule when the family fine-tunes one, for x0 of the family's
    sample size (after `family.plan`)."""
    sample_size, _ = family.geometry()
    return OBJECTIVES[cfg.diffusion.objective].from_config(cfg.diffusion, latent=family.latent,
                                                           base_schedule=family.base_schedule(),
                                                           sample_size=sample_size)


def check_mixed_precision(cfg: RunConfig) -> None:
    """Refuse a precision or an optimizer this machine cannot run, before anything is read or written (training calls
    it first, `difftrain check` too)."""
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(["'train.mixed_precision' = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on CPU"])
    check_optimizer(cfg)


def check_optimizer(cfg: RunConfig) -> None:
    """train.optimizer = 'adamw_8bit' needs bitsandbytes (not a dependency of difftrain) and a CUDA GPU."""
    if cfg.train.optimizer != "adamw_8bit":
        return
    if not torch.cuda.is_available():
        raise ConfigError(["'train.optimizer' = 'adamw_8bit' needs a CUDA GPU (bitsandbytes' 8-bit optimizers run on "
                           "CUDA only) and this machine has none; use train.optimizer = 'adamw'"])
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(["'train.optimizer' = 'adamw_8bit' needs bitsandbytes, which is not installed: "
                           "pip install bitsandbytes (or use train.optimizer = 'adamw')"])


def enable_gradient_checkpointing(modules: list[torch.nn.Module]) -> list[str]:
    """Turn on activation recomputation in each trained network that has it: diffusers models
    (`enable_gradient_checkpointing`) and transformers models (`gradient_checkpointing_enable`, non-reentrant, so
    it also works when the inputs need no gradient, as with LoRA on a frozen embedding). Returns the class names of
    the modules that have neither (left as they are)."""
    without = []
    for module in modules:
        if getattr(module, "_supports_gradient_checkpointing", True) is False:
            without.append(type(module).__name__)
        elif hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        elif hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            without.append(type(module).__name__)
    return without


def make_accelerator(cfg: RunConfig, output_dir: Path) -> Accelerator:
    """The run's Accelerator, for a config whose mixed precision is resolved (training/precision.py)."""
    assert cfg.train.mixed_precision != "auto", "resolve_mixed_precision runs before the Accelerator exists"
    check_mixed_precision(cfg)
    # accelerate keeps mixed precision and accumulation settings in process-wide singletons; a second
    # run in the same process (library use, tests) must start from a clean state. The process-group
    # part (PartialState) is kept, so distributed launches are unaffected.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
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


def make_optimizer(name: str, param_groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """train.optimizer: torch's AdamW, or bitsandbytes' AdamW8bit (checked by `check_optimizer` before any model)."""
    if name == "adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return make_adamw(param_groups, lr, betas, eps, weight_decay)


def make_adamw(param_groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA in torch >= 2.4: one kernel for all parameters, a few
    times faster than the CPU default's per-parameter loop; benchmarks/step_components.py), else foreach."""
    try:
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError) as exc:  # e.g. parameters on a device without the fused kernel
        logger.debug("fused AdamW unavailable (%s); using foreach", exc)
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)


@dataclass
class Trainables:
    network: torch.nn.Module
    """The prepared denoising network."""
    trained: list[torch.nn.Module]
    """Every prepared trained module: the network first, then the family's other trained modules."""
    frozen: list[torch.nn.Module]
    """Modules the family uses without training them (a frozen text encoder, the VAE)."""
    ema: Optional[EMAModel]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    partial_checkpoints: bool = False
    """Checkpoints hold only the trained parameters (LoRA); load them with strict=False."""

    def ema_parameters(self, accelerator: Accelerator) -> list[torch.nn.Parameter]:
        """The network parameters the EMA tracks: the trained ones."""
        return [p for p in accelerator.unwrap_model(self.network).parameters() if p.requires_grad]


@dataclass
class TrainingRun:
    """Everything the loop works with, built once by training/loop.py (and by `difftrain check`)."""

    plan: RunPlan
    family: Family
    objective: Objective
    accelerator: Accelerator
    parts: Trainables
    loader: Optional[BatchLoader] = None
    """The step's micro-batches by slot (built from the rest when not given)."""

    def __post_init__(self) -> None:
        if self.loader is None:
            self.loader = build_loader(self.plan, self.family, self.accelerator)

    @property
    def cfg(self) -> RunConfig:
        return self.plan.cfg

    def close(self) -> None:
        """Stop the loader's worker processes."""
        self.loader.close()


def build_loader(plan: RunPlan, family: Family, accelerator: Accelerator) -> BatchLoader:
    """The loader of this process's micro-batches: slot `step * accumulation + micro_step` of every step to the
    end of the run, read ahead by worker processes unless the data is a RAM tensor (data/loader.py)."""
    t = plan.cfg.train
    rank, world = accelerator.process_index, accelerator.num_processes

    def position_of(slot: int) -> int:
        step, micro = divmod(slot, t.gradient_accumulation_steps)
        return stream_position(step, micro, rank, t.gradient_accumulation_steps, world, t.batch_size)

    workers = loader_workers(plan.cfg.data.loader_workers, family.dataset, accelerator.device,
                             launched_local_size(world))
    if workers:
        logger.info("data loader: %d worker process(es) read micro-batches ahead (data.loader_workers)", workers)
    return BatchLoader(family.dataset, family.rows, position_of, t.batch_size,
                       end_slot=plan.max_steps * t.gradient_accumulation_steps, workers=workers,
                       pin_memory=accelerator.device.type == "cuda")


def build_trainables(cfg: RunConfig, family: Family, max_steps: int, accelerator: Accelerator) -> Trainables:
    """The family's models prepared by accelerate (gradient checkpointing turned on if asked), the optimizer, the LR
    schedule and the EMA, registered for checkpoints."""
    t = cfg.train
    # Weights are initialised from the run seed, so two runs of one config start identically.
    torch.manual_seed(t.seed)
    models = family.build_models(accelerator.mixed_precision)
    network = models.network
    if t.channels_last:
        network.to(memory_format=torch.channels_last)
    if t.gradient_checkpointing:
        # One place for every family: the network and the other trained modules (a LoRA text encoder, ...).
        without = enable_gradient_checkpointing([network] + [m for m, _ in models.trained])
        if without:
            logger.warning("train.gradient_checkpointing: %s do(es) not support it; trained without",
                           ", ".join(without))
    param_groups = [{"params": [p for p in network.parameters() if p.requires_grad], "lr": t.learning_rate}]
    for module, lr in models.trained:
        param_groups.append({"params": [p for p in module.parameters() if p.requires_grad],
                             "lr": lr or t.learning_rate})
    optimizer = make_optimizer(t.optimizer, param_groups, t.learning_rate, (t.adam_beta1, t.adam_beta2),
                               t.adam_epsilon, t.weight_decay)
    # accelerate steps a prepared LR scheduler once per process per optimizer step, so the step
    # counts are scaled by the world size (as diffusers' training scripts do).
    lr_scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=t.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    # Trained modules are prepared (so checkpointed and synchronised); frozen ones are reloaded, only moved.
    *trained, optimizer, lr_scheduler = accelerator.prepare(network, *[m for m, _ in models.trained], optimizer,
                                                            lr_scheduler)
    for module in models.frozen:
        module.to(accelerator.device)
    if t.compile:
        # In place, so parameter names, checkpoints, the EMA and the export see the plain module.
        accelerator.unwrap_model(trained[0]).compile()
    family.use_prepared(trained[0], trained[1:], accelerator)
    partial = any(not p.requires_grad for model in trained for p in model.parameters())
    if partial:
        trainable_only_checkpoints(accelerator)
    parts = Trainables(trained[0], trained, models.frozen, None, optimizer, lr_scheduler, partial_checkpoints=partial)
    if t.use_ema:
        # foreach: one multi-tensor update instead of one per parameter (benchmarks/step_components.py).
        parts.ema = DeviceEMAModel(parts.ema_parameters(accelerator), decay=t.ema_decay,
                                   use_ema_warmup=t.ema_warmup, foreach=True)
        parts.ema.to(accelerator.device)
        accelerator.register_for_checkpointing(parts.ema)
    return parts
