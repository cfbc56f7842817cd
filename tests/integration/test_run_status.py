"""The trainer's status record (.difftrain/status.json) and the UI's run status read from it, on real tiny runs:
finished, interrupted (stop_at_step, SIGTERM), failed, training (only while the lock is held), killed, legacy."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftrain import cli
from difftrain.config import load_config
from difftrain.errors import StopRequested
from difftrain.training.distributed import FAIL_RANK_ENV, FAIL_STEP_ENV, SIGNAL_STEP_ENV, InjectedFailure
from difftrain.training.loop import train
from difftrain.training.status import read_proc_locks, status_path, trainer_holds_lock
from difftrain.ui.runs import find_runs, run_details

pytestmark = pytest.mark.integration

PRESET = "tiny/digits-class"
QUICK = ["train.sample_every_steps=null", "sample.num_inference_steps=1", "sample.images_per_class=1"]


def _train(run: Path, *overrides: str, stop_at_step: int | None = None) -> Path:
    words = [*QUICK, *overrides]
    return train(load_config(PRESET, words, output_dir=str(run)), stop_at_step=stop_at_step, config_source=PRESET,
                 overrides=words)


def _status(run: Path) -> dict:
    return json.loads(status_path(run).read_text())


def _listed(runs_dir: Path) -> dict:
    return {info.id: info for info in find_runs(runs_dir)}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_finished_run_records_how_it_was_started_and_the_list_shows_it(tmp_path: Path):
    run = tmp_path / "runs" / "digits"
    assert cli.main(["train", PRESET, "--output-dir", str(run), *QUICK, "train.max_steps=3"]) == 0
    status = _status(run)
    assert status["state"] == "finished" and status["kind"] == "pixel-class"
    assert status["config_source"] == PRESET and status["overrides"] == [*QUICK, "train.max_steps=3"]
    assert status["max_steps"] == 3 and status["step"] == 3
    assert status["pid"] == os.getpid() and status["host"] == socket.gethostname()
    started, ended = (datetime.datetime.fromisoformat(status[k]) for k in ("started", "ended"))
    assert started <= ended and "error" not in status

    info = _listed(tmp_path / "runs")["digits"]
    last = [row for row in _rows(run) if "loss" in row][-1]
    assert (info.status, info.kind, info.preset, info.step, info.max_steps) == ("finished", "pixel-class", PRESET, 3, 3)
    assert info.last_loss == last["loss"] and info.error is None and info.best is None
    assert info.started == status["started"] and info.wall_seconds == (ended - started).total_seconds()
    assert info.updated == max(p.stat().st_mtime for p in (run / "metrics.jsonl", run / "train.log", status_path(run)))


def test_stop_at_step_and_sigterm_are_interrupted_and_a_resume_finishes(tmp_path: Path, monkeypatch):
    run = _train(tmp_path / "run", stop_at_step=2)
    assert _status(run)["state"] == "interrupted" and _status(run)["step"] == 2
    assert not (run / "model_index.json").exists()
    assert _listed(tmp_path)["run"].status == "interrupted"
    _train(run)  # the same command resumes
    assert (_status(run)["state"], _status(run)["step"]) == ("finished", 4)
    assert _listed(tmp_path)["run"].status == "finished"

    monkeypatch.setenv(SIGNAL_STEP_ENV, "2")  # SIGTERM to this process while checkpoint step 2 is written
    with pytest.raises(StopRequested):
        _train(tmp_path / "preempted")
    assert (_status(tmp_path / "preempted")["state"], _status(tmp_path / "preempted")["step"]) == ("interrupted", 2)
    assert _listed(tmp_path)["preempted"].status == "interrupted"


def test_a_failure_is_recorded_and_a_status_that_cannot_be_written_hides_nothing(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setenv(FAIL_RANK_ENV, "0")
    monkeypatch.setenv(FAIL_STEP_ENV, "3")
    with pytest.raises(InjectedFailure):
        _train(tmp_path / "run")
    status = _status(tmp_path / "run")
    assert (status["state"], status["step"], status["error_type"]) == ("failed", 2, "InjectedFailure")
    assert status["error"] == f"injected failure on rank 0 at step 3 ({FAIL_RANK_ENV})"
    info = _listed(tmp_path)["run"]
    assert (info.status, info.error, info.step) == ("failed", status["error"], 2)

    # A status that cannot be written (a folder in its place) neither replaces the error nor stops a run.
    status_path(tmp_path / "run").unlink()
    status_path(tmp_path / "run").mkdir()
    with pytest.raises(InjectedFailure):
        _train(tmp_path / "run")
    monkeypatch.delenv(FAIL_RANK_ENV)
    caplog.set_level("WARNING", logger="difftrain")
    _train(tmp_path / "run")
    assert (tmp_path / "run" / "model_index.json").is_file()
    assert "could not write the run status" in caplog.text


HOLD_LOCK = """
import sys
from pathlib import Path
from difftrain.training.run_dir import acquire_lock
lock = acquire_lock(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()  # until the test closes stdin
"""


def test_training_only_while_the_lock_is_held_and_a_killed_trainer_is_interrupted(tmp_path: Path):
    run = _train(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this checkout's difftrain
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _listed(tmp_path)["run"].status == "training"
        assert run_details(tmp_path, "run")["run"]["status"] == "training"
        assert trainer_holds_lock(run, read_proc_locks()) and trainer_holds_lock(run, None)  # /proc/locks, pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert _listed(tmp_path)["run"].status == "finished"
    assert not trainer_holds_lock(run, read_proc_locks()) and not trainer_holds_lock(run, None)

    # What a killed trainer leaves: its start record, and no lock.
    status = _status(run)
    status["state"] = "training"
    status_path(run).write_text(json.dumps(status))
    assert _listed(tmp_path)["run"].status == "interrupted"


def test_runs_without_a_status_record_are_derived_from_their_files(tmp_path: Path):
    """Runs of an older difftrain (no status.json), and legacy runs (no .difftrain/ at all)."""
    finished = _train(tmp_path / "finished")
    stopped = _train(tmp_path / "stopped", stop_at_step=2)
    status_path(finished).unlink()
    shutil.rmtree(stopped / ".difftrain")  # legacy: recognised by its checkpoints
    listed = _listed(tmp_path)
    assert (listed["finished"].status, listed["stopped"].status) == ("finished", "interrupted")
    assert listed["stopped"].step == 2 and listed["stopped"].started is None and listed["stopped"].max_steps is None

    shutil.rmtree(finished / ".difftrain")
    assert _listed(tmp_path)["finished"].status == "finished"
    _train(finished, "train.max_steps=6", stop_at_step=5)  # resumed for more steps: a checkpoint after the export
    shutil.rmtree(finished / ".difftrain")
    assert (finished / "model_index.json").is_file()
    assert (_listed(tmp_path)["finished"].status, _listed(tmp_path)["finished"].step) == ("interrupted", 5)


def test_skipped_files_are_counted_on_the_run_page(tmp_path: Path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(data / f"ok{i}.png")
    (data / "zero.png").write_bytes(b"")
    (data / "fake.jpg").write_text("not an image\n")

    def run(steps: int) -> dict:
        overrides = [f"data.path={data}", f"train.max_steps={steps}", "sample.num_images=1",
                     "sample.num_inference_steps=1"]
        train(load_config("tiny/folder-uncond", overrides, output_dir=str(tmp_path / "runs" / "f")))
        return run_details(tmp_path / "runs", "f")

    caplog.set_level("WARNING", logger="difftrain")  # train.log then holds the warnings naming each file only
    details = run(2)
    assert "images (2 skipped)" not in (tmp_path / "runs" / "f" / "train.log").read_text()
    assert details["skipped"] == {"count": 2, "path": "f/train.log"}
    assert [s["name"] for s in details["sources"]] == ["export", "checkpoint:step-000002"]
    caplog.set_level("INFO", logger="difftrain")  # and the start-up line with the count (the CLI logs it)
    assert run(4)["skipped"] == {"count": 2, "path": "f/train.log"}
    assert "images (2 skipped)" in (tmp_path / "runs" / "f" / "train.log").read_text()


def test_the_best_export_is_a_source_and_the_runs_best(tmp_path: Path):
    # The eval settings of test_evaluate.py: the reference classifier (a minute to train) is cached per session.
    digits = _train(tmp_path / "digits", "train.eval_every_steps=2", "train.eval_inception=false",
                    "train.eval_num_samples=10", "train.keep_best_by=accuracy")
    best = json.loads((digits / "best" / "best.json").read_text())
    details = run_details(tmp_path, "digits")
    assert details["run"]["best"] == {"metric": "accuracy", "value": best["metrics"]["accuracy"], "step": best["step"]}
    assert details["skipped"]["count"] == 0
    assert [s["name"] for s in details["sources"]] == ["export", "best", "checkpoint:step-000002",
                                                      "checkpoint:step-000004"]
    assert details["sources"][1]["label"].startswith(f"best by accuracy: {best['metrics']['accuracy']:.4g} at step")
