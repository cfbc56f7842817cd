"""The UI's training queue on real tiny runs: trainers one at a time with their console logs, a clean stop
(SIGINT: a checkpoint, exit 130) of a queued trainer and of one started from the command line, and a resume."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import pytest

from difftrain.training.checkpoint import list_checkpoints
from difftrain.ui.launcher import LaunchError, LaunchRequest, TrainingQueue

pytestmark = pytest.mark.integration

SRC = Path(__file__).resolve().parents[2] / "src"
PRESET = "tiny/digits-class"
QUICK = ("train.max_steps=4", "sample.num_inference_steps=1")
# Runs that would take hours: they are stopped, so every checkpoint in them is the stop's own.
ENDLESS = ("train.max_steps=100000", "train.checkpoint_every_steps=100000", "train.sample_every_steps=null",
           "train.log_every_steps=1", "sample.num_inference_steps=1")


def wait_for(condition: Callable[[], object], what: str, timeout: float = 240.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job(queue: TrainingQueue, job_id: str) -> dict:
    return next(j for j in queue.jobs() if j["id"] == job_id)


def ended(queue: TrainingQueue, job_id: str) -> dict | None:
    found = job(queue, job_id)
    return found if found["state"] in ("stopped", "finished", "failed") else None


def _try_submit(queue: TrainingQueue, request: LaunchRequest) -> dict | LaunchError:
    try:
        return queue.submit(request)
    except LaunchError as exc:
        return exc


def metric_rows(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYTHONPATH", str(SRC))  # the trainers run this checkout
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = tmp_path / "runs"
    path.mkdir()
    return path


@pytest.fixture
def queue(runs: Path) -> Iterator[TrainingQueue]:
    q = TrainingQueue(runs, max_running=1, poll_s=0.1)
    try:
        yield q
    finally:
        q.close()
        for j in q.jobs():  # a failed test must not leave its trainers running
            if j["state"] in ("running", "stopping") and j["pid"]:
                try:
                    os.kill(j["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_queued_runs_train_one_at_a_time_into_their_console_logs(runs: Path, queue: TrainingQueue):
    first = queue.submit(LaunchRequest(PRESET, QUICK, "first"))
    # Request handlers run in threads: the same run submitted at once by eight of them is queued once.
    with ThreadPoolExecutor(8) as pool:
        attempts = list(pool.map(lambda _: _try_submit(queue, LaunchRequest(PRESET, QUICK, "second")), range(8)))
    [second] = [a for a in attempts if isinstance(a, dict)]
    assert all("run 'second' is already queued" in str(a) for a in attempts if a is not second)
    third = queue.submit(LaunchRequest(PRESET, QUICK, "third"))
    assert first["state"] == "queued" and first["run"] == "first" and first["overrides"] == list(QUICK)
    assert first["console_log"] == "first/.difftrain/console.log"
    assert first["command"] == f"difftrain train {PRESET} {' '.join(QUICK)} --output-dir {runs.resolve() / 'first'}"
    with pytest.raises(LaunchError, match="run 'second' is already queued"):
        queue.submit(LaunchRequest(PRESET, QUICK, "second"))
    dropped = queue.stop("third")  # still queued behind the others: dropped, never started
    assert dropped["state"] == "stopped" and dropped["pid"] is None
    pid = wait_for(lambda: job(queue, first["id"])["pid"], "the first trainer to start")
    assert os.getsid(pid) == pid != os.getsid(0)  # its own session: the UI's Ctrl-C does not reach it
    assert job(queue, second["id"])["state"] == "queued"

    done = [wait_for(lambda: ended(queue, j["id"]), f"run {j['run']}") for j in (first, second)]
    for j in done:
        assert j["state"] == "finished" and j["returncode"] == 0, (runs / j["console_log"]).read_text()[-3000:]
        log = (runs / j["console_log"]).read_text()
        assert log.startswith("==> ") and f"difftrain ui: {j['command']}\n" in log
        assert f"done: {runs.resolve() / j['run']} (samples in" in log  # the trainer's own stdout ...
        assert "INFO difftrain.training.loop: data: scikit-learn digits" in log  # ... and its stderr
        assert log.rstrip().endswith("the trainer exited with code 0 (finished)")
        assert (runs / j["run"] / "model_index.json").is_file()
    # One at a time: the second trainer took its folder's lock only after the first had written its export.
    first_export = (runs / "first" / "model_index.json").stat().st_mtime
    second_lock = json.loads((runs / "second" / ".difftrain" / "lock").read_text())
    assert datetime.datetime.fromisoformat(second_lock["started"]).timestamp() >= int(first_export)
    assert done[0]["ended"] <= done[1]["started"]
    assert not (runs / "third").exists() and job(queue, third["id"])["state"] == "stopped"
    assert [j["run"] for j in queue.jobs()] == ["first", "second", "third"]


def test_stop_is_a_clean_stop_with_a_checkpoint_and_resume_continues_from_it(runs: Path, queue: TrainingQueue):
    run = runs / "long"
    started = queue.submit(LaunchRequest(PRESET, ENDLESS, "long"))
    wait_for(lambda: metric_rows(run) >= 2, "training steps")
    stopping = queue.stop("long")
    assert stopping["id"] == started["id"] and stopping["state"] == "stopping"
    assert queue.stop("long")["state"] == "stopping"  # a second click sends no second signal (that stops at once)
    stopped = wait_for(lambda: ended(queue, started["id"]), "the stop", timeout=120)
    log = (runs / stopped["console_log"]).read_text()
    assert stopped["state"] == "stopped" and stopped["returncode"] == 130, log[-3000:]
    assert "received SIGINT: finishing the current step, then a checkpoint and a clean stop" in log
    [(step, checkpoint)] = list_checkpoints(run / "checkpoints")  # the stop's own: none was due before it
    assert step >= 2 and not (run / "model_index.json").exists()

    resumed = queue.resume("long", overrides=(f"train.max_steps={step + 2}",))
    assert resumed["config"] == "long/config.yaml" and resumed["state"] == "queued"
    assert resumed["command"].startswith(f"difftrain train {run.resolve() / 'config.yaml'} train.max_steps=")
    with pytest.raises(LaunchError, match="run 'long' is already"):
        queue.resume("long")
    finished = wait_for(lambda: ended(queue, resumed["id"]), "the resumed run")
    log = (runs / finished["console_log"]).read_text()
    assert finished["state"] == "finished", log[-3000:]
    assert f"resumed from {checkpoint} (step {step})" in log
    # The saved config resumes as it was trained: the one change the resume check reports is the one asked for.
    changes = [line.split("config change on resume: ")[1] for line in log.splitlines() if "config change on resume" in line]
    assert changes == [f"train.max_steps: 100000 -> {step + 2}"]
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, step + 3)) and (run / "model_index.json").is_file()


def test_a_command_line_run_is_stopped_through_its_lock(runs: Path, queue: TrainingQueue, tmp_path: Path):
    run = runs / "cli"
    command = [sys.executable, "-m", "difftrain", "train", PRESET, "--output-dir", str(run), *ENDLESS]
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_for(lambda: metric_rows(run) >= 1, "training steps")
        stopping = queue.stop("cli")
        assert stopping["state"] == "stopping" and stopping["pid"] == proc.pid
        assert stopping["config"] is None and "difftrain train tiny/digits-class --output-dir" in stopping["command"]
        assert queue.stop("cli")["id"] == stopping["id"]  # no second signal
        assert proc.wait(timeout=120) == 130, (tmp_path / "stderr.txt").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(list_checkpoints(run / "checkpoints")) == 1
    assert wait_for(lambda: ended(queue, stopping["id"]), "the queue to see it end", timeout=30)["state"] == "stopped"
    with pytest.raises(ValueError, match="run 'cli' is not training"):
        queue.stop("cli")
