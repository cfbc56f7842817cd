"""Training throughput, seed loop against difftrain, one after the other on this machine.

    python benchmarks/train_speed.py mnist-text --mnist ../shared/data/mnist --steps 4 --work-dir /tmp/bench
    python benchmarks/train_speed.py butterflies --images ../shared/data/flowers/train --steps 3 --work-dir /tmp/bench

mnist-text: seed 002's loop (benchmarks/baselines/seed002_mnist_text.py) against difftrain on the
seed's own architecture (the same UNet2DConditionModel, the same CLIP-B/32-sized random text encoder,
batch 512): in one process, and as two processes of one thread each (`--num-processes 2`). Then the
ceiling of that layout: the seed architecture's UNet step alone (unet_step_variants.py, no data, no
text encoder, no gradient sync) in two one-thread processes side by side. Also difftrain's mnist-text
preset on its own model for reference.

butterflies: seed 000's loop (benchmarks/baselines/seed000_butterflies.py) against difftrain's
butterflies preset (the same 113.7M-parameter UNet2DModel at 128 px, batch 16) on the same images.
On a GPU both use the tutorial's fp16 and difftrain also runs in bf16; model FLOPs utilisation is
printed when the GPU's peak is known (--peak-tflops).

Each side runs in its own child process (so its peak RSS is its own). Images/s is measured after
`--warmup-steps` steps and counts the training step only (data loading included, sampling and
checkpoints excluded). Every run is printed as a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCHMARKS, images_per_s_after, markdown_table, run_child, run_children,  # noqa: E402
                    run_difftrain, steady_images_per_s)
from machine import describe_machine  # noqa: E402

NO_MAINTENANCE = ["train.sample_every_steps=null", "train.checkpoint_every_steps=null", "train.log_every_steps=1",
                  "train.eval_every_steps=null"]


def seed002(args, clip: Path) -> dict:
    out = args.work_dir / "seed002-speed"
    usage = run_child([sys.executable, str(BENCHMARKS / "baselines" / "seed002_mnist_text.py"), "--mnist",
                       str(args.mnist), "--work-dir", str(out), "--clip", str(clip),
                       "--max-steps", str(args.warmup_steps + args.steps)], out.with_suffix(".log"))
    stats = json.loads((out / "seed002" / "stats.json").read_text())
    return {**usage, "images_per_s": images_per_s_after(stats["step_seconds"], stats["batch_size"], args.warmup_steps)}


def difftrain_run(args, name: str, overrides: list[str], num_processes: int = 1, preset: str = "mnist-text") -> dict:
    run = run_difftrain(preset, args.work_dir / name, [*overrides, *NO_MAINTENANCE], num_processes)
    return {"wall_seconds": run["wall_seconds"], "peak_rss_mib": run["peak_rss_mib"],
            "images_per_s": steady_images_per_s(run["rows"], args.warmup_steps)}


def unet_step_alone(args, overrides: list[str], num_processes: int, batch_size: int = 128) -> dict:
    """The ceiling of a layout: `num_processes` one-thread copies of unet_step_variants.py timing the
    UNet's fp32 step side by side (what the CPU gives with nothing but the model to run); images/s summed."""
    argvs, logs, outs = [], [], []
    for rank in range(num_processes):
        outs.append(args.work_dir / f"unet-step-alone-{rank}.json")
        logs.append(outs[-1].with_suffix(".log"))
        argvs.append([sys.executable, str(BENCHMARKS / "unet_step_variants.py"), "mnist-text", *overrides,
                      "--variants", "fp32", "--batch-sizes", str(batch_size), "--threads", "1",
                      "--warmup-steps", str(args.warmup_steps), "--steps", str(args.steps), "--json", str(outs[-1])])
    usages = run_children(argvs, logs)
    per_process = [json.loads(out.read_text())["results"][0]["images_per_s"] for out in outs]
    return {"wall_seconds": max(u["wall_seconds"] for u in usages), "peak_rss_mib": max(u["peak_rss_mib"] for u in usages),
            "images_per_s": sum(per_process), "images_per_s_per_process": per_process}


def mnist_text(args) -> list[tuple[str, dict]]:
    from baselines.seed002_mnist_text import make_offline_clip

    clip = make_offline_clip(args.work_dir / "offline-clip")
    steps = args.warmup_steps + args.steps
    seed_arch = [f"data.path={args.mnist}", f"text_encoder.pretrained={clip}", "text_encoder.train=false",
                 "model.unet.block_out_channels=[32,64,64,32]", "model.unet.layers_per_block=2",
                 "model.unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D,CrossAttnDownBlock2D,DownBlock2D]",
                 "model.unet.up_block_types=[UpBlock2D,CrossAttnUpBlock2D,CrossAttnUpBlock2D,UpBlock2D]",
                 # The preset also pools the caption into the time embedding; the seed's UNet does not.
                 "model.unet.addition_embed_type=null",
                 "diffusion.prediction_type=epsilon", "diffusion.snr_gamma=null", f"train.max_steps={steps}"]
    results = [("seed 002 loop (B=512)", seed002(args, clip))]
    results.append(("difftrain, seed architecture, B=512, 1 process",
                    difftrain_run(args, "difftrain-seed-arch", seed_arch + ["train.batch_size=512"])))
    results.append(("difftrain, seed architecture, B=512 as 4 x 128 accumulation, 1 process",
                    difftrain_run(args, "difftrain-seed-arch-acc", seed_arch + ["train.batch_size=128",
                                                                                "train.gradient_accumulation_steps=4"])))
    results.append(("difftrain, seed architecture, B=512 as 2 processes x 1 thread",
                    difftrain_run(args, "difftrain-seed-arch-2p", seed_arch + ["train.batch_size=256"], 2)))
    results.append(("difftrain, seed architecture, B=512 as 2 processes x 1 thread x 2 x 128 accumulation",
                    difftrain_run(args, "difftrain-seed-arch-2p-acc", seed_arch + [
                        "train.batch_size=128", "train.gradient_accumulation_steps=2"], 2)))
    results.append(("UNet step alone at the seed architecture (no data, text encoder or gradient sync), "
                    "2 processes x 1 thread x B=128", unet_step_alone(args, seed_arch, num_processes=2)))
    preset_steps = args.warmup_steps + 8 * args.steps
    results.append(("difftrain mnist-text preset (its own model and batch)",
                    difftrain_run(args, "difftrain-preset", [f"data.path={args.mnist}",
                                                             f"train.max_steps={preset_steps}"])))
    return results


def butterflies(args) -> list[tuple[str, dict]]:
    import torch

    out = args.work_dir / "seed000-speed"
    usage = run_child([sys.executable, str(BENCHMARKS / "baselines" / "seed000_butterflies.py"), "--images",
                       str(args.images), "--out", str(out), "--max-steps", str(args.warmup_steps + args.steps)],
                      out.with_suffix(".log"))
    stats = json.loads((out / "stats.json").read_text())
    results = [("seed 000 loop (B=16, %s)" % stats["mixed_precision"],
                {**usage, "images_per_s": images_per_s_after(stats["step_seconds"], stats["batch_size"],
                                                             args.warmup_steps),
                 "flops_per_image": stats.get("flops_per_image")})]
    common = [f"data.path={args.images}", f"train.max_steps={args.warmup_steps + args.steps}", "train.num_epochs=null",
              "sample.num_inference_steps=50"]  # the end-of-run grid is not timed; keep its wall time short
    precisions = ["fp16", "bf16"] if torch.cuda.is_available() else ["no"]
    runs = [(16, precision, []) for precision in precisions]
    # Larger micro-batches (the seed's recipe is batch 16; a GPU is only busy with more), in the
    # device's fastest precision, with any extra overrides given (e.g. train.compile=true).
    runs += [(batch, precisions[-1], []) for batch in args.batch_sizes if batch != 16]
    runs += [(max(args.batch_sizes), precisions[-1], args.extra)] if args.extra else []
    for batch, precision, extra in runs:
        label = ", ".join([f"B={batch}", precision, *extra])
        name = "-".join(["difftrain-butterflies", str(batch), precision, *(e.split("=")[0] for e in extra)])
        results.append((f"difftrain butterflies preset ({label})",
                        {**difftrain_run(args, name, common + [f"train.mixed_precision={precision}",
                                                               f"train.batch_size={batch}", *extra],
                                         preset="butterflies"),
                         "flops_per_image": stats.get("flops_per_image")}))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["mnist-text", "butterflies"])
    parser.add_argument("--mnist", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--images", type=Path, default=Path("../shared/data/flowers/train"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/difftrain-bench"))
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side, after the warm-up")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--batch-sizes", type=lambda v: [int(b) for b in v.split(",")], default=[16],
                        help="butterflies: difftrain's micro-batch sizes (the seed always uses 16)")
    parser.add_argument("--extra", action="append", default=[],
                        help="butterflies: an override for one more difftrain run at the largest batch size (repeatable)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak in the training precision, for model FLOPs utilisation")
    args = parser.parse_args()
    args.mnist, args.images, args.work_dir = args.mnist.resolve(), args.images.resolve(), args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"Machine: {describe_machine()}", flush=True)
    results = mnist_text(args) if args.which == "mnist-text" else butterflies(args)
    base = results[0][1]["images_per_s"]
    header = ["run", "images/s", "vs seed", "peak RSS (MiB)"]
    flops = any(r.get("flops_per_image") for _, r in results) and args.peak_tflops
    if flops:
        header.append("MFU")
    rows = []
    for name, r in results:
        row = [name, r["images_per_s"], f"{r['images_per_s'] / base:.2f}x", f"{r['peak_rss_mib']:.0f}"]
        if flops:
            row.append(f"{r['flops_per_image'] * r['images_per_s'] / (args.peak_tflops * 1e12):.1%}")
        rows.append(row)
    print(markdown_table(header, rows))
    (args.work_dir / f"train_speed_{args.which}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
