"""Bad numerics: a non-finite loss or gradient is never applied.

Policy (`train.nonfinite_*`): skip the step (gradients zeroed; optimizer, LR schedule and EMA are not
advanced), and after `nonfinite_max_skips` consecutive skips roll back to the newest checkpoint and
apply a remedy (raise the precision fp16 -> bf16 -> fp32, or lower the learning rate), at most
`nonfinite_max_rollbacks` times; then stop with a message naming the step, its batch and what was
tried. The remedies taken are stored in each checkpoint's progress.json, so a resumed run keeps them.

Deciding whether to apply a step needs one host sync per optimizer step (a finite check of the loss
and the gradient norm); that is the price of never applying a bad update.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator

from difftrain.config import TrainConfig
from difftrain.training.progress import read_progress

logger = logging.getLogger(__name__)

# Test hook, not a config key: poison the loss of these (1-based) steps with NaN, e.g. "3,4,5".
# DIFFTRAIN_INJECT_NAN_TIMES caps how often each listed step is poisoned in one process (default: always),
# so a test can model a transient fault ("1") as well as a bad batch that fails on every replay.
INJECT_ENV = "DIFFTRAIN_INJECT_NAN_AT_STEPS"
INJECT_TIMES_ENV = "DIFFTRAIN_INJECT_NAN_TIMES"

PRECISION_LADDER = ("fp16", "bf16", "no")
_PRECISION_NAMES = {"fp16": "fp16", "bf16": "bf16", "no": "fp32"}


class NonFiniteError(ValueError):
    """Training stopped: non-finite steps persisted after every remedy of the policy."""


class NanInjector:
    """Reads the test hook once; `poison(step, loss)` returns NaN loss for the listed steps."""

    def __init__(self, spec: Optional[str] = None, times: Optional[str] = None):
        spec = os.environ.get(INJECT_ENV, "") if spec is None else spec
        times = os.environ.get(INJECT_TIMES_ENV, "") if times is None else times
        try:
            self.steps = {int(s) for s in spec.replace(" ", "").split(",") if s}
            self.times = int(times) if times.strip() else None
        except ValueError as exc:
            raise ValueError(f"{INJECT_ENV}={spec!r} / {INJECT_TIMES_ENV}={times!r}: expected comma-separated "
                             "step numbers and an integer count") from exc
        self.fired: dict[int, int] = {}
        if self.steps:
            logger.warning("test hook %s: the loss of steps %s is replaced by NaN", INJECT_ENV, sorted(self.steps))

    def poison(self, step_number: int, loss: torch.Tensor) -> torch.Tensor:
        if step_number not in self.steps:
            return loss
        count = self.fired.get(step_number, 0)
        if self.times is not None and count >= self.times:
            return loss
        self.fired[step_number] = count + 1
        return loss * float("nan")


@dataclass
class NumericsState:
    """What the policy has done so far; stored in progress.json."""

    skipped_steps: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0
    precision: Optional[str] = None
    """The precision in use when it was raised; None means the configured one."""
    actions: list = field(default_factory=list)


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # PyTorch's total norm: multi-tensor (foreach) kernels on CUDA instead of a kernel per parameter.
    return torch.nn.utils.get_total_norm(grads, foreach=None).float()


class NonFiniteGuard:
    """Decides per optimizer step whether it is applied, and what happens after repeated failures."""

    def __init__(self, train_cfg: TrainConfig, accelerator: Accelerator, models: list[torch.nn.Module],
                 batch_files: Callable[[int], list[str]], injector: Optional[NanInjector] = None):
        self.cfg = train_cfg
        self.accelerator = accelerator
        self.models = models
        self.batch_files = batch_files
        self.injector = injector if injector is not None else NanInjector()
        self.state = NumericsState()
        self.consecutive: list[int] = []
        self.last_applied = True
        self._last_loss = self._last_norm = float("nan")

    # -- policy text -----------------------------------------------------------------------------

    def describe(self) -> str:
        t = self.cfg
        return (f"non-finite loss/gradient policy: skip the step (not applied; LR schedule and EMA not advanced); "
                f"after {t.nonfinite_max_skips} consecutive skips roll back to the newest checkpoint and "
                f"{self._remedy_text()}, at most {t.nonfinite_max_rollbacks} time(s); then stop")

    def _remedy_text(self) -> str:
        remedy = self._next_remedy()
        if remedy[0] == "precision":
            return f"raise the precision to {_PRECISION_NAMES[remedy[1]]}"
        return f"multiply the learning rate by {self.cfg.nonfinite_lr_factor:g}"

    def _current_precision(self) -> str:
        return self.state.precision or self.cfg.mixed_precision

    def _next_remedy(self) -> tuple[str, str]:
        current = self._current_precision()
        if self.cfg.nonfinite_remedy in ("auto", "raise_precision") and current != "no":
            return "precision", PRECISION_LADDER[PRECISION_LADDER.index(current) + 1]
        return "lr", ""

    # -- the step ----------------------------------------------------------------------------------

    def poison(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Test hook: `step` is the 0-based loop index; the hook's numbers are the 1-based step numbers."""
        return self.injector.poison(step + 1, loss)

    def autocast(self):
        """The configured autocast, or the raised precision's once the policy changed it."""
        if self.state.precision is None or self.state.precision == self.cfg.mixed_precision:
            return self.accelerator.autocast()
        if self.state.precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)

    def check(self, loss_sum: torch.Tensor, grad_norm: Optional[torch.Tensor], params: list) -> bool:
        """True when the step may be applied: loss and gradient norm finite (one host sync)."""
        norm = (grad_norm if grad_norm is not None else _grad_norm(params)).to(loss_sum.device).float()
        loss = loss_sum.detach().float()
        finite = (torch.isfinite(loss) & torch.isfinite(norm)).float()
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite, reduction="mean")  # every rank must take the same decision
        # One device-to-host read for the decision and the numbers an error message needs.
        all_finite, loss_value, norm_value = torch.stack([finite, loss, norm]).tolist()
        ok = all_finite == 1.0
        if not ok and self.accelerator.scaler is not None and math.isfinite(loss_value):
            # fp16 gradient overflow with a finite loss is the GradScaler's business: it skips the update
            # and lowers its scale; counting it here would fight the scaler.
            return True
        self._last_loss, self._last_norm = loss_value, norm_value
        return ok

    # -- after the step --------------------------------------------------------------------------

    def after_step(self, step: int, applied: bool) -> str:
        """Record the outcome of loop step `step` (0-based); returns 'continue', 'rollback' or raises."""
        if applied:
            self.consecutive = []
            return "continue"
        number = step + 1
        self.consecutive.append(number)
        self.state.skipped_steps += 1
        files = self.batch_files(step)
        logger.warning("step %d: non-finite loss or gradient (loss %s, gradient norm %s); step skipped, not applied "
                       "(%d consecutive, %d skipped in this run); batch: %s", number, self._last_loss,
                       self._last_norm, len(self.consecutive), self.state.skipped_steps, _short(files))
        if len(self.consecutive) < self.cfg.nonfinite_max_skips:
            return "continue"
        if self.state.rollbacks >= self.cfg.nonfinite_max_rollbacks:
            self._stop(number, files)
        return "rollback"

    def _stop(self, number: int, files: list[str]) -> None:
        tried = "; ".join(self.state.actions) or "nothing else (train.nonfinite_max_rollbacks = 0)"
        message = (
            f"training stopped at step {number}: the loss or gradient was non-finite on {len(self.consecutive)} "
            f"consecutive steps ({', '.join(map(str, self.consecutive))}), {self.state.skipped_steps} skipped in all. "
            f"Tried: skipping each one; {tried}. Batch of step {number}: {', '.join(files)}. "
            "Check those images, lower train.learning_rate, use train.mixed_precision='no', or raise "
            "train.nonfinite_max_rollbacks; the last checkpoint is intact and the same command resumes."
        )
        logger.error("%s", message)
        raise NonFiniteError(message)

    def rollback(self, step: int, load_checkpoint: Callable[[], tuple[int, Optional[Path]]],
                 optimizer, lr_scheduler) -> int:
        """Roll back and apply the next remedy; returns the 0-based loop index to continue from."""
        number = step + 1
        self.state.rollbacks += 1
        loaded_step, path = load_checkpoint()
        if path is None:
            # Nothing to roll back to; no skipped step was applied, so the current weights are the last good ones.
            resume_at, where = step + 1, "no checkpoint yet: kept the current weights"
            checkpoint_lr_scale = self.state.lr_scale
        else:
            resume_at, where = loaded_step, f"rolled back to {path.name}"
            checkpoint_lr_scale = float(read_progress(path).numerics.get("lr_scale", 1.0))
        kind, target = self._next_remedy()
        if kind == "precision":
            self.set_precision(target)
            remedy = f"precision raised to {_PRECISION_NAMES[target]}"
        else:
            self.state.lr_scale *= self.cfg.nonfinite_lr_factor
            remedy = f"learning rate x{self.state.lr_scale:g} of the schedule"
        # The loaded optimizer and schedule carry the checkpoint's LR scale; bring them to the current one.
        scale_lr(optimizer, lr_scheduler, self.state.lr_scale / checkpoint_lr_scale)
        action = (f"rollback {self.state.rollbacks} at step {number} after {len(self.consecutive)} non-finite steps: "
                  f"{where}, {remedy}")
        self.state.actions.append(action)
        logger.warning("%s", action)
        self.consecutive = []
        return resume_at

    def set_precision(self, precision: str) -> None:
        """Switch the autocast of the step; the prepared models' own autocast wrapper is removed."""
        self.state.precision = precision
        for model in self.models:
            # accelerate's public way to drop the autocast wrapper `prepare` put on the forward (in place, on the
            # module inside any DDP wrapper); the step's own autocast (`autocast()` above) then decides.
            self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)

    def load_state(self, saved: Optional[dict]) -> None:
        """Restore the policy's counters and remedies from a resumed checkpoint's progress.json."""
        if not saved:
            return
        known = {k: v for k, v in saved.items() if k in NumericsState.__dataclass_fields__}
        self.state = NumericsState(**known)
        if self.state.precision is not None and self.state.precision != self.cfg.mixed_precision:
            self.set_precision(self.state.precision)
            logger.info("numerics policy: keeping precision %s from the checkpoint", _PRECISION_NAMES[self.state.precision])
        if self.state.actions:
            logger.info("numerics policy so far: %s", "; ".join(self.state.actions))

    def state_dict(self) -> dict:
        return asdict(self.state)


def scale_lr(optimizer, lr_scheduler, factor: float) -> None:
    """Multiply the learning rate now and for the rest of the schedule (base LRs are checkpointed with it)."""
    if math.isclose(factor, 1.0):
        return
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
    inner.base_lrs = [lr * factor for lr in inner.base_lrs]
    for group in getattr(optimizer, "optimizer", optimizer).param_groups:
        group["lr"] *= factor
    if hasattr(inner, "_last_lr"):
        inner._last_lr = [group["lr"] for group in getattr(optimizer, "optimizer", optimizer).param_groups]


def _short(files: list[str], limit: int = 8) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f" ... ({len(files)} in all)" if len(files) > limit else "")
