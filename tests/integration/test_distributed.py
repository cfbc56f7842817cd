"""Multi-process training through accelerate, on CPU: 2 processes joined by gloo on loopback.

The single-process comparison uses 1 process with gradient accumulation 2: micro-batch slots are
numbered `micro * world_size + rank` for both the images (`stream_position`) and the random draws
(`micro_batch_generator`), so 2 ranks x batch 4 and 1 rank x batch 4 x accumulation 2 train on the same
images with the same noise and timesteps. The only difference is where the two gradients are averaged
(gloo all-reduce vs accumulation), hence the tolerances below rather than bit equality. (1 rank x batch
8 draws the same images but one generator for all 8, so its noise differs; golden single-process losses
are unchanged because with one process the slot is the micro-step.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.training.checkpoint import list_checkpoints
from difftrain.processes import free_loopback_port
from difftrain.training.loop import train

pytestmark = pytest.mark.integration

PRESET = "tiny/digits-class"
PER_RANK = ["train.batch_size=4"]  # x 2 processes = the preset's global batch of 8
# Evaluation during training, sharded over the ranks: 9 seeds split 5 + 4, classifier metrics only.
EVAL = ["train.eval_every_steps=2", "train.eval_num_samples=9", "train.eval_inception=false"]
TIMEOUT_S = 300  # a hang (a rank waiting forever at a collective) fails the test instead of the CI job
# Step-1 loss is computed before any update, from the same inputs: equal up to the order of one sum.
FIRST_LOSS_REL = 1e-6
# Later steps and weights also carry the all-reduce vs accumulation rounding of the gradient mean.
LOSS_REL, WEIGHT_ATOL = 1e-5, 1e-6


def _env(extra: dict | None = None) -> dict:
    # Two ranks on a 2-core machine: one thread each, or they oversubscribe the cores ~10x.
    # No GPUs: these tests check the CPU (gloo) path, which is the same on a machine with one.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "", **(extra or {})}


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """Run a launcher; on a hang stop it and its ranks, then fail with its stderr."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in its own session, so killing the launcher would orphan them; on
        # SIGTERM it stops them itself.
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"launch did not finish in {TIMEOUT_S} s: {' '.join(cmd)}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _difftrain_n(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`difftrain train --num-processes 2 ...` (torchrun on loopback)."""
    return _run([sys.executable, "-m", "difftrain", "train", PRESET, "--num-processes", "2", *args], cwd, _env(env))


def _accelerate_launch(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m difftrain train ...` on a machine without GPUs."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_loopback_port()),
           "-m", "difftrain", "train", PRESET, *args]
    return _run(cmd, cwd, _env(env))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """In-process comparison runs use one thread like the ranks (_env): thread count changes the order of sums.

    That matters more than it seems: an attention key bias gets a gradient that is zero up to rounding
    (softmax ignores a shift of every key), and AdamW scales that rounding noise up to full-size updates,
    so with 2 threads here `to_k.bias` ended ~1e-3 away from the 1-thread ranks.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _all_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _rows(run: Path) -> list[dict]:
    return [r for r in _all_rows(run) if "loss" in r]


def _evals(run: Path) -> list[dict]:
    return [r for r in _all_rows(run) if "eval" in r]


def _unet(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """4 steps of the tiny preset on 2 CPU processes, uninterrupted."""
    root = tmp_path_factory.mktemp("dist")
    run = root / "two"
    # The conftest's per-test cache variable is not set yet for a module fixture; use the same folder.
    cache = {"DIFFTRAIN_CACHE": str(tmp_path_factory.getbasetemp() / "difftrain-cache")}
    result = _difftrain_n(root, "--output-dir", str(run), *PER_RANK, *EVAL, env=cache)
    assert result.returncode == 0, result.stderr[-4000:]
    return run


def test_two_processes_write_one_run_and_match_one_process_with_the_same_global_batch(two_process_run: Path,
                                                                                      tmp_path: Path):
    run = two_process_run
    log = (run / "train.log").read_text()
    assert log.count("global batch 8 (4 x 1 accumulation x 2 processes)") == 1, log
    assert "x 1 processes" not in log and "resumed from" not in log
    # Exactly one set of outputs: one row per step, one grid, one event file, whole checkpoints only.
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000004.png"]
    assert len(list((run / "logs").rglob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    saved = sorted(p.name for p in (run / "checkpoints" / "step-000004").iterdir())
    assert "random_states_0.pkl" in saved and "random_states_1.pkl" in saved  # save_state ran on both ranks
    progress = json.loads((run / "checkpoints" / "step-000004" / "progress.json").read_text())
    assert progress["num_processes"] == 2 and progress["images_seen"] == 32
    assert (run / "model_index.json").is_file() and not list(run.glob(".*tmp*"))

    with _one_thread():
        single = train(load_config(PRESET, [*PER_RANK, *EVAL, "train.gradient_accumulation_steps=2"],
                                   output_dir=str(tmp_path / "one")))
    two, one = _rows(run), _rows(single)
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=FIRST_LOSS_REL)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=LOSS_REL)
    assert [r["lr"] for r in two] == [r["lr"] for r in one]
    a, b = _unet(run), _unet(single)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=WEIGHT_ATOL, msg=key)
    # Evaluation: both ranks sampled a share of the 9 seeds, rank 0 scored all of them once per interval.
    two_evals, one_evals = _evals(run), _evals(single)
    assert [r["step"] for r in two_evals] == [2, 4] and two_evals[0]["eval"]["num_samples"] == 9
    for mine, theirs in zip(two_evals, one_evals):
        assert mine["eval"]["accuracy"] == theirs["eval"]["accuracy"]
        assert mine["eval"]["classifier_fid"] == pytest.approx(theirs["eval"]["classifier_fid"], rel=1e-4)


def test_interrupted_two_process_run_resumes_exactly_on_two_processes(two_process_run: Path, tmp_path: Path):
    run = tmp_path / "resumed"
    # Rank 1 dies at step 3, after the step-2 checkpoint: the launch fails and leaves that checkpoint.
    crashed = _accelerate_launch(tmp_path, "--output-dir", str(run), *PER_RANK,
                                 env={"DIFFTRAIN_FAIL_ON_RANK": "1", "DIFFTRAIN_FAIL_AT_STEP": "3"})
    assert crashed.returncode != 0
    assert "injected failure on rank 1 at step 3" in crashed.stderr
    assert (run / "checkpoints" / "step-000002" / "progress.json").is_file()
    assert not (run / "model_index.json").exists()

    resumed = _accelerate_launch(tmp_path, "--output-dir", str(run), *PER_RANK)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "(step 2)" in (run / "train.log").read_text()
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]
    assert [r["loss"] for r in _rows(run)] == [r["loss"] for r in _rows(two_process_run)]
    a, b = _unet(two_process_run), _unet(run)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_on_a_different_process_count_loads_and_says_so(two_process_run: Path, tmp_path: Path, caplog):
    run = tmp_path / "moved"
    shutil.copytree(two_process_run, run)
    with caplog.at_level("WARNING", logger="difftrain"):
        train(load_config(PRESET, [*PER_RANK, "train.max_steps=6"], output_dir=str(run)))
    assert "written by 2 processes on 1" in caplog.text and "not an exact resume" in caplog.text
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # The saved schedule counted 2 ticks per step; on 1 process it continues from step 4 of the cosine
    # over 6 steps (1 warm-up), not from tick 8.
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * (5 - 1) / (6 - 1)))
    assert rows[4]["lr"] == pytest.approx(expected, rel=1e-6)


def test_a_failing_rank_ends_the_launch_with_its_error(tmp_path: Path):
    run = tmp_path / "fail"
    start = time.monotonic()
    result = _difftrain_n(tmp_path, "--output-dir", str(run), *PER_RANK, env={"DIFFTRAIN_FAIL_ON_RANK": "1"})
    # Rank 0 is then blocked in the first gradient all-reduce; the launcher must end it, not wait for gloo's timeout.
    assert result.returncode != 0
    assert time.monotonic() - start < TIMEOUT_S
    assert "injected failure on rank 1 at step 1 (DIFFTRAIN_FAIL_ON_RANK)" in result.stderr
    assert not (run / "model_index.json").exists() and not (run / "checkpoints").exists()


def test_evaluate_shards_its_seeds_over_two_processes(two_process_run: Path, tmp_path: Path):
    from difftrain.commands.evaluate import evaluate_run

    args = ["--num-samples", "9", "--num-reference", "40", "--num-inference-steps", "2", "--no-inception"]
    out = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_loopback_port()),
           "-m", "difftrain", "evaluate", str(two_process_run), *args, "--out", str(out)]
    result = _run(cmd, tmp_path, _env())
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("classifier_fid") == 1  # one report, from the main process
    with _one_thread():
        one = evaluate_run(two_process_run, num_samples=9, num_reference=40, num_inference_steps=2,
                           use_inception=False, out=tmp_path / "one.json")
    two = json.loads(out.read_text())
    assert two["num_samples"] == 9
    assert two["accuracy"] == one["accuracy"] and two["per_class_accuracy"] == one["per_class_accuracy"]
    assert two["classifier_fid"] == pytest.approx(one["classifier_fid"], rel=1e-6)


def test_sigterm_to_the_launcher_stops_every_rank_after_the_same_step(tmp_path: Path):
    """Preemption of `difftrain train --num-processes 2`: torchrun passes SIGTERM to both ranks, which agree on
    the step, write its checkpoint together and exit 143; the same command then resumes from it."""
    run = tmp_path / "preempted"
    long_run = ["--output-dir", str(run), *PER_RANK, "train.max_steps=100000", "train.checkpoint_every_steps=1000",
                "train.sample_every_steps=null", "train.log_every_steps=1"]
    cmd = [sys.executable, "-m", "difftrain", "train", PRESET, "--num-processes", "2", *long_run]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not ((run / "metrics.jsonl").is_file() and len(_rows(run)) >= 5):
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            assert time.monotonic() < deadline, "the ranks did not start training"
            time.sleep(0.05)
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-4000:]
    [(step, _)] = list_checkpoints(run / "checkpoints")
    for rank in (0, 1):
        assert f"difftrain train [rank {rank}]: stopped by SIGTERM after step {step} of 100000" in err
    assert "the launcher received SIGTERM" in err
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]

    resumed = _difftrain_n(tmp_path, "--output-dir", str(run), *PER_RANK, f"train.max_steps={step + 2}",
                           "train.sample_every_steps=null")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"(step {step})" in (run / "train.log").read_text()
    assert (run / "model_index.json").is_file()


def test_flow_matching_on_two_processes_matches_one_with_the_same_global_batch(tmp_path: Path):
    # Each rank draws its own noise and times from its per-step generator; the union must be what one process with
    # accumulation draws, so the losses agree as in the DDPM case above.
    run = tmp_path / "two-flow"
    result = _run([sys.executable, "-m", "difftrain", "train", "tiny/digits-flow", "--num-processes", "2",
                   "--output-dir", str(run), *PER_RANK], tmp_path, _env())
    assert result.returncode == 0, result.stderr[-4000:]
    with _one_thread():
        single = train(load_config("tiny/digits-flow", [*PER_RANK, "train.gradient_accumulation_steps=2"],
                                   output_dir=str(tmp_path / "one-flow")))
    two, one = _rows(run), _rows(single)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=LOSS_REL)
