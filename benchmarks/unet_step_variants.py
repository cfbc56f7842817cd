"""One training step of a preset's UNet (noise, forward, MSE, backward, fused AdamW) under the speed
settings the issue asks about, side by side in one process: precision (fp32 with TF32 off, TF32, fp16,
bf16 autocast), channels_last memory format (+cl), torch.compile (+compile), cuDNN autotuning (+bench),
and the micro-batch size.

    python benchmarks/unet_step_variants.py butterflies --batch-sizes 16,128 \
        --variants fp32,tf32,fp16,bf16,bf16+cl,bf16+cl+compile --peak-tflops 989

Text-conditioned presets get random encoder states of the text encoder's width and the configured
caption length (the text encoder itself is not timed: difftrain runs a frozen one once per caption).
On a CPU, `--threads` sets torch's thread count (one thread per process is how difftrain's fastest
CPU layout runs, see BENCHMARKS.md).

Each variant builds a fresh UNet from the preset's config (the run seed's weights), runs
`--warmup-steps` steps (compilation happens there), then times `--steps` steps with the device
synchronised, and prints images/s, its ratio to the first variant at the same batch, and model FLOPs
utilisation (torch.utils.flop_counter's forward + backward FLOPs per image times images/s over
`--peak-tflops`). Data loading is not part of it: this is the model's own ceiling.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import flops_per_image, markdown_table  # noqa: E402
from machine import describe_machine  # noqa: E402

PRECISIONS = {"fp32": None, "tf32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def text_width(cfg) -> int:
    """The width of the encoder states the UNet cross-attends to: the pretrained encoder's, or the
    from-scratch encoder's configured hidden size."""
    if cfg.text_encoder.pretrained is None:
        return cfg.text_encoder.hidden_size
    return pretrained_text_width(cfg.text_encoder.pretrained)


@functools.lru_cache
def pretrained_text_width(path: str) -> int:
    """Loaded once per encoder: build() runs for every variant."""
    from difftrain.models.text import load_pretrained_text_encoder, text_hidden_size

    return text_hidden_size(load_pretrained_text_encoder(path)[1])


def build(preset: str, overrides: list[str]) -> tuple[torch.nn.Module, object, int]:
    """The preset's UNet (the run seed's weights), its training noise scheduler, and the number of caption
    tokens it cross-attends to (0 for a UNet without text)."""
    from difftrain.config import load_config
    from difftrain.diffusion.schedule import build_noise_scheduler
    from diffusers import UNet2DConditionModel, UNet2DModel

    from difftrain.models.unet import COND_UNET_PRESETS, UNET_PRESETS, build_unet, unet_kwargs

    cfg = load_config(preset, overrides)
    if cfg.model.space != "pixel" or cfg.model.pretrained is not None:
        raise ValueError(f"preset {preset!r}: only pixel-space UNets trained from scratch are timed here")
    text = cfg.model.conditioning == "text"
    cross_dim = text_width(cfg) if text else None
    torch.manual_seed(cfg.train.seed)
    # The class count only sizes the label embedding; 10 stands in where the data would tell.
    extra = ({"cross_attention_dim": cross_dim} if text else
             {"num_class_embeds": (cfg.model.num_classes or 10) + 1} if cfg.model.conditioning == "class" else {})
    kwargs = unet_kwargs(COND_UNET_PRESETS if text else UNET_PRESETS, cfg.model.size, cfg.model.unet,
                         cfg.data.resolution, cfg.data.channels, extra)
    text_tokens = cfg.text_encoder.max_length if cross_dim else 0
    cls = UNet2DConditionModel if text else UNet2DModel
    return build_unet(kwargs, cls), build_noise_scheduler(cfg.diffusion), text_tokens


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(preset: str, overrides: list[str], variant: str, batch_size: int, device: torch.device,
                 warmup_steps: int, steps: int, profile: bool = False) -> dict:
    parts = variant.split("+")
    precision, flags = parts[0], set(parts[1:])
    if precision not in PRECISIONS or not flags <= {"cl", "compile", "bench"}:
        raise ValueError(f"variant {variant!r}: expected one of {sorted(PRECISIONS)} then optional +cl, +compile, +bench")
    torch.backends.cudnn.benchmark = "bench" in flags
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    from difftrain.training.precision import probe_inputs

    unet, noise_scheduler, text_tokens = build(preset, overrides)
    unet.to(device)
    memory_format = torch.channels_last if "cl" in flags else torch.contiguous_format
    unet.to(memory_format=memory_format)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(unet) if "compile" in flags else unet
    c = unet.config
    g = torch.Generator(device=device).manual_seed(0)
    x0 = (torch.rand(batch_size, c.in_channels, c.sample_size, c.sample_size, generator=g, device=device) * 2 - 1)
    x0 = x0.contiguous(memory_format=memory_format)
    condition = probe_inputs(unet, batch_size, text_tokens or None, device)[2]  # class 0 / random caption states
    extra = {} if condition is None else {"encoder_hidden_states" if text_tokens else "class_labels": condition}
    dtype = PRECISIONS[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    num_timesteps = noise_scheduler.config.num_train_timesteps

    def step() -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=g, device=device).contiguous(memory_format=memory_format)
        t = torch.randint(0, num_timesteps, (batch_size,), generator=g, device=device)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.mse_loss(forward(noisy, t, **extra).sample.float(), noise)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    start = time.perf_counter()
    for _ in range(warmup_steps):
        step()
    sync(device)
    warmup_seconds = time.perf_counter() - start
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            step()
            sync(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"profile of one step, {variant} at batch {batch_size}:")
        print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
    seconds = []
    for _ in range(steps):
        tick = time.perf_counter()
        loss = step()
        sync(device)
        seconds.append(time.perf_counter() - tick)
    if not torch.isfinite(loss):
        raise RuntimeError(f"variant {variant} at batch {batch_size}: loss {loss.item()} is not finite")
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    median = statistics.median(seconds)
    result = {"variant": variant, "batch_size": batch_size, "images_per_s": batch_size / median,
              "median_step_ms": 1e3 * median, "warmup_seconds": warmup_seconds, "peak_device_mib": peak_mib}
    return result


def release(device: torch.device) -> None:
    """Free what the last variant held (called once its model and optimizer are out of scope)."""
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="a difftrain preset whose UNet is timed, e.g. butterflies")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides (model.unet..., data.resolution)")
    parser.add_argument("--variants", default="fp32,bf16,bf16+cl")
    parser.add_argument("--batch-sizes", default="16")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak in the variant's precision (bf16/fp16), for MFU")
    parser.add_argument("--profile", default="", help="comma-separated variants to print a torch.profiler table of")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"Machine: {describe_machine()}", flush=True)
    unet, _, text_tokens = build(args.preset, args.overrides)
    flops = flops_per_image(unet.to(device), text_tokens)
    print(f"forward + backward FLOPs per image: {flops / 1e9:.2f} G", flush=True)
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        for variant in args.variants.split(","):
            r = time_variant(args.preset, args.overrides, variant, batch_size, device, args.warmup_steps, args.steps,
                             profile=variant in args.profile.split(","))
            release(device)
            r["mfu"] = flops * r["images_per_s"] / (args.peak_tflops * 1e12) if args.peak_tflops else None
            results.append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                args.json.write_text(json.dumps({"flops_per_image": flops, "results": results}, indent=1))
    header = ["batch", "variant", "images/s", "vs first", "step ms", "warm-up s", "peak device MiB", "MFU"]
    rows = []
    for r in results:
        first = next(f for f in results if f["batch_size"] == r["batch_size"])
        rows.append([r["batch_size"], r["variant"], r["images_per_s"], f"{r['images_per_s'] / first['images_per_s']:.2f}x",
                     r["median_step_ms"], r["warmup_seconds"],
                     "-" if r["peak_device_mib"] is None else f"{r['peak_device_mib']:.0f}",
                     "-" if r["mfu"] is None else f"{r['mfu']:.1%}"])
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
