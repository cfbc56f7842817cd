"""The output folder belongs to one run: a user's folder is never written to, one trainer per folder, and
SIGTERM (preemption) stops cleanly and resumes bit-identically (issue 16), on the tiny digits model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from difftrain import cli
from difftrain.config import dump_config, load_config
from difftrain.training.checkpoint import list_checkpoints
from difftrain.training.distributed import SIGNAL_STEP_ENV, SIGNAL_TIMES_ENV
from difftrain.training.loop import train
from difftrain.training.run_dir import RUN_FORMAT, marker_path
pytestmark = pytest.mark.integration

PRESET = "tiny/digits-class"
UNET = Path("unet") / "diffusion_pytorch_model.safetensors"
QUICK = ["train.sample_every_steps=null", "sample.num_inference_steps=1", "sample.images_per_class=1"]
# Subprocesses only where a separate process is what is tested (a lock holder, a signal, the CLI's fast exit);
# the rest runs in this process, which saves the import of torch and diffusers each time.


def _train(run: Path, *overrides: str) -> Path:
    return train(load_config(PRESET, [*QUICK, *overrides], output_dir=str(run)))


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(extra or {})}


def _start(run: Path, cwd: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "difftrain", "train", PRESET, "--output-dir", str(run), *QUICK, *overrides]
    return subprocess.Popen(command, cwd=cwd, env=_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_rows(proc: subprocess.Popen, run: Path, rows: int, timeout_s: float = 300) -> None:
    """Until metrics.jsonl has `rows` rows (the process is then mid-run, between or inside steps)."""
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= rows):
        assert proc.poll() is None, f"training ended early: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "training did not reach the step"
        time.sleep(0.02)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / UNET), load_file(b / UNET)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"exported EMA unet: {key} differs"


@pytest.mark.parametrize("their_config", ["any", "difftrain"])
def test_users_folder_is_refused_and_left_byte_for_byte(tmp_path: Path, their_config: str, capsys):
    """A project folder holding a README.md, a config.yaml (any YAML, even a valid difftrain config) and a
    train.py is not a run: refused with exit 1 before anything is written, every byte unchanged."""
    folder = tmp_path / "my-project"
    folder.mkdir()
    (folder / "README.md").write_text("# My project\n\nNotes I care about.\n")
    config = dump_config(load_config(PRESET)) if their_config == "difftrain" else "lr: 0.1\nlayers: [1, 2]\n"
    (folder / "config.yaml").write_text(config)
    (folder / "train.py").write_text("print('my own trainer')\n")
    before = _snapshot(folder)
    assert cli.main(["train", PRESET, "--output-dir", str(folder), "train.max_steps=1"]) == 1
    err = capsys.readouterr().err
    assert "is not empty (README.md, config.yaml, train.py) and is not a difftrain run" in err
    assert "Traceback" not in err
    assert _snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(before)
    assert cli.main(["check", PRESET, "--output-dir", str(folder), "--no-step"]) == 1
    assert "output folder refused" in capsys.readouterr().out
    assert _snapshot(folder) == before


def test_run_record_legacy_runs_and_newer_formats(tmp_path: Path, caplog, capsys):
    """A run writes .difftrain/run.json (format, versions, resolved config). A run made before run records
    (no .difftrain/) is recognised by its checkpoints and marked; one from a newer format is refused."""
    caplog.set_level("INFO", logger="difftrain")
    run = _train(tmp_path / "run", "train.max_steps=2")
    record = json.loads(marker_path(run).read_text())
    assert record["format"] == RUN_FORMAT and record["versions"]["torch"] == torch.__version__
    assert record["config"]["train"]["max_steps"] == 2 and record["config"] == yaml.safe_load((run / "config.yaml").read_text())

    shutil.rmtree(run / ".difftrain")  # as a run made by an earlier difftrain left it
    caplog.clear()
    _train(run, "train.max_steps=3")
    assert "made by difftrain 0.1.0 before run records; marked it" in caplog.text
    assert "resumed from" in caplog.text and "(step 2)" in caplog.text
    record = json.loads(marker_path(run).read_text())
    assert record["migrated_from"] == "0.1.0" and record["config"]["train"]["max_steps"] == 3

    record["format"] = RUN_FORMAT + 1
    marker_path(run).write_text(json.dumps(record))
    before = _snapshot(run)
    assert cli.main(["train", PRESET, "--output-dir", str(run), "train.max_steps=4", *QUICK]) == 1
    assert f"(run format {RUN_FORMAT + 1}); this difftrain" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_one_trainer_per_folder_and_a_killed_holder_never_blocks(tmp_path: Path, caplog):
    """Two trainers on one folder give one run: the second exits within seconds naming the holder and
    writes nothing; `sample` still reads the folder; after SIGKILL of the first a new one resumes."""
    run = _train(tmp_path / "run", "train.max_steps=2")
    first = _start(run, tmp_path, "train.max_steps=100000", "train.checkpoint_every_steps=20",
                   "train.log_every_steps=1", "train.checkpoints_total_limit=null")
    try:
        _wait_for_rows(first, run, 30)
        before = {name: data for name, data in _snapshot(run).items() if not name.startswith(("logs", "checkpoints"))}
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "difftrain", "train", PRESET, "--output-dir", str(run),
                                 "train.max_steps=100000", *QUICK], cwd=tmp_path, env=_env(), capture_output=True,
                                text=True, timeout=300)
        elapsed_s = time.monotonic() - started
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"is in use by another difftrain process: difftrain train with pid {first.pid} on host" in second.stderr
        assert "Traceback" not in second.stderr
        assert elapsed_s < 30  # checked before torch is imported: a few seconds even on a busy machine
        after = {name: data for name, data in _snapshot(run).items() if name in before}
        assert after.keys() == before.keys()
        assert after["train.log"].startswith(before["train.log"]) and b"in use" not in after["train.log"]
        assert cli.main(["sample", str(run), "--num-images", "1", "--num-inference-steps", "1",
                         "--out", str(tmp_path / "while-training.png")]) == 0
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    newest = list_checkpoints(run / "checkpoints")[-1][0]
    caplog.set_level("INFO", logger="difftrain")
    _train(run, f"train.max_steps={newest + 2}")
    assert f"(step {newest})" in caplog.text
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps))  # one run's rows, none written twice


SIGNAL_RUN = ["train.max_steps=60", "train.checkpoint_every_steps=1000", "train.log_every_steps=1",
              "train.checkpoints_total_limit=null"]


def test_sigterm_mid_step_checkpoints_that_step_and_resumes_bit_identically(tmp_path: Path, caplog):
    run = tmp_path / "preempted"
    proc = _start(run, tmp_path, *SIGNAL_RUN)
    try:
        _wait_for_rows(proc, run, 10)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    [(step, checkpoint)] = list_checkpoints(run / "checkpoints")  # no periodic one: only the signal's
    assert f"difftrain train: stopped by SIGTERM after step {step} of 60: checkpoint {checkpoint.name}" in err
    assert 10 <= step < 60 and not (run / "model_index.json").exists()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert "stopped by SIGTERM after step" in (run / "train.log").read_text()

    caplog.set_level("INFO", logger="difftrain")
    _train(run, *SIGNAL_RUN)
    assert f"(step {step})" in caplog.text
    straight = _train(tmp_path / "straight", *SIGNAL_RUN)
    _same_weights(straight, run)


@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_during_a_checkpoint_write_leaves_no_temporary(tmp_path: Path, signals: int, caplog):
    """One SIGTERM mid-write: the checkpoint completes, then the run stops. A second one abandons the write:
    its temporary folder is removed and the previous checkpoint is intact. Either way the same command
    resumes to bit-identical weights."""
    overrides = ["train.max_steps=8", "train.checkpoint_every_steps=2", "train.checkpoints_total_limit=null"]
    run = tmp_path / "run"
    stopped = subprocess.run([sys.executable, "-m", "difftrain", "train", PRESET, "--output-dir", str(run), *QUICK,
                              *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env=_env({SIGNAL_STEP_ENV: "4", SIGNAL_TIMES_ENV: str(signals)}))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    kept = [step for step, _ in list_checkpoints(run / "checkpoints")]
    assert kept == ([2, 4] if signals == 1 else [2])
    if signals == 1:
        assert "stopped by SIGTERM after step 4 of 8: checkpoint step-000004" in stopped.stderr
    else:
        assert "stopped by SIGTERM before training completed" in stopped.stderr

    caplog.set_level("INFO", logger="difftrain")
    _train(run, *overrides)
    assert f"(step {kept[-1]})" in caplog.text
    straight = _train(tmp_path / "straight", *overrides)
    _same_weights(straight, run)
