"""Objectives and backbones side by side: DDPM (v-prediction, min-SNR-5: today's presets) against flow matching
(uniform and logit-normal timesteps), and the UNet against a DiT of about the same training FLOPs per image.

    python benchmarks/objectives.py --datasets digits,mnist-text --mnist ../shared/data/mnist \
        --work-dir /tmp/objectives --num-samples 500 --eval-every-steps 100

For each data set every variant trains the same preset's steps on the same data, one run at a time (run it
alone: two trainings on 2 cores slow each other ~10x), and is scored during training (its EMA weights, the
preset's sampler) by difftrain's reference classifier: conditional accuracy and FID in the classifier's
feature space, against training minutes (data loading included; sampling, evaluation and checkpoints
excluded). Afterwards each exported model is sampled at --sampler-steps with its own sampler: the steps it needs
to get within 5% of its own best classifier FID. Printed: one markdown table per data set, the curves, and for
the digits set whether the flow-matching preset reached 95% accuracy within the quickstart's training time.
Raw results: WORK_DIR/objectives.json; `--summarize WORK_DIR/objectives.json` prints the tables again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, run_difftrain, train_seconds_at  # noqa: E402
from machine import describe_machine  # noqa: E402

ACCURACY_TARGET = 0.95
WITHIN_BEST = 1.05  # "within 5% of its own best" classifier FID


@dataclass
class Variant:
    name: str
    preset: str
    overrides: list[str] = field(default_factory=list)


# Flow matching on a DDPM preset: its DDPM-only settings go back to their defaults (the flow objective refuses them).
FLOW = ["diffusion.objective=flow_matching", "diffusion.beta_schedule=linear", "diffusion.prediction_type=epsilon",
        "diffusion.snr_gamma=null", "sample.scheduler=euler"]


def variants(dataset: str, dit_size: list[str]) -> list[Variant]:
    if dataset == "digits":
        return [Variant("DDPM v-pred min-SNR-5, UNet (quickstart)", "digits"),
                Variant("flow, uniform t, UNet", "digits-flow", ["diffusion.timestep_sampling=uniform"]),
                Variant("flow, logit-normal t, UNet (digits-flow)", "digits-flow"),
                Variant("flow, logit-normal t, DiT", "digits-flow", ["model.backbone=dit", *dit_size])]
    if dataset == "mnist-text":
        return [Variant("DDPM v-pred min-SNR-5, UNet (mnist-text)", "mnist-text"),
                Variant("flow, uniform t, UNet", "mnist-text", [*FLOW, "diffusion.timestep_sampling=uniform"]),
                Variant("flow, logit-normal t, UNet", "mnist-text", [*FLOW, "diffusion.timestep_sampling=logit_normal"]),
                Variant("flow, logit-normal t, DiT (PixArt)", "mnist-text",
                        [*FLOW, "diffusion.timestep_sampling=logit_normal", "model.backbone=dit", *dit_size])]
    raise ValueError(f"--datasets: {dataset!r}: expected digits or mnist-text")


def data_overrides(dataset: str, args) -> list[str]:
    return [f"data.path={args.mnist}"] if dataset == "mnist-text" else []


# -- equal training FLOPs ----------------------------------------------------------------------------------------


def network_flops(cfg) -> tuple[float, int]:
    """(forward + backward FLOPs of one image, parameters) of the network `cfg` trains, counted by
    torch.utils.flop_counter on the network plan and call the families use (no data is read: the digits have 10
    classes, the text runs prompts of text_encoder.max_length tokens)."""
    from torch.utils.flop_counter import FlopCounterMode

    from difftrain.models.backbone import Conditioning, network_call, plan_network
    from difftrain.models.unet import COND_UNET_PRESETS, UNET_PRESETS

    kind, te = cfg.model.conditioning, cfg.text_encoder
    condition = Conditioning(kind, num_classes=10 if kind == "class" else 0,
                             text_dim=te.hidden_size if kind == "text" else None)
    size, channels = cfg.data.resolution, cfg.data.channels
    plan, problems = plan_network(cfg.model, size, channels, condition,
                                  COND_UNET_PRESETS if kind == "text" else UNET_PRESETS)
    if problems:
        raise ValueError("; ".join(problems))
    torch.manual_seed(0)
    network = plan.build()
    x, t = torch.randn(1, channels, size, size), torch.tensor([500.0])
    cond = None
    if kind == "class":
        cond = torch.zeros(1, dtype=torch.long)
    elif kind == "text":
        states = torch.randn(1, te.max_length, te.hidden_size)
        cond = states if cfg.model.backbone == "unet" else (states, torch.ones(1, te.max_length, dtype=torch.long))
    with FlopCounterMode(display=False) as counter:
        network_call(type(network))(network, x, t, cond).float().square().mean().backward()
    return float(counter.get_total_flops()), sum(p.numel() for p in network.parameters())


def dit_matching_flops(preset: str, target_flops: float, overrides: list[str]) -> tuple[list[str], float, int]:
    """The DiT among a small grid of patch size x depth x width (32 wide per head) whose training FLOPs per image
    are closest to `target_flops`: its overrides, FLOPs and parameters."""
    from difftrain.config import load_config

    best = None
    for patch in (2, 4):
        for depth in (4, 6, 8):
            for width in (64, 96, 128, 192, 256):
                size = ["model.size=tiny", f"model.patch_size={patch}", f"model.depth={depth}",
                        f"model.width={width}", f"model.num_heads={width // 32}"]
                try:
                    flops, params = network_flops(load_config(preset, [*overrides, "model.backbone=dit", *size]))
                except ValueError:
                    continue  # a patch size that does not divide the sample size
                gap = abs(flops / target_flops - 1)
                if best is None or gap < best[0]:
                    best = (gap, size, flops, params)
    return best[1], best[2], best[3]


# -- runs ----------------------------------------------------------------------------------------------------------


def train_variant(variant: Variant, index: int, dataset: str, args) -> dict:
    out = args.work_dir / dataset / f"variant-{index}"
    run = run_difftrain(variant.preset, out, [
        *data_overrides(dataset, args), *variant.overrides, "train.log_every_steps=5",
        f"train.eval_every_steps={args.eval_every_steps}", f"train.eval_num_samples={args.num_samples}",
        "train.eval_inception=false", "train.sample_every_steps=null", "train.checkpoint_every_steps=null",
        *([f"train.max_steps={args.max_steps}"] if args.max_steps else [])])
    seconds = train_seconds_at(run["rows"], run["global_batch"])
    curve = [{"step": e["step"], "train_seconds": seconds[e["step"]], "accuracy": e["eval"]["accuracy"],
              "classifier_fid": e["eval"]["classifier_fid"]} for e in run["evals"]]
    print(f"{dataset} / {variant.name}: {run['wall_seconds']:.0f} s wall in all; final accuracy "
          f"{curve[-1]['accuracy']:.3f}, classifier FID {curve[-1]['classifier_fid']:.3f} after "
          f"{curve[-1]['train_seconds'] / 60:.1f} training min", flush=True)
    return {"name": variant.name, "run_dir": str(out), "curve": curve, "sample": run["config"]["sample"]}


def sampler_steps(result: dict, ref, args) -> list[dict]:
    """Classifier FID and accuracy of the exported model at each of --sampler-steps, with its own sampler."""
    from difftrain.commands.evaluate import load_run_config
    from difftrain.evaluation.evaluate import score_samples
    from difftrain.families import family_for
    from difftrain.pipeline import load_pipeline
    from difftrain.sampling.generate import ImageSampler

    run_dir = Path(result["run_dir"])
    cfg = load_run_config(run_dir)
    pipe = load_pipeline(run_dir, device="cpu")
    sampler = ImageSampler.from_pipeline(pipe)
    labels, prompts = family_for(cfg).evaluation_conditions(ref.class_names, args.num_samples)
    seeds = list(range(10_000, 10_000 + args.num_samples))  # not the evaluation's seeds
    points = []
    for steps in args.sampler_steps:
        start = time.perf_counter()
        samples = sampler.generate(pipe.scheduler, seeds, num_inference_steps=steps, labels=labels, prompts=prompts,
                                   guidance_scale=cfg.sample.guidance_scale, batch_size=250, device="cpu")
        report = score_samples(ref, samples, labels)
        points.append({"steps": steps, "classifier_fid": report["classifier_fid"], "accuracy": report["accuracy"],
                       "ms_per_image": 1000 * (time.perf_counter() - start) / args.num_samples})
    return points


def steps_within_best(points: list[dict]) -> int:
    best = min(p["classifier_fid"] for p in points)
    return min(p["steps"] for p in points if p["classifier_fid"] <= WITHIN_BEST * best)


def run_dataset(dataset: str, args) -> dict:
    from difftrain.commands.evaluate import run_reference
    from difftrain.config import load_config

    # The DiT matches the flow-matching UNet it is compared with (the third variant); its config differs only in
    # the backbone.
    flow_unet = variants(dataset, [])[2]
    overrides = [*data_overrides(dataset, args), *flow_unet.overrides]
    unet_cfg = load_config(flow_unet.preset, overrides)
    unet_flops, unet_params = network_flops(unet_cfg)
    dit_size, dit_flops, dit_params = dit_matching_flops(flow_unet.preset, unet_flops, overrides)
    print(f"{dataset}: UNet {unet_flops / 1e6:.1f} MFLOP/image (fwd+bwd), {unet_params / 1e6:.2f}M parameters; "
          f"DiT {' '.join(dit_size)}: {dit_flops / 1e6:.1f} MFLOP/image, {dit_params / 1e6:.2f}M parameters", flush=True)
    ref = run_reference(unet_cfg, use_inception=False)
    print(f"{dataset}: reference classifier test accuracy {ref.classifier.test_accuracy:.4f}", flush=True)
    results = []
    for index, variant in enumerate(variants(dataset, dit_size)):
        result = train_variant(variant, index, dataset, args)
        result["sampler_steps"] = sampler_steps(result, ref, args)
        results.append(result)
    return {"dataset": dataset, "unet_mflops": unet_flops / 1e6, "dit_mflops": dit_flops / 1e6,
            "dit_size": dit_size, "unet_params": unet_params, "dit_params": dit_params,
            "classifier_test_accuracy": ref.classifier.test_accuracy, "results": results}


# -- report --------------------------------------------------------------------------------------------------------


def summarize(saved: dict) -> None:
    print(f"Machine: {saved['machine']}; {saved['num_samples']} samples per evaluation")
    for ds in saved["datasets"]:
        print(f"\n### {ds['dataset']}: UNet {ds['unet_mflops']:.1f} MFLOP/image, {ds['unet_params'] / 1e6:.2f}M "
              f"parameters; DiT ({' '.join(ds['dit_size'])}) {ds['dit_mflops']:.1f} MFLOP/image, "
              f"{ds['dit_params'] / 1e6:.2f}M parameters; reference classifier test accuracy "
              f"{ds['classifier_test_accuracy']:.4f}\n")
        baseline_minutes = ds["results"][0]["curve"][-1]["train_seconds"] / 60
        rows = []
        for r in ds["results"]:
            curve, last = r["curve"], r["curve"][-1]
            reached = [p for p in curve if p["accuracy"] >= ACCURACY_TARGET]
            by_baseline = [p for p in curve if p["train_seconds"] / 60 <= baseline_minutes * 1.001]
            at = by_baseline[-1] if by_baseline else None
            sampler = r["sample"]
            rows.append([r["name"], last["step"], last["train_seconds"] / 60, last["accuracy"], last["classifier_fid"],
                         f"{at['accuracy']:.3f} / {at['classifier_fid']:.3f}" if at else "-",
                         f"{reached[0]['train_seconds'] / 60:.1f} (step {reached[0]['step']})" if reached else "not reached",
                         f"{sampler['scheduler']} {steps_within_best(r['sampler_steps'])}"])
        print(markdown_table(["variant", "steps", "train min", "accuracy", "classifier FID",
                              f"acc / FID at {baseline_minutes:.1f} min", f"min to {ACCURACY_TARGET:.0%} acc",
                              "sampler steps within 5% of best"], rows))
        print("\ncurves (step, train min, accuracy, classifier FID):")
        for r in ds["results"]:
            print(f"- {r['name']}: " + "; ".join(f"{p['step']}, {p['train_seconds'] / 60:.1f}, {p['accuracy']:.3f}, "
                                                f"{p['classifier_fid']:.3f}" for p in r["curve"]))
        print("sampler steps (steps: classifier FID / accuracy):")
        for r in ds["results"]:
            print(f"- {r['name']} ({r['sample']['scheduler']}): " + "; ".join(
                f"{p['steps']}: {p['classifier_fid']:.3f} / {p['accuracy']:.3f}" for p in r["sampler_steps"]))
        if ds["dataset"] == "digits":
            quick, flow = ds["results"][0], ds["results"][2]
            limit = quick["curve"][-1]["train_seconds"]
            hit = [p for p in flow["curve"] if p["accuracy"] >= ACCURACY_TARGET and p["train_seconds"] <= limit * 1.001]
            print(f"\nacceptance: flow-matching digits preset at >= {ACCURACY_TARGET:.0%} accuracy within the "
                  f"quickstart's {limit / 60:.1f} training min: "
                  + (f"yes, step {hit[0]['step']} after {hit[0]['train_seconds'] / 60:.1f} min" if hit else "no"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="digits,mnist-text")
    parser.add_argument("--mnist", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/objectives"))
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--eval-every-steps", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=None, help="override every preset's train.max_steps")
    parser.add_argument("--sampler-steps", type=lambda s: [int(v) for v in s.split(",")], default=[5, 10, 20, 40])
    parser.add_argument("--summarize", type=Path, default=None, help="print the tables of a saved objectives.json")
    args = parser.parse_args()
    if args.summarize:
        summarize(json.loads(args.summarize.read_text()))
        return
    args.mnist, args.work_dir = args.mnist.resolve(), args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    saved = {"machine": describe_machine(), "num_samples": args.num_samples, "datasets": []}
    print(f"Machine: {saved['machine']}", flush=True)
    for dataset in args.datasets.split(","):
        saved["datasets"].append(run_dataset(dataset, args))
        (args.work_dir / "objectives.json").write_text(json.dumps(saved, indent=1))
    summarize(saved)


if __name__ == "__main__":
    main()
