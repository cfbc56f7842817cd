"""The `difftrain` command end to end, in subprocesses, on tiny models and real local data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

pytestmark = pytest.mark.integration


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "difftrain", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_flowers_preset_trains_exports_and_resumes(tmp_path: Path, flowers_dir: Path):
    """The issue's acceptance: flowers at 32 px for 4 steps, DDPMPipeline loads it, 8 steps resumes from 4."""
    run = tmp_path / "runs" / "f"
    args = ["train", "flowers", "--output-dir", str(run), f"data.path={flowers_dir}", "data.resolution=32",
            "sample.num_images=4", "sample.num_inference_steps=2", "train.log_every_steps=1", "train.batch_size=8"]
    first = run_cli(*args, "train.max_steps=4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    for name in ("model_index.json", "unet", "scheduler", "config.yaml", "README.md", "train.log", "metrics.jsonl"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / "step-000004" / "progress.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run / "logs").rglob("events.out.tfevents.*"))), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert {"lr", "images_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("samples")] == [4]
    grid = Image.open(run / "samples" / "step-000004.png")
    assert grid.size[0] >= 2 * 32
    card = (run / "README.md").read_text()
    assert "DDPMPipeline.from_pretrained" in card and "720 images" in card

    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(run))
    image = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)

    second = run_cli(*args, "train.max_steps=8", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "(step 4)" in second.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-4:] == [5, 6, 7, 8] and steps.count(1) == 1, steps
    assert "train.max_steps: 4 -> 8" in (run / "train.log").read_text()


def test_class_conditional_run_and_sample_command(tmp_path: Path):
    run = tmp_path / "d"
    result = run_cli("train", "tiny/digits-class", "--output-dir", str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "model_index.json").read_text())["_class_name"] == "ClassConditionalPipeline"
    grid = Image.open(run / "samples" / "step-000004.png")
    assert grid.height > grid.width / 2  # 10 class rows x 2 columns

    out, singles = tmp_path / "grid.png", tmp_path / "singles"
    sampled = run_cli("sample", str(run), "--class-label", "1,7", "--num-images", "3", "--scheduler", "dpm++",
                      "--num-inference-steps", "3", "--guidance-scale", "3", "--seed", "10",
                      "--out", str(out), "--out-dir", str(singles), cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    assert Image.open(out).mode == "RGB"
    names = sorted(p.name for p in singles.iterdir())
    assert names == [f"seed{s:06d}-class{c}.png" for s, c in zip(range(10, 16), [1, 1, 1, 7, 7, 7])]
    assert Image.open(singles / names[0]).size == (8, 8)

    import difftrain

    pipe = difftrain.load_pipeline(run)
    assert isinstance(pipe, difftrain.ClassConditionalPipeline) and pipe.num_classes == 10
    images = pipe(class_labels=[0, 1], num_inference_steps=2).images
    assert len(images) == 2 and images[0].size == (8, 8)

    bad = run_cli("sample", str(run), "--class-label", "12", "--num-inference-steps", "2", cwd=tmp_path)
    assert bad.returncode == 1 and "0..9" in bad.stderr


def test_unconditional_sample_with_every_scheduler_name(tmp_path: Path, flowers_dir: Path):
    run = tmp_path / "u"
    assert run_cli("train", "tiny/folder-uncond", "--output-dir", str(run), f"data.path={flowers_dir / 'iris'}",
                   "train.max_steps=1", cwd=tmp_path).returncode == 0
    from difftrain.cli import main

    # In-process calls of the same entry point: one subprocess start per scheduler would cost minutes.
    for name in ("ddpm", "ddim", "dpm++", "unipc", "euler"):
        out = tmp_path / f"{name}.png"
        assert main(["sample", str(run), "--scheduler", name, "--num-inference-steps", "2",
                     "--num-images", "4", "--out", str(out)]) == 0
        assert Image.open(out).size[0] > 2 * 16
    refused = run_cli("sample", str(run), "--class-label", "1", cwd=tmp_path)
    assert refused.returncode == 1 and "unconditional" in refused.stderr


def test_flow_matching_run_exports_what_plain_diffusers_samples(tmp_path: Path, flowers_dir: Path):
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler

    from difftrain.cli import main
    from difftrain.config import load_config
    from difftrain.diffusion.flow import FlowMatchingObjective

    run = tmp_path / "flow"
    result = run_cli("train", "tiny/folder-uncond", "--output-dir", str(run), f"data.path={flowers_dir / 'iris'}",
                     "train.max_steps=2", "diffusion.objective=flow_matching", "diffusion.flow_shift=2.0",
                     "diffusion.timestep_sampling=logit_normal", "sample.scheduler=euler", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "flow matching (velocity target)" in (run / "README.md").read_text()
    assert (run / "samples" / "step-000002.png").is_file()

    # Plain diffusers: DDPMPipeline on the exported FlowMatchEuler scheduler, whose sigmas are the training ones.
    pipe = DDPMPipeline.from_pretrained(run)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 2.0
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    cfg = load_config(str(run / "config.yaml"))
    trained = FlowMatchingObjective.from_config(cfg.diffusion, sample_size=cfg.data.resolution)
    saved = FlowMatchEulerDiscreteScheduler.from_pretrained(run / "scheduler")
    torch.testing.assert_close(trained.sigmas, saved.sigmas)

    # `difftrain sample` picks the flow kind of every flow-capable name from the exported schedule.
    for name in ("euler", "heun", "dpm++", "unipc"):
        out = tmp_path / f"{name}.png"
        assert main(["sample", str(run), "--scheduler", name, "--num-inference-steps", "2", "--num-images", "2",
                     "--out", str(out)]) == 0
        assert out.is_file()
    refused = run_cli("sample", str(run), "--scheduler", "ddim", "--num-inference-steps", "2", cwd=tmp_path)
    assert refused.returncode == 1 and "use one of euler, heun, dpm++, unipc" in refused.stderr


def test_flow_matching_class_run_samples_with_guidance(tmp_path: Path):
    import difftrain

    run = tmp_path / "flow-class"
    result = run_cli("train", "tiny/digits-flow", "--output-dir", str(run), "train.eval_every_steps=2",
                     "train.eval_num_samples=10", "train.eval_inception=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    evals = [json.loads(line)["eval"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals) == 2 and all("accuracy" in e for e in evals)  # evaluation during training, flow samplers
    assert "shift 1.58 (by resolution (8 px side))" in (run / "train.log").read_text()  # exp(mu), mu(16 tokens) = 0.459
    pipe = difftrain.load_pipeline(run)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    images = pipe(class_labels=[0, 1], num_inference_steps=2, guidance_scale=3.0).images
    assert len(images) == 2 and images[0].size == (8, 8)


def test_unknown_preset_fails_and_writes_nothing(tmp_path: Path):
    result = run_cli("train", "nosuch", cwd=tmp_path)
    assert result.returncode == 2
    assert "'nosuch' is neither a YAML file nor a preset" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_misspelt_key_fails_and_writes_nothing(tmp_path: Path):
    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "tiny" / "digits-class.yaml").read_text())
    cfg["train"]["learning_rat"] = cfg["train"].pop("learning_rate")
    cfg["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = run_cli("train", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown key 'train.learning_rat'; did you mean 'train.learning_rate'?" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["typo.yaml"]


def test_missing_data_fails_before_writing(tmp_path: Path):
    result = run_cli("train", "tiny/folder-uncond", "--output-dir", str(tmp_path / "out"),
                     f"data.path={tmp_path / 'no-such-folder'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "no-such-folder" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_foreign_output_dir_is_refused(tmp_path: Path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not touch")
    result = run_cli("train", "tiny/digits-class", "--output-dir", str(out), cwd=tmp_path)
    assert result.returncode == 1 and "is not a difftrain run" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]


def test_push_to_hub_offline_keeps_the_export(tmp_path: Path):
    run = tmp_path / "p"
    result = run_cli("train", "tiny/digits-class", "--output-dir", str(run), "train.max_steps=1",
                     "train.push_to_hub=true", "train.hub_model_id=someone/tiny-digits", cwd=tmp_path)
    assert result.returncode == 1
    assert "could not push" in result.stderr and "someone/tiny-digits" in result.stderr
    assert "local export" in result.stderr
    assert (run / "model_index.json").is_file() and (run / "unet").is_dir()


def test_show_config_and_presets(tmp_path: Path):
    shown = run_cli("show-config", "digits", "train.max_steps=3", cwd=tmp_path)
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["train"]["max_steps"] == 3
    listed = run_cli("presets", cwd=tmp_path)
    assert listed.returncode == 0 and "digits" in listed.stdout and "butterflies" in listed.stdout


def test_version_lists_difftrain_and_its_libraries_without_importing_torch(tmp_path: Path):
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("difftrain 0.1.0 (python ") and "\n" not in line
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft"):
        assert f" {name} " in line
    script = ("import sys\nfrom difftrain.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n"
              "    assert e.code == 0\nassert 'torch' not in sys.modules, 'torch imported'\n")
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0, quiet.stderr


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_bad_inputs_get_one_line_before_anything_is_written(tmp_path: Path, capsys):
    """Issue 16 item 5 through the command line: each bad value named, nothing written, no traceback."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from difftrain.cli import main

    out = tmp_path / "out"
    assert main(["train", "tiny/digits-class", "--output-dir", str(out), "train.max_steps"]) == 2
    assert _one_error_line(capsys) == "difftrain train: error: expected key=value, got 'train.max_steps'"
    assert main(["show-config", "digits", "train.max_steps=3", "batch_size", "x"]) == 2
    assert _one_error_line(capsys) == "difftrain show-config: error: expected key=value, got 'batch_size' (and 1 more)"
    assert main(["train", "tiny/digits-class", "--output-dir", str(out), "train.learning_rate=nan"]) == 2
    assert _one_error_line(capsys) == "  - 'train.learning_rate' = 'nan': must be a finite number (not NaN or infinity)"
    nan_yaml = tmp_path / "nan.yaml"
    nan_yaml.write_text("train:\n  max_steps: 2\n  learning_rate: .nan\n")
    assert main(["train", str(nan_yaml), "--output-dir", str(out)]) == 2
    assert _one_error_line(capsys) == "  - 'train.learning_rate' = nan: must be a finite number (not NaN or infinity)"
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    assert main(["train", str(binary), "--output-dir", str(out)]) == 2
    assert _one_error_line(capsys) == f"  - {binary}: not UTF-8 text (byte 0: b'\\x89'); a config is a YAML file"
    assert not out.exists(), "a refused config leaves no output folder (no train.log)"

    run = tmp_path / "run"
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(str(run))
    before = sorted(str(p) for p in run.rglob("*"))
    for args, message in (
        (["--num-images", "0"], "--num-images 0: must be an integer >= 1"),
        (["--num-inference-steps", "0"], "--num-inference-steps 0: must be an integer >= 1"),
        (["--num-images", "-3"], "--num-images -3: must be an integer >= 1"),
        (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
        (["--guidance-scale", "nan"], "--guidance-scale 'nan': expected finite numbers >= 0 (1 = no guidance), "
                                      "like 5 or a sweep 0,5,10"),
        (["--guidance-scale", "0,5,inf"], "--guidance-scale '0,5,inf': expected finite numbers >= 0 (1 = no guidance), "
                                          "like 5 or a sweep 0,5,10"),
    ):
        assert main(["sample", str(run), "--device", "cpu", *args]) == 1, args
        assert _one_error_line(capsys) == f"difftrain sample: error: {message}"
    for args, message in (
        (["--num-samples", "0"], "--num-samples 0: must be an integer >= 2"),
        (["--num-reference", "-1"], "--num-reference -1: must be an integer >= 2"),
        (["--num-inference-steps", "0"], "--num-inference-steps 0: must be an integer >= 1"),
        (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
        (["--guidance-scale", "nan"], "--guidance-scale nan: must be a finite number >= 0 (1 = no guidance)"),
    ):
        assert main(["evaluate", str(run), "--device", "cpu", *args]) == 1, args
        assert _one_error_line(capsys) == f"difftrain evaluate: error: {message}"
    assert sorted(str(p) for p in run.rglob("*")) == before, "nothing written into the run folder"

    index = json.loads((run / "model_index.json").read_text())
    (run / "model_index.json").write_text(json.dumps({**index, "_class_name": "NoSuchPipeline"}))
    assert main(["sample", str(run), "--device", "cpu", "--out", str(tmp_path / "g.png")]) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"difftrain sample: error: {run}: model_index.json names the pipeline class "
                           "'NoSuchPipeline', which is not a pipeline class of diffusers")
    assert not (tmp_path / "g.png").exists()
