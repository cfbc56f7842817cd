"""Seed 002's "mini Stable Diffusion" on MNIST, written the way the seed writes it, for side-by-side benchmarks.

What is kept from the seed (shared/seeds/002_*.txt):
- a map-style MNIST dataset whose __getitem__ turns one uint8 image into a PIL image and applies
  ToTensor + Normalize((0.5,), (0.5,)) per item (torchvision's MNIST does exactly this), read through
  DataLoader(batch_size=512, shuffle=True) in the main process;
- UNet2DConditionModel(sample_size 28, 1 channel, layers_per_block 2, block_out_channels (32, 64, 64, 32),
  cross-attention in the two middle blocks, cross_attention_dim 512);
- captions f"A handwritten digit {label}" tokenized (max_length 8) and encoded by the CLIP text model in
  every step, with requires_grad on the encoder, but AdamW(lr 1e-3) over the UNet parameters only;
- DDPMScheduler(1000 steps, squaredcos_cap_v2), epsilon target, plain MSE, fp32;
- sampling: DDPM with 50 inference steps, guidance scale 8 against the empty prompt (the seed's last
  inference cell), or no guidance (its first cell).

What is different, because this machine is offline (the seed downloads both):
- MNIST comes from local IDX files (the same images torchvision downloads);
- the text encoder is CLIPTextModel(CLIPTextConfig()) randomly initialised: the size of
  openai/clip-vit-base-patch32's text tower (12 layers, width 512, 8 heads, 49,408-token vocabulary),
  so it costs the same per step; the seed's pretrained weights cannot be downloaded here;
- the CLIP BPE tokenizer is replaced by a word-level tokenizer of the caption words (its vocabulary
  cannot be downloaded either). Both give one token per caption word plus begin/end tokens, padded to 8.

Nothing here imports difftrain's training code; `make_offline_clip` uses difftrain's word-level
tokenizer builder only to produce the tokenizer files, and the IDX files are read once with
difftrain's `read_idx` (outside the timed loop).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from difftrain.data.sources import read_idx

TOKENIZER_MAX_LENGTH = 8
CAPTION = "A handwritten digit {}"


class MNIST(torch.utils.data.Dataset):
    """torchvision.datasets.MNIST's item path: uint8 -> PIL 'L' -> ToTensor -> Normalize(0.5, 0.5)."""

    def __init__(self, folder: Path, train: bool = True):
        prefix = "train" if train else "t10k"
        self.data = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        self.targets = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index], mode="L")
        tensor = torch.from_numpy(np.array(img, dtype=np.uint8)).float().div(255).unsqueeze(0)  # ToTensor
        tensor = (tensor - 0.5) / 0.5  # Normalize((0.5,), (0.5,))
        return tensor, int(self.targets[index])


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=28, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(32, 64, 64, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=512,
    )


def make_offline_clip(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised CLIP-B/32-sized text model and a caption tokenizer, saved as a model folder
    (tokenizer/ and text_encoder/) that both this baseline and difftrain (`text_encoder.pretrained`) load."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftrain.models.text import build_caption_tokenizer

    if (folder / "text_encoder" / "config.json").is_file():
        return folder
    captions = [CAPTION.format(k) for k in range(10)]
    tokenizer = build_caption_tokenizer(captions, TOKENIZER_MAX_LENGTH)
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig())
    tmp = folder.with_name(folder.name + ".tmp")
    tokenizer.save_pretrained(tmp / "tokenizer")
    model.save_pretrained(tmp / "text_encoder")
    tmp.replace(folder)
    return folder


def load_clip(folder: Path):
    from transformers import AutoTokenizer, CLIPTextModel

    return AutoTokenizer.from_pretrained(folder / "tokenizer"), CLIPTextModel.from_pretrained(folder / "text_encoder")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(mnist: Path, clip: Path, out_dir: Path, max_steps: Optional[int] = None,
          budget_seconds: Optional[float] = None, seed: int = 0) -> dict:
    """The seed's training loop, stopped after max_steps or when the loop's wall-clock passes budget_seconds.

    The clock covers the whole loop body (data loading included), as a user waiting on the seed sees it.
    """
    from diffusers import DDPMScheduler
    from torch.utils.data import DataLoader

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    mnist_dataset = MNIST(mnist)
    unet = build_unet().to(device)
    tokenizer, text_encoder = load_clip(clip)
    text_encoder = text_encoder.to(device)
    text_encoder.requires_grad_(True)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    train_dataloader = DataLoader(mnist_dataset, batch_size=512, shuffle=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    step_seconds, losses = [], []
    steps = 0
    loop_start = time.perf_counter()
    done = False
    while not done:
        tick = time.perf_counter()
        for images, labels in train_dataloader:
            images = images.to(device)
            captions = [CAPTION.format(label) for label in labels]
            latents = images
            text_input = tokenizer(captions, padding="max_length", max_length=TOKENIZER_MAX_LENGTH, truncation=True,
                                   return_tensors="pt")
            text_embeddings = text_encoder(text_input.input_ids.to(device))[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (latents.shape[0],), device=device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            noise_pred = unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings).sample
            loss = torch.nn.functional.mse_loss(noise_pred, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            if steps % 25 == 0 or steps == 1:
                losses.append((steps, loss.item()))
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            step_seconds.append(now - tick)
            tick = now
            print(f"seed002 step {steps}: {step_seconds[-1]:.2f} s, loss {loss.item():.4f}", flush=True)
            if (max_steps is not None and steps >= max_steps) or \
                    (budget_seconds is not None and now - loop_start >= budget_seconds):
                done = True
                break
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(unet.state_dict(), out_dir / "unet.pth")
    return {"steps": steps, "batch_size": 512, "train_seconds": sum(step_seconds), "step_seconds": step_seconds,
            "losses": losses, "peak_rss_mib": peak_rss_mib(),
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


@torch.no_grad()
def generate(unet, tokenizer, text_encoder, prompts: Sequence[str], seeds: Sequence[int], guidance_scale: float,
             num_inference_steps: int = 50, batch_size: int = 100) -> torch.Tensor:
    """The seed's sampling cell, batched over prompts with one seeded noise per image; uint8 (N, 1, 28, 28)."""
    from diffusers import DDPMScheduler

    device = next(unet.parameters()).device
    unet.eval()
    text_encoder.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        n = len(batch)
        text_input = tokenizer(batch, padding="max_length", max_length=TOKENIZER_MAX_LENGTH, truncation=True,
                               return_tensors="pt")
        text_embeddings = text_encoder(text_input.input_ids.to(device))[0]
        if guidance_scale != 0 and guidance_scale != 1:
            uncond_input = tokenizer([""] * n, padding="max_length", max_length=TOKENIZER_MAX_LENGTH,
                                     return_tensors="pt")
            text_embeddings = torch.cat([text_encoder(uncond_input.input_ids.to(device))[0], text_embeddings])
        latents = torch.cat([torch.randn((1, 1, 28, 28), generator=torch.Generator().manual_seed(s))
                             for s in seeds[start : start + batch_size]]).to(device)
        scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000)
        scheduler.set_timesteps(num_inference_steps)
        for t in scheduler.timesteps:
            if text_embeddings.shape[0] == 2 * n:
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                noise_pred_uncond, noise_pred_text = unet(model_input, t, encoder_hidden_states=text_embeddings
                                                          ).sample.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            else:
                noise_pred = unet(scheduler.scale_model_input(latents, t), t,
                                  encoder_hidden_states=text_embeddings).sample
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        image = (latents / 2 + 0.5).clamp(0, 1)
        out.append((image * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, required=True, help="folder with MNIST's IDX .gz files")
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--budget-minutes", type=float)
    parser.add_argument("--clip", type=Path, help="offline CLIP folder (default: made in WORK_DIR/offline-clip)")
    args = parser.parse_args()
    clip = args.clip or make_offline_clip(args.work_dir / "offline-clip")
    budget = args.budget_minutes * 60 if args.budget_minutes else None
    stats = train(args.mnist, clip, args.work_dir / "seed002", args.max_steps, budget)
    (args.work_dir / "seed002" / "stats.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps({k: v for k, v in stats.items() if k != "step_seconds"}))


if __name__ == "__main__":
    main()
