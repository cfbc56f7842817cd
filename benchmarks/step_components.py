"""Where a training step's time goes, and what each of difftrain's step-level choices saves.

    python benchmarks/step_components.py --batch-size 128 --repeats 3

On the seed 002 architecture (UNet2DConditionModel (32, 64, 64, 32), a CLIP-B/32-sized text encoder),
each part of one step is timed alone, as the median of --repeats runs after one warm-up:
- text states: the seed's tokenize + encoder forward/backward in every step, against difftrain's
  lookup of states cached once per distinct caption (frozen encoder);
- the UNet forward and backward (the same on both sides);
- the AdamW update: for-loop (the CPU default), foreach, fused;
- the EMA update: diffusers' EMAModel per tensor, and with foreach;
- the non-finite guard: a per-tensor gradient norm with three host reads, against PyTorch's
  get_total_norm (foreach kernels on CUDA) and one host read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table  # noqa: E402
from machine import describe_machine  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from diffusers.training_utils import EMAModel

    from baselines.seed002_mnist_text import CAPTION, TOKENIZER_MAX_LENGTH, build_unet, load_clip, make_offline_clip
    from difftrain.models.conditioning import TextConditioner
    from difftrain.training.numerics import _grad_norm

    print(f"Machine: {describe_machine()}", flush=True)
    b = args.batch_size
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, encoder = load_clip(make_offline_clip(Path(tmp) / "clip"))
    unet = build_unet()
    labels = torch.randint(0, 10, (b,))
    captions = [CAPTION.format(int(k)) for k in labels]
    x = torch.randn(b, 1, 28, 28)
    t = torch.randint(0, 1000, (b,))
    rows = []

    encoder.requires_grad_(True)

    def seed_text():
        ids = tokenizer(captions, padding="max_length", max_length=TOKENIZER_MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        states = encoder(ids)[0]
        states.sum().backward()  # the seed backpropagates through the encoder (requires_grad) every step

    encoder.requires_grad_(False)
    vocab = sorted(set(CAPTION.format(k) for k in range(10))) + [""]
    conditioner = TextConditioner(tokenizer, encoder, vocab, TOKENIZER_MAX_LENGTH, trainable=False)
    conditioner.precompute()
    caption_ids = torch.tensor([vocab.index(c) for c in captions])
    states = conditioner(caption_ids)
    encoder.requires_grad_(True)
    rows.append(["text states: seed (tokenize + encoder forward/backward)", timed(seed_text, args.repeats)])
    encoder.requires_grad_(False)
    rows.append(["text states: difftrain (cached per distinct caption)", timed(lambda: conditioner(caption_ids),
                                                                               args.repeats)])

    def unet_step():
        unet(x, t, encoder_hidden_states=states).sample.square().mean().backward()

    rows.append(["UNet forward + backward", timed(unet_step, args.repeats)])
    params = [p for p in unet.parameters()]
    for name, kwargs in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-6, **kwargs)
        rows.append([f"AdamW step, {name}", timed(optimizer.step, args.repeats)])
    for foreach in (False, True):
        ema = EMAModel(params, decay=0.995, foreach=foreach)
        rows.append([f"EMA update, {'foreach' if foreach else 'per tensor'}", timed(lambda: ema.step(params),
                                                                                    args.repeats)])
    loss = torch.tensor(0.1)

    def guard_old():
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
        finite = (torch.isfinite(loss) & torch.isfinite(norm)).float()
        return finite.item(), loss.item(), norm.item()

    def guard_new():
        norm = _grad_norm(params)
        return torch.stack([torch.isfinite(loss) & torch.isfinite(norm), loss, norm]).tolist()

    rows.append(["non-finite guard, per-tensor norm + 3 host reads", timed(guard_old, args.repeats)])
    rows.append(["non-finite guard, difftrain (get_total_norm + 1 host read)", timed(guard_new, args.repeats)])
    print(f"batch {b}, {sum(p.numel() for p in params) / 1e6:.2f}M UNet parameters, "
          f"{sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M text-encoder parameters")
    print(markdown_table(["part of one step", "ms"], [[name, f"{ms:.1f}"] for name, ms in rows]))


if __name__ == "__main__":
    main()
