"""Seed 000's butterflies training loop (the diffusers "train a diffusion model" tutorial the seed annotates),
written the way it is written there, for side-by-side benchmarks.

Kept from the seed: datasets' `set_transform` with torchvision-style per-step PIL preprocessing
(Resize(128, 128), RandomHorizontalFlip, ToTensor, Normalize(0.5, 0.5)) through
DataLoader(batch_size=16, shuffle=True); UNet2DModel(128 px, layers_per_block 2, block_out_channels
(128, 128, 256, 256, 512, 512), attention in the fifth down and second up block); DDPMScheduler(1000);
AdamW(lr 1e-4); cosine schedule with 500 warm-up steps over 50 epochs; accelerate with the seed's fp16
mixed precision (on CUDA; fp32 elsewhere, since fp16 autocast needs CUDA); gradient clipping at 1.0.

Different because this machine is offline: the images come from a local folder (`--images`) through
datasets' imagefolder loader instead of huggan/smithsonian_butterflies_subset from the hub; the
transforms are written with PIL/numpy (torchvision is not installed), with the same operations.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import flops_per_image  # noqa: E402  (instrumentation, not part of the seed's loop)

IMAGE_SIZE = 128
BATCH_SIZE = 16


def preprocess(image: Image.Image) -> torch.Tensor:
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)  # transforms.Resize((128, 128))
    if random.random() < 0.5:  # transforms.RandomHorizontalFlip()
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)  # ToTensor
    return (tensor - 0.5) / 0.5  # Normalize([0.5], [0.5])


def transform(examples):
    return {"images": [preprocess(image.convert("RGB")) for image in examples["image"]]}


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def train(images: Path, out: Path, max_steps: int, num_epochs: int = 50, seed: int = 0) -> dict:
    from accelerate import Accelerator
    from datasets import load_dataset
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    random.seed(seed)
    torch.manual_seed(seed)
    dataset = load_dataset("imagefolder", data_dir=str(images), split="train")
    dataset.set_transform(transform)
    train_dataloader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    model = build_unet()
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer=optimizer, num_warmup_steps=500,
                                                   num_training_steps=len(train_dataloader) * num_epochs)
    mixed_precision = "fp16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=1)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(model, optimizer, train_dataloader,
                                                                           lr_scheduler)
    flops = flops_per_image(accelerator.unwrap_model(model))
    step_seconds = []
    global_step = 0
    while global_step < max_steps:
        tick = time.perf_counter()
        for batch in train_dataloader:
            clean_images = batch["images"]
            noise = torch.randn(clean_images.shape, device=clean_images.device)
            bs = clean_images.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bs,),
                                      device=clean_images.device, dtype=torch.int64)
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            with accelerator.accumulate(model):
                noise_pred = model(noisy_images, timesteps, return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(noise_pred, noise)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
            global_step += 1
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            step_seconds.append(now - tick)
            tick = now
            print(f"seed000 step {global_step}: {step_seconds[-1]:.2f} s, loss {logs['loss']:.4f}", flush=True)
            if global_step >= max_steps:
                break
    stats = {"steps": global_step, "batch_size": BATCH_SIZE, "mixed_precision": mixed_precision,
             "step_seconds": step_seconds, "flops_per_image": flops,
             "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="a folder of images (stands in for the hub set)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    args = parser.parse_args()
    stats = train(args.images, args.out, args.max_steps)
    print(json.dumps({k: v for k, v in stats.items() if k != "step_seconds"}))


if __name__ == "__main__":
    main()
