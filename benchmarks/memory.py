"""Peak memory of one SDXL training step with and without difftrain's low-memory options.

    python benchmarks/memory.py --work-dir /tmp/memory                  # tiny SDXL through `difftrain check` (CPU)
    python benchmarks/memory.py --work-dir /tmp/memory --real-sdxl      # + the real SDXL UNet's shapes (CUDA only)

1. The tiny SDXL pipeline of the tests (tests/tiny_sdxl.py), fully fine-tuned at --resolution px with batch
   --batch-size: every variant is a fresh `difftrain check` process (so one variant's memory never counts in
   another's), and the number is the peak check prints for its timed step (training/memory.py: on CPU the process's
   resident high-water mark during the step, on CUDA the allocated peak). Variants: the default (AdamW, latents
   cached once), gradient checkpointing, latents encoded every step (vae.cache_latents=false), 8-bit AdamW (refused
   without CUDA: the line printed is the refusal), and LoRA for scale.
2. --real-sdxl (CUDA): SDXL-base's UNet config (2.57B parameters) with random weights, no download, one full
   fine-tuning step at 1024 px (128 x 128 latents, 77 x 2048 text states) in bf16 autocast, batch 1, in a fresh
   process per variant: AdamW, + gradient checkpointing, 8-bit AdamW (bitsandbytes), both. Without CUDA it only
   builds the UNet on the meta device and prints its parameter count (the config check).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))
from common import markdown_table  # noqa: E402
from machine import describe_machine  # noqa: E402

PEAK = re.compile(r"peak (?P<kind>[a-z ]+?) (?P<peak>[\d.]+) MiB \((?P<before>[\d.]+) MiB before the step, "
                  r"\+(?P<increase>[\d.]+) MiB\)")
STEP = re.compile(r"one optimizer step of (\d+) images in ([\d.]+) s")

TINY_VARIANTS = {
    "full fine-tune, AdamW, cached latents": [],
    "+ gradient checkpointing": ["train.gradient_checkpointing=true"],
    "latents encoded every step": ["vae.cache_latents=false"],
    "8-bit AdamW": ["train.optimizer=adamw_8bit"],
    "8-bit AdamW + gradient checkpointing": ["train.optimizer=adamw_8bit", "train.gradient_checkpointing=true"],
    "LoRA rank 4 (UNet), for scale": ["model.finetune=lora", "lora.rank=4"],
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the architecture; weights are random here).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
REAL_VARIANTS = {
    "AdamW": dict(checkpointing=False, optimizer="adamw"),
    "+ gradient checkpointing": dict(checkpointing=True, optimizer="adamw"),
    "8-bit AdamW": dict(checkpointing=False, optimizer="adamw_8bit"),
    "8-bit AdamW + gradient checkpointing": dict(checkpointing=True, optimizer="adamw_8bit"),
}


def write_images(folder: Path, count: int, side: int) -> Path:
    """Smooth random colour fields (PNG), so the VAE sees image-like input; nothing downloaded."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC).save(folder / f"img{i}.png")
    return folder


def tiny_sdxl_rows(work: Path, resolution: int, batch_size: int) -> list[list]:
    from tests.tiny_sdxl import build_tiny_sdxl

    base = work / "tiny-sdxl"
    if not (base / "model_index.json").is_file():
        build_tiny_sdxl(base)
    images = write_images(work / "images", max(8, batch_size), resolution)
    rows = []
    for name, extra in TINY_VARIANTS.items():
        args = [sys.executable, "-m", "difftrain.cli", "check", "tiny/dreambooth-sdxl-lora", "--output-dir",
                str(work / "run"), f"model.pretrained={base}", f"data.instance_dir={images}",
                "model.finetune=full", "train.prior_preservation=false", f"data.resolution={resolution}",
                f"train.batch_size={batch_size}", "train.mixed_precision=no", *extra]
        done = subprocess.run(args, capture_output=True, text=True, cwd=work)
        text = done.stdout + done.stderr
        peak, step = PEAK.search(text), STEP.search(text)
        if peak is None:
            refusal = next((line.strip() for line in text.splitlines() if "adamw_8bit" in line or "ERROR" in line),
                           f"exit {done.returncode}")
            rows.append([name, "not run", "", "", refusal[:160]])
            continue
        rows.append([name, float(peak["peak"]), float(peak["before"]), float(peak["increase"]),
                     f"{float(step[2]):.2f} s" if step else ""])
    return rows


def real_sdxl_step(variant: str) -> dict:
    """One step of the real SDXL UNet's shapes on CUDA (run in its own process); the peak from measure_peak."""
    from diffusers import UNet2DConditionModel

    from difftrain.training.memory import measure_peak
    from difftrain.training.setup import enable_gradient_checkpointing, make_optimizer

    options = REAL_VARIANTS[variant]
    device = torch.device("cuda")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET).to(device)
    if options["checkpointing"]:
        enable_gradient_checkpointing([unet])
    optimizer = make_optimizer(options["optimizer"], [{"params": list(unet.parameters()), "lr": 1e-5}], 1e-5,
                               (0.9, 0.999), 1e-8, 0.0)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, 4, 128, 128, device=device, generator=g)
    states = torch.randn(1, 77, 2048, device=device, generator=g)
    added = {"text_embeds": torch.randn(1, 1280, device=device, generator=g),
             "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]], device=device)}
    t = torch.tensor([500], device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = unet(x, t, encoder_hidden_states=states, added_cond_kwargs=added).sample
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on, as in every step after the first
    peak = measure_peak(step, device)
    return {"peak_mib": peak.peak_bytes / 2**20, "before_mib": peak.before_bytes / 2**20,
            "parameters": sum(p.numel() for p in unet.parameters())}


def real_sdxl_rows(work: Path) -> list[list]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        count = sum(p.numel() for p in UNet2DConditionModel(**SDXL_UNET).parameters())
    print(f"SDXL UNet config: {count / 1e9:.3f}B parameters")
    if not torch.cuda.is_available():
        print("no CUDA device: the real-SDXL-shape step is measured on a GPU only")
        return []
    rows = []
    for name in REAL_VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--real-sdxl-variant", name], capture_output=True,
                              text=True, cwd=work)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            rows.append([name, "not run", "", (done.stderr.strip().splitlines() or ["?"])[-1][:160]])
            continue
        result = json.loads(lines[-1])
        rows.append([name, result["peak_mib"], result["before_mib"], ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/difftrain-memory"))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--real-sdxl", action="store_true")
    parser.add_argument("--real-sdxl-variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.real_sdxl_variant:
        print(json.dumps(real_sdxl_step(args.real_sdxl_variant)))
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(describe_machine())
    print(f"\ntiny SDXL (tests/tiny_sdxl.py), full fine-tune, {args.resolution} px, batch {args.batch_size}, fp32:")
    print(markdown_table(["variant", "peak MiB", "before step MiB", "step's own MiB", "step time / note"],
                         tiny_sdxl_rows(args.work_dir, args.resolution, args.batch_size)))
    if args.real_sdxl:
        rows = real_sdxl_rows(args.work_dir)
        if rows:
            print("\nSDXL-base UNet shapes, random weights, 1024 px, batch 1, bf16 autocast, full fine-tune (CUDA):")
            print(markdown_table(["variant", "peak allocated MiB", "before step MiB", "note"], rows))


if __name__ == "__main__":
    main()
