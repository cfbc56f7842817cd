"""The web UI's sample jobs on tiny real runs: checked at submit, run on the worker thread, images listed as they are
written, and the job's `difftrain sample` line gives the same PNG bytes through the CLI."""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

import pytest

from difftrain.cli import main
from difftrain.config import load_config
from difftrain.training.loop import train
from difftrain.ui.sampling import SampleJobs, SampleRequest

from ..instances import write_instance_images
from ..tiny_sdxl import build_tiny_sdxl
from .test_sample_checkpoint import train_digits

pytestmark = pytest.mark.integration

RUN = "digits/a"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """RUNS_DIR holding digits/a (a class UNet with EMA, checkpoints 2 and 4, best/) and text/lora (an SDXL LoRA)."""
    root = tmp_path_factory.mktemp("runs")
    train_digits(root / RUN)
    base = build_tiny_sdxl(tmp_path_factory.mktemp("base") / "sdxl")
    overrides = [f"model.pretrained={base}", "train.prior_preservation=false",
                 f"data.instance_dir={write_instance_images(tmp_path_factory.mktemp('instance'))}"]
    train(load_config("tiny/dreambooth-sdxl-lora", overrides, output_dir=str(root / "text" / "lora")))
    return root


@pytest.fixture
def jobs(runs_dir: Path):
    jobs = SampleJobs(runs_dir, device="cpu")
    yield jobs
    jobs.close()


def poll(jobs: SampleJobs, job_id: str, timeout: float = 300) -> tuple[dict, list[int]]:
    """Poll as the page does until the job ends; returns it and the image counts seen on the way."""
    counts, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        job = jobs.get(job_id)
        counts.append(len(job["images"]))
        if job["state"] in ("done", "failed"):
            return job, counts
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not end in {timeout} s: {jobs.get(job_id)}")


def cli_pngs(runs_dir: Path, command: str, grid: str, out_dir: Path, monkeypatch) -> dict[str, bytes]:
    """Run the job's command line from RUNS_DIR (on the CPU, the singles into out_dir): the PNGs by name, the grid
    (at the CLI's default path `grid`, relative to RUNS_DIR) as grid.png."""
    words = shlex.split(command)
    assert words[:2] == ["difftrain", "sample"]
    monkeypatch.chdir(runs_dir)
    assert main([*words[1:], "--device", "cpu", "--out-dir", str(out_dir)]) == 0
    pngs = {p.name: p.read_bytes() for p in out_dir.glob("*.png")}
    pngs["grid.png"] = (runs_dir / grid).read_bytes()
    return pngs


def job_pngs(runs_dir: Path, job: dict) -> dict[str, bytes]:
    pngs = {Path(path).name: (runs_dir / path).read_bytes() for path in job["images"]}
    pngs["grid.png"] = (runs_dir / job["grid"]).read_bytes()
    return pngs


def test_a_checkpoint_job_lists_its_images_and_its_command_line_gives_the_same_pngs(jobs: SampleJobs, runs_dir: Path,
                                                                                     tmp_path: Path, monkeypatch):
    request = SampleRequest.from_json({"run": RUN, "source": "checkpoint:step-000002", "class_labels": "1,7",
                                       "num_images": 2, "seed": "3", "guidance_scale": "1,2", "scheduler": None})
    queued = jobs.submit(request)
    assert (queued["state"], queued["images"], queued["grid"], queued["total"], queued["error"]) == \
        ("queued", [], None, None, None)
    assert queued["command"] == ("difftrain sample digits/a --checkpoint step-000002 --class-label 1,7 "
                                 "--guidance-scale 1,2 --seed 3 --num-images 2")
    job, counts = poll(jobs, queued["id"])
    assert job["state"] == "done" and job["error"] is None and job["total"] == 8, job
    assert counts == sorted(counts) and counts[-1] == 8  # images only ever appear
    folder = f"{RUN}/samples/ui/{job['id']}"
    assert job["grid"] == f"{folder}/grid.png"
    assert job["images"] == [f"{folder}/seed{s:06d}-class{c}-w{w}.png" for s, c in ((3, 1), (4, 1), (5, 7), (6, 7))
                             for w in (1, 2)]
    assert cli_pngs(runs_dir, job["command"], f"{RUN}/samples/sweep-step-000002.png", tmp_path / "cli",
                    monkeypatch) == job_pngs(runs_dir, job)


def test_a_best_job_samples_the_runs_best_folder_with_the_runs_defaults(jobs: SampleJobs, runs_dir: Path,
                                                                         tmp_path: Path, monkeypatch):
    job, _ = poll(jobs, jobs.submit(SampleRequest.from_json({"run": RUN, "source": "best", "num_images": 1}))["id"])
    assert job["state"] == "done" and job["total"] == 10, job
    assert job["command"] == "difftrain sample digits/a/best --num-images 1"
    assert cli_pngs(runs_dir, job["command"], f"{RUN}/best/samples/sample.png", tmp_path / "cli",
                    monkeypatch) == job_pngs(runs_dir, job)


def test_a_lora_export_job(jobs: SampleJobs, runs_dir: Path):
    job, _ = poll(jobs, jobs.submit(SampleRequest.from_json({"run": "text/lora", "num_images": 2,
                                                               "num_inference_steps": 2}))["id"])
    assert job["state"] == "done" and len(job["images"]) == 2, job  # the prompt is the run's sample.prompts


@pytest.mark.parametrize("fields, error, message", [
    ({"run": "nope"}, FileNotFoundError, "run 'nope': no such run under RUNS_DIR"),
    ({"run": "../runs0/digits/a"}, FileNotFoundError, "run '../runs0/digits/a': no such run under RUNS_DIR"),
    ({"run": "digits"}, FileNotFoundError, "run 'digits': no such run"),  # a folder, not a run
    ({"source": "checkpoint:step-000009"}, ValueError,
     "source 'checkpoint:step-000009': not a checkpoint run 'digits/a' keeps ('checkpoint:latest' is its newest); "
     "its sources: export, best, checkpoint:step-000002, checkpoint:step-000004"),
    ({"run": "text/lora", "source": "best"}, ValueError,
     "source 'best': run 'text/lora' has no best export (train.keep_best_by writes best/); its sources: export, "
     "checkpoint:step-000002, checkpoint:step-000004"),
    ({"prompts": ["a cat"]}, ValueError,
     "prompts: only a text-to-image model takes it, and run 'digits/a' (export) is a class model"),
    ({"negative_prompt": "blurry", "source": "checkpoint:latest"}, ValueError,
     "negative_prompt: only a text-to-image model takes it, and run 'digits/a' (checkpoint:latest) is a class model"),
    ({"class_labels": "12"}, ValueError, "class_labels [12]: the model has classes 0..9"),
    ({"class_labels": "daisy"}, ValueError, "class_labels 'daisy': not a class index or one of ['0', '1'"),
    ({"run": "text/lora", "class_labels": "1"}, ValueError,
     "class_labels: only a class-conditional model takes it, and run 'text/lora' (export) is a text model"),
])
def test_submit_refuses_what_the_run_or_its_model_does_not_have(jobs: SampleJobs, runs_dir: Path, fields: dict,
                                                                error: type, message: str):
    with pytest.raises(error) as info:
        jobs.submit(SampleRequest.from_json({"run": RUN, **fields}))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert jobs._queue.empty() and not jobs._jobs  # nothing queued (the page gets no job id)


def test_a_checkpoint_with_no_export_yet_is_checked_by_its_runs_family(jobs: SampleJobs, runs_dir: Path):
    """A run still training: checkpoints only, no export and no config.yaml yet, so no prompt to default to."""
    lora = runs_dir / "text" / "lora"
    training = runs_dir / "text" / "training"
    for part in ("checkpoints", ".difftrain"):
        shutil.copytree(lora / part, training / part, ignore=shutil.ignore_patterns("exports"))
    with pytest.raises(ValueError, match=r"^class_labels: only a class-conditional model takes it, and run "
                                         r"'text/training' \(checkpoint:latest\) is a text model$"):
        jobs.submit(SampleRequest(run="text/training", source="checkpoint:latest", class_labels="1"))
    with pytest.raises(ValueError, match=r"^prompts: run 'text/training' \(checkpoint:latest\) is a text-to-image "
                                         r"model and its config has no sample.prompts; give at least one prompt$"):
        jobs.submit(SampleRequest(run="text/training", source="checkpoint:latest"))


def test_a_job_that_fails_while_running_says_why_in_one_line_and_the_next_one_runs(jobs: SampleJobs):
    failed, _ = poll(jobs, jobs.submit(SampleRequest.from_json({"run": RUN, "class_labels": "1", "num_images": 2,
                                                                  "seed": "1,2,3"}))["id"])
    assert (failed["state"], failed["error"], failed["images"], failed["grid"]) == \
        ("failed", "--seed lists 3 seeds for 2 images", [], None)
    done, _ = poll(jobs, jobs.submit(SampleRequest.from_json({"run": RUN, "class_labels": "1", "num_images": 1}))["id"])
    assert done["state"] == "done" and len(done["images"]) == 1
    with pytest.raises(FileNotFoundError, match="no sample job 'nope'"):
        jobs.get("nope")
