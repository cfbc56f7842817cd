"""The latent from-scratch preset on flowers, end to end: wall time from launch to export (VAE stage included), then
`difftrain evaluate` on the held-out photos (../shared/data/flowers/test): conditional accuracy of the reference
classifier on the 12 species, classifier FID and Inception FID.

    python benchmarks/latent_flowers.py --flowers ../shared/data/flowers --work-dir /tmp/latent-flowers \
        [--preset mini-sd] [--num-samples 480] [key=value ...]

Run it alone (2 cores: a second training with default threads would slow it ~10x), or with OMP_NUM_THREADS=1 beside
one other single-threaded job, as BENCHMARKS.md's figures were. The first evaluation against a reference set trains
the reference classifier (about 40 min at 64 px on one thread; cached afterwards). Prints the run's budget split (VAE stage, diffusion
stage, the rest), the evaluation table and a markdown row for BENCHMARKS.md, and copies the final sample grid to
benchmarks/results/latent_flowers_<preset>.png.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table, run_child, run_difftrain, train_seconds_at  # noqa: E402
from machine import describe_machine  # noqa: E402


def seconds_logged(log: str, pattern: str) -> float | None:
    found = re.search(pattern, log)
    return float(found.group(1)) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flowers", type=Path, default=Path("../shared/data/flowers"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/latent-flowers"))
    parser.add_argument("--preset", default="mini-sd")
    parser.add_argument("--num-samples", type=int, default=480, help="evaluation samples (40 per species)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the preset")
    args = parser.parse_args()
    flowers, work = args.flowers.resolve(), args.work_dir.resolve()
    print(f"Machine: {describe_machine()}", flush=True)
    out = work / args.preset
    start = time.perf_counter()
    run = run_difftrain(args.preset, out, [f"data.path={flowers / 'train'}", *args.overrides])
    wall = time.perf_counter() - start
    log = out.with_suffix(".log").read_text(errors="replace")
    vae_seconds = seconds_logged(log, r"VAE trained in (\d+) s")
    first_step = seconds_logged(log, r"first step starts ([\d.]+) s after launch")
    steps = run["rows"][-1]["step"] if run["rows"] else 0
    train_seconds = train_seconds_at(run["rows"], run["global_batch"]).get(steps, 0.0)
    print(f"trained {steps} steps: {wall / 60:.1f} min launch to export; VAE stage {((vae_seconds or 0) / 60):.1f} min; "
          f"first diffusion step {((first_step or 0) / 60):.1f} min after launch; diffusion steps "
          f"{train_seconds / 60:.1f} min; peak RSS {run['peak_rss_mib']:.0f} MiB", flush=True)

    report_path = work / f"{args.preset}-evaluation.json"
    usage = run_child([sys.executable, "-m", "difftrain", "evaluate", str(out), "--reference", str(flowers / "test"),
                       "--num-samples", str(args.num_samples), "--out", str(report_path)],
                      work / f"{args.preset}-evaluate.log")
    report = json.loads(report_path.read_text())
    print(f"evaluation: {usage['wall_seconds'] / 60:.1f} min", flush=True)
    grids = sorted((out / "samples").glob("step-*.png"))
    if grids:
        results = ROOT / "benchmarks" / "results"
        results.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grids[-1], results / f"latent_flowers_{args.preset}.png")
        print(f"sample grid: benchmarks/results/latent_flowers_{args.preset}.png (from {grids[-1].name})")
    sample = run["config"]["sample"]
    print(markdown_table(
        ["preset", "px", "launch to export (min)", "VAE stage (min)", "steps", "accuracy (12 species)",
         "classifier test accuracy", "classifier FID", "FID", "sampler"],
        [[args.preset, run["config"]["data"]["resolution"], wall / 60, (vae_seconds or 0) / 60, steps,
          report.get("accuracy"), report.get("classifier_test_accuracy"), report.get("classifier_fid"),
          report.get("fid", "-"), f"{sample['scheduler']} {sample['num_inference_steps']}, guidance "
                                  f"{sample['guidance_scale']:g}"]]))
    for name, value in sorted((report.get("per_class_accuracy") or {}).items()):
        print(f"  accuracy[{name}] = {value:.3f}")
    (work / f"{args.preset}-summary.json").write_text(json.dumps(
        {"machine": describe_machine(), "preset": args.preset, "overrides": args.overrides, "wall_seconds": wall,
         "vae_seconds": vae_seconds, "train_seconds": train_seconds, "steps": steps, "evaluation": report}, indent=1))


if __name__ == "__main__":
    main()
