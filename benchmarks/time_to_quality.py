"""Time to quality on MNIST text-to-image: seed 002's loop against difftrain's mnist-text preset.

    python benchmarks/time_to_quality.py --mnist ../shared/data/mnist --seed-minutes 20 \
        --difftrain-steps 300 --eval-every-steps 25 --num-samples 100 --work-dir /tmp/bench

1. difftrain's mnist-text preset trains `--difftrain-steps` steps and scores EMA samples every
   `--eval-every-steps` (its in-training evaluation, sampled with the preset's `sample` settings:
   DPM++ 20 steps, guidance 3).
2. seed 002's loop (benchmarks/baselines/seed002_mnist_text.py) trains for `--seed-minutes` of
   wall-clock; its UNet is then sampled the seed's way (DDPM 50 steps, guidance 8, and without
   guidance) for the same prompts.

Both are scored by the same reference classifier (difftrain's, trained on MNIST train, accuracy on
MNIST test printed): conditional accuracy = share of samples for "A handwritten digit k" classified
as k, and FID in the classifier's feature space. Time is training time (data loading included;
sampling, evaluation and checkpoints excluded). Printed: both curves, the time difftrain needed to
reach the seed's best accuracy and best classifier FID, and the ratio to the seed's budget.
`python benchmarks/time_to_quality.py --summarize WORK_DIR/time_to_quality.json` prints it again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCHMARKS, markdown_table, run_child, run_difftrain, train_seconds_at  # noqa: E402
from machine import describe_machine  # noqa: E402

PRESET = "mnist-text"


def preset_config(mnist: Path):
    from difftrain.config import load_config

    return load_config(PRESET, [f"data.path={mnist}"])


def sampler_label(sample: dict) -> str:
    """How difftrain's evaluation samples, from the run's saved `sample` config, e.g. "dpm++ 20, guidance 3"."""
    return f"{sample['scheduler']} {sample['num_inference_steps']}, guidance {sample['guidance_scale']:g}"


def train_difftrain(args) -> tuple[list[dict], str]:
    """The preset's evaluation points (step, training seconds, accuracy, classifier FID) and how it sampled."""
    run = run_difftrain(PRESET, args.work_dir / "ttq-difftrain", [
        f"data.path={args.mnist}", f"train.max_steps={args.difftrain_steps}", "train.log_every_steps=5",
        f"train.eval_every_steps={args.eval_every_steps}", f"train.eval_num_samples={args.num_samples}",
        "train.eval_inception=false", "train.sample_every_steps=null", "train.checkpoint_every_steps=null"])
    seconds = train_seconds_at(run["rows"], run["global_batch"])
    points = [{"step": e["step"], "train_seconds": seconds[e["step"]], "accuracy": e["eval"]["accuracy"],
               "classifier_fid": e["eval"]["classifier_fid"]} for e in run["evals"]]
    print(f"difftrain: {run['wall_seconds']:.0f} s wall in all, peak RSS {run['peak_rss_mib']:.0f} MiB", flush=True)
    return points, sampler_label(run["config"]["sample"])


def run_seed(args, ref, labels, prompts) -> list[dict]:
    from baselines.seed002_mnist_text import build_unet, generate, load_clip, make_offline_clip

    from difftrain.evaluation.evaluate import score_samples

    work = args.work_dir / "ttq-seed"
    clip = make_offline_clip(args.work_dir / "offline-clip")
    usage = run_child([sys.executable, str(BENCHMARKS / "baselines" / "seed002_mnist_text.py"), "--mnist",
                       str(args.mnist), "--work-dir", str(work), "--clip", str(clip),
                       "--budget-minutes", str(args.seed_minutes)], work.with_suffix(".log"))
    stats = json.loads((work / "seed002" / "stats.json").read_text())
    print(f"seed: {stats['steps']} steps in {stats['train_seconds']:.0f} s, peak RSS {usage['peak_rss_mib']:.0f} MiB",
          flush=True)
    unet = build_unet()
    unet.load_state_dict(torch.load(work / "seed002" / "unet.pth", weights_only=True))
    tokenizer, encoder = load_clip(clip)
    points = []
    for guidance in args.seed_guidance:
        samples = generate(unet, tokenizer, encoder, prompts, list(range(len(prompts))), guidance)
        report = score_samples(ref, samples, labels)
        points.append({"step": stats["steps"], "train_seconds": stats["train_seconds"], "guidance": guidance,
                       "accuracy": report["accuracy"], "classifier_fid": report["classifier_fid"]})
        print(f"seed, guidance {guidance}: accuracy {report['accuracy']:.3f}, classifier FID "
              f"{report['classifier_fid']:.2f}", flush=True)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/difftrain-bench"))
    parser.add_argument("--seed-minutes", type=float, default=20.0)
    parser.add_argument("--seed-guidance", type=lambda s: [float(v) for v in s.split(",")], default=[8.0, 1.0])
    parser.add_argument("--difftrain-steps", type=int, default=300)
    parser.add_argument("--eval-every-steps", type=int, default=25)
    parser.add_argument("--num-samples", type=int, default=100)
    args = parser.parse_args()
    args.mnist, args.work_dir = args.mnist.resolve(), args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"Machine: {describe_machine()}", flush=True)

    from difftrain.commands.evaluate import run_reference
    from difftrain.families import family_for

    cfg = preset_config(args.mnist)
    ref = run_reference(cfg, use_inception=False)
    print(f"reference classifier: test accuracy {ref.classifier.test_accuracy:.4f} on {ref.classifier.num_test} "
          "MNIST test images", flush=True)
    labels, prompts = family_for(cfg).evaluation_conditions(ref.class_names, args.num_samples)

    ours, sampler = train_difftrain(args)
    seed = run_seed(args, ref, labels, prompts)
    summary = {"seed": seed, "difftrain": ours, "num_samples": args.num_samples, "num_classes": len(ref.class_names),
               "difftrain_sampler": sampler}
    (args.work_dir / "time_to_quality.json").write_text(json.dumps(summary, indent=1))
    summarize(seed, ours, args.num_samples, len(ref.class_names), sampler)


# metric -> True when higher is better
METRICS = {"accuracy": True, "classifier_fid": False}


def summarize(seed: list[dict], ours: list[dict], num_samples: int = 100, num_classes: int = 10,
              sampler: str = "dpm++ 20, guidance 3") -> None:
    """Print both curves, and for each metric when difftrain first matched the seed's best value.

    `sampler` labels difftrain's rows (results saved before it was recorded were all sampled with the
    preset's DPM++ 20 steps at guidance 3, the default).

    An accuracy within two standard errors of chance (1 / num_classes over num_samples samples) is not
    evidence of conditioning, so matching it says nothing; that case is flagged, and the first
    evaluation clearly above chance is printed instead.
    """
    print(markdown_table(["run", "step", "train minutes", "accuracy", "classifier FID"],
                         [[f"seed 002 (DDPM 50, guidance {p['guidance']:g})", p["step"], p["train_seconds"] / 60,
                           p["accuracy"], p["classifier_fid"]] for p in seed]
                         + [[f"difftrain mnist-text ({sampler})", p["step"], p["train_seconds"] / 60,
                             p["accuracy"], p["classifier_fid"]] for p in ours]))
    seed_seconds = max(p["train_seconds"] for p in seed)
    for metric, higher in METRICS.items():
        best = max(p[metric] for p in seed) if higher else min(p[metric] for p in seed)
        reached = [p for p in ours if (p[metric] >= best if higher else p[metric] <= best)]
        if not reached:
            print(f"{metric}: difftrain did not reach the seed's best {best:.3f} within {ours[-1]['step']} steps "
                  f"({ours[-1]['train_seconds'] / 60:.1f} min)")
            continue
        first = reached[0]
        note = " (its first evaluation, so a lower bound)" if first is ours[0] else ""
        print(f"{metric}: the seed's best is {best:.3f} after {seed_seconds / 60:.1f} min; difftrain matched it at step "
              f"{first['step']} after {first['train_seconds'] / 60:.1f} min{note}: "
              f"{seed_seconds / first['train_seconds']:.1f}x sooner")
    chance = 1 / num_classes
    noise_bar = chance + 2 * (chance * (1 - chance) / num_samples) ** 0.5
    seed_accuracy = max(p["accuracy"] for p in seed)
    if seed_accuracy < noise_bar:
        above = [p for p in ours if p["accuracy"] >= noise_bar]
        where = (f"difftrain is first above it at step {above[0]['step']} after {above[0]['train_seconds'] / 60:.1f} min "
                 f"({seed_seconds / above[0]['train_seconds']:.1f}x sooner than the seed's budget)" if above
                 else "difftrain never is")
        print(f"caution: the seed's best accuracy {seed_accuracy:.3f} is within noise of chance ({chance:.2f}; "
              f"chance + 2 standard errors at {num_samples} samples = {noise_bar:.3f}), so matching it means nothing; "
              + where)
    fifth = [p for p in ours if p["train_seconds"] <= seed_seconds / 5]
    if fifth:
        p = fifth[-1]
        print(f"at a fifth of the seed's time or less ({p['train_seconds'] / 60:.1f} min, step {p['step']}): difftrain "
              f"accuracy {p['accuracy']:.3f}, classifier FID {p['classifier_fid']:.3f}")


def main_or_summary() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        saved = json.loads(Path(sys.argv[2]).read_text())
        summarize(saved["seed"], saved["difftrain"], saved.get("num_samples", 100), saved.get("num_classes", 10),
                  saved.get("difftrain_sampler", "dpm++ 20, guidance 3"))
    else:
        main()


if __name__ == "__main__":
    main_or_summary()
