"""Sampler study: sample quality against number of inference steps for several schedulers, one trained run.

    python benchmarks/sampler_study.py runs/digits --num-samples 250 --steps 5,10,20,50 \
        --schedulers ddpm,ddim,dpm++,unipc --reference-steps 1000 --out-dir benchmarks/results

Every point uses the same seeds and labels/prompts, so the schedulers differ only in how they integrate.
The metric is FID in the reference classifier's feature space for labelled runs (cheap on CPU) and
Inception FID otherwise (or with --inception). DDPM at --reference-steps (the seed recipes' sampler) is
the baseline each row is compared with. Prints a markdown table for BENCHMARKS.md and writes a PNG plot
and the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402

from difftrain.commands.evaluate import load_run_config, run_reference  # noqa: E402
from difftrain.evaluation.evaluate import score_samples  # noqa: E402
from difftrain.families import family_for  # noqa: E402
from difftrain.pipeline import load_pipeline, scheduler_for  # noqa: E402
from difftrain.sampling.generate import ImageSampler  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--num-samples", type=int, default=250)
    parser.add_argument("--steps", default="5,10,20,50")
    parser.add_argument("--schedulers", default="ddpm,ddim,dpm++,unipc")
    parser.add_argument("--reference-steps", type=int, default=1000, help="DDPM baseline steps (0: none)")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--inception", action="store_true", help="Inception FID even for labelled runs (slow on CPU)")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="first seed (seeds OFFSET..OFFSET+N-1): a second draw shows the metric's own noise")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    cfg = load_run_config(args.run_dir)
    use_inception = args.inception or not cfg.uses_labels
    ref = run_reference(cfg, num_reference=2000, use_inception=use_inception)
    metric = "fid" if use_inception else "classifier_fid"
    pipe = load_pipeline(args.run_dir, device="cpu")
    sampler = ImageSampler.from_pipeline(pipe)
    guidance = cfg.sample.guidance_scale if args.guidance_scale is None else args.guidance_scale
    labels, prompts = family_for(cfg).evaluation_conditions(ref.class_names, args.num_samples)
    seeds = list(range(args.seed_offset, args.seed_offset + args.num_samples))

    points = [(name, int(n)) for name in args.schedulers.split(",") for n in args.steps.split(",")]
    if args.reference_steps:
        points.append(("ddpm", args.reference_steps))
    results = []
    for name, steps in points:
        start = time.perf_counter()
        samples = sampler.generate(scheduler_for(pipe, name), seeds, num_inference_steps=steps, labels=labels,
                                   prompts=prompts, guidance_scale=guidance, batch_size=args.batch_size, device="cpu")
        seconds = time.perf_counter() - start
        report = score_samples(ref, samples, labels)
        row = {"scheduler": name, "steps": steps, metric: report[metric], "accuracy": report.get("accuracy"),
               "ms_per_image": 1000 * seconds / args.num_samples}
        results.append(row)
        print(json.dumps(row), flush=True)

    baseline = next((r for r in results if r["scheduler"] == "ddpm" and r["steps"] == args.reference_steps), None)
    print(f"\nrun: {args.run_dir} ({cfg.model.conditioning}-conditional, {cfg.data.resolution} px), "
          f"{args.num_samples} samples per point (seeds {seeds[0]}-{seeds[-1]}), guidance {guidance}, metric {metric}"
          + (f" (reference classifier test accuracy {ref.classifier.test_accuracy:.4f})" if ref.classifier else ""))
    print(f"machine: {describe_machine()}\n")
    versus = f"vs DDPM-{args.reference_steps}" if args.reference_steps else "vs reference (none run)"
    header = f"| scheduler | steps | {metric} | {versus} | accuracy | ms/image |"
    print(header + "\n|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r[metric] / baseline[metric]:.2f}x" if baseline else "-"
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "-"
        print(f"| {r['scheduler']} | {r['steps']} | {r[metric]:.3f} | {ratio} | {acc} | {r['ms_per_image']:.1f} |")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sampler_study_{args.run_dir.name}" + (f"_seeds{args.seed_offset}" if args.seed_offset else "")
    (args.out_dir / f"{stem}.json").write_text(json.dumps({"run": str(args.run_dir), "metric": metric,
                                                            "results": results}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name in dict.fromkeys(n for n, _ in points):
        rows = [r for r in results if r["scheduler"] == name and (name != "ddpm" or r is not baseline)]
        ax.plot([r["steps"] for r in rows], [r[metric] for r in rows], marker="o", label=name)
    if baseline:
        ax.axhline(baseline[metric], color="gray", ls="--", label=f"ddpm {args.reference_steps} steps")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("inference steps")
    ax.set_ylabel(metric)
    ax.set_title(f"{args.run_dir.name}: {metric} vs steps ({args.num_samples} samples)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out_dir / f"{stem}.png")
    print(f"\nwrote {args.out_dir / (stem + '.png')} and {stem}.json")


if __name__ == "__main__":
    main()
