"""`train.mixed_precision: auto`: the faster of fp32 and mixed precision for this model on this device.

Measured, not guessed: a few forward/backward steps of the run's own UNet at its micro-batch, once per
(device, library versions, model, batch), cached under the difftrain cache directory. Only devices
with native low-precision math are probed (CUDA GPUs; CPUs whose oneDNN reports bf16 support). On
other CPUs bf16 is emulated and was 6x slower than fp32 on the 2-core AVX2 machine of
docs/performance.md, so "auto" is fp32 there without a probe. A resumed run keeps the precision it
started with (the resolved value is saved in config.yaml and every checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from difftrain.cache import cache_root
from difftrain.writes import best_effort, replace_file

logger = logging.getLogger(__name__)

PROBE_WARMUP_STEPS = 2
PROBE_TIMED_STEPS = 3
# Mixed precision changes the numerics (and fp16 needs loss scaling): take it only for a clear gain.
MIN_SPEEDUP = 1.10


def speed_cache_dir() -> Path:
    return cache_root() / "speed"


def precision_candidates(device: torch.device) -> list[str]:
    """fp32 ('no') and the one mixed precision worth timing on `device`, if any."""
    if device.type == "cuda":
        return ["no", "bf16" if torch.cuda.is_bf16_supported() else "fp16"]
    if device.type == "cpu" and cpu_has_native_bf16():
        return ["no", "bf16"]
    return ["no"]


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def probe_inputs(network: torch.nn.Module, batch_size: int, text_length: Optional[int],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Random inputs of the training step's shapes for `network` (noisy sample, timesteps, and the condition in
    models/backbone.py's convention: class 0 for a network with a class table, random caption states, with an
    all-ones attention mask for a transformer, or None)."""
    from diffusers import UNet2DConditionModel

    c = network.config
    g = torch.Generator().manual_seed(0)
    size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)
    hw = (size, size) if isinstance(size, int) else size
    x = torch.randn(batch_size, c.in_channels, *hw, generator=g).to(device)
    t = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
    condition: Any = None
    if text_length is not None:
        width = getattr(c, "caption_channels", None) or c.cross_attention_dim
        states = torch.randn(batch_size, text_length, width, generator=g).to(device)
        condition = states if isinstance(network, UNet2DConditionModel) else (
            states, torch.ones(batch_size, text_length, dtype=torch.long, device=device))
        if getattr(c, "addition_embed_type", None) == "text_time":  # SDXL: pooled embedding and size/crop ids
            from difftrain.models.backbone import TextTimeCondition

            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            side = 8 * hw[0]
            condition = TextTimeCondition(states, torch.randn(batch_size, pooled, generator=g).to(device),
                                          torch.tensor([[side, side, 0, 0, side, side]] * batch_size,
                                                       dtype=torch.float32, device=device))
    elif getattr(c, "num_class_embeds", None) or getattr(c, "num_embeds_ada_norm", None):
        condition = torch.zeros(batch_size, dtype=torch.long, device=device)
    return x, t, condition


def time_step_ms(unet: torch.nn.Module, inputs: tuple, device: torch.device, precision: str,
                 warmup_steps: int = PROBE_WARMUP_STEPS, timed_steps: int = PROBE_TIMED_STEPS) -> float:
    """Median milliseconds of one forward + backward of `unet` under `precision`'s autocast."""
    x, t, cond = inputs
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    from difftrain.models.backbone import network_call

    call = network_call(type(unet))

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = call(unet, x, t, cond)
        out.float().square().mean().backward()
        unet.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup_steps):
        step()
    times = []
    for _ in range(timed_steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def choose_precision(ms_per_step: dict[str, float]) -> str:
    """fp32 unless a mixed precision is at least MIN_SPEEDUP times faster."""
    best = min(ms_per_step, key=ms_per_step.get)
    return best if best == "no" or ms_per_step["no"] >= MIN_SPEEDUP * ms_per_step[best] else "no"


def probe_key(unet_config: dict, device: torch.device, batch_size: int, text_length: Optional[int],
              candidates: list[str]) -> str:
    import diffusers

    described = {"device": device_name(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
                 "unet": {k: v for k, v in unet_config.items() if not k.startswith("_")},
                 "batch_size": batch_size, "text_length": text_length, "candidates": candidates}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


def measure_precision(build_unet: Callable[[], torch.nn.Module], unet_config: dict, device: torch.device,
                      batch_size: int, text_length: Optional[int], candidates: list[str]) -> dict[str, Any]:
    """The cached probe result for this model/device/batch, or a fresh probe (then cached).

    `unet_config` describes the model for the cache key, so a cache hit builds (or loads) nothing.
    """
    key = probe_key(unet_config, device, batch_size, text_length, candidates)
    path = speed_cache_dir() / f"{key}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("choice") in candidates:
                return {**cached, "source": f"cache {path}"}
        except (OSError, ValueError):
            logger.warning("ignoring an unreadable precision probe cache %s", path)
    unet = build_unet().to(device).train()
    inputs = probe_inputs(unet, batch_size, text_length, device)
    ms = {p: time_step_ms(unet, inputs, device, p) for p in candidates}
    del unet, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result = {"choice": choose_precision(ms), "ms_per_step": ms, "device": device_name(device),
              "batch_size": batch_size}
    with best_effort("the precision probe cache", path):  # a cache: an unwritable one costs a probe next time
        replace_file(path, lambda tmp: tmp.write_text(json.dumps(result, indent=1)), "the precision probe cache")
    return {**result, "source": "probe"}


def resolve_auto_precision(build_unet: Callable[[], torch.nn.Module], unet_config: dict, device: torch.device,
                           batch_size: int, text_length: Optional[int], is_main_process: bool,
                           share: Callable[[list], list]) -> str:
    """The concrete precision for "auto". The main process decides; `share` hands its answer to all ranks."""
    candidates = precision_candidates(device)
    decided = ["no"]
    if len(candidates) == 1:
        if is_main_process:
            logger.info("mixed precision auto -> no: %s has no native low-precision math to gain from "
                        "(docs/performance.md)", device_name(device))
    elif is_main_process:
        result = measure_precision(build_unet, unet_config, device, batch_size, text_length, candidates)
        times = ", ".join(f"{p} {ms:.1f} ms" for p, ms in result["ms_per_step"].items())
        logger.info("mixed precision auto -> %s (forward+backward per step at batch %d: %s; %s)", result["choice"],
                    batch_size, times, result["source"])
        decided = [result["choice"]]
    return share(decided)[0]


def resolved_before(saved: Any) -> Optional[str]:
    """The precision a run resolved "auto" to when it started, from its saved config (resume_check.SavedConfig;
    None when there is none, or it was "auto" or does not validate)."""
    if saved is None or saved.values is None:
        return None
    from difftrain.config import ConfigError, section_from_dict

    try:
        # The schema reads the value as a new config would (e.g. YAML's bare `no`, which loads as false).
        previous = section_from_dict("train", saved.values.get("train")).mixed_precision
    except ConfigError as exc:
        logger.warning("mixed precision auto: the saved config does not validate (%s); resolving afresh", exc)
        return None
    return None if previous == "auto" else previous


def resolve_mixed_precision(cfg: Any, family: Any, processes: Any, saved: Any = None) -> Any:
    """The config with `train.mixed_precision: auto` replaced by a concrete choice (other values as they are).

    The one place "auto" is resolved: by training and by `difftrain check`, before the Accelerator exists
    (accelerate fixes the precision when it is created), so config.yaml and every checkpoint save the choice.
    A resumed run keeps what it resolved to before (`saved`: resume_check.SavedConfig); otherwise the family's
    network is timed (`processes`: accelerate's PartialState; the main process decides, the others follow).
    """
    if cfg.train.mixed_precision != "auto":
        return cfg
    choice = resolved_before(saved)
    if choice is not None:
        logger.info("mixed precision auto: keeping %r, which this run resolved to before", choice)
    else:
        from accelerate.utils import broadcast_object_list

        spec = family.network_spec()

        def share(values: list) -> list:
            return broadcast_object_list(values) if processes.num_processes > 1 else values

        choice = resolve_auto_precision(spec.build, spec.config, processes.device, cfg.train.batch_size,
                                        spec.text_length, processes.is_main_process, share)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=choice))
