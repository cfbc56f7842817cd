"""The UI's training queue: `difftrain train` subprocesses, started one (or `max_running`) at a time.

Each trainer is `python -m difftrain train CONFIG OVERRIDES --output-dir RUNS_DIR/NAME`, started from an
argument list in its own session: it outlives the UI, and a Ctrl-C in the UI's terminal does not reach it.
Its stdout and stderr are appended to `RUN/.difftrain/console.log` (a folder holding only `.difftrain/` is
still a new run folder for the trainer). Stop is SIGINT, the trainer's clean stop (training/stop.py: the
step under way finishes, a checkpoint is written, exit code 130), so the same command resumes it.

Jobs live in memory: a UI started later sees the trainers of an earlier one as runs training from the
command line, which it can stop through their lock file (trainers.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

from difftrain.training.run_dir import LOCK_FILE, MARKER_DIR, check_run_dir
from difftrain.ui.launch_request import (
    LaunchError,
    LaunchPlan,
    LaunchRequest,
    plan_launch,
    preset_list,
    resolve_runs_dir,
    run_folder,
    validate,
)
from difftrain.ui.trainers import find_trainer, flock_holders, is_alive, process_start_time

__all__ = ["LaunchError", "LaunchRequest", "TrainingQueue", "preset_list", "validate"]

CONSOLE_LOG = Path(".difftrain") / "console.log"
ACTIVE = ("queued", "running", "stopping")
# A clean stop ends with 128 + the signal (cli.main); a signal before Python's handlers exist ends with -signal.
STOP_CODES = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}


def final_state(returncode: int) -> str:
    """finished (0), stopped (a clean stop on SIGINT/SIGTERM) or failed (anything else)."""
    if returncode == 0:
        return "finished"
    return "stopped" if returncode in STOP_CODES else "failed"


@dataclasses.dataclass
class _Job:
    id: str
    run: str
    output_dir: Path
    config: Optional[str]
    overrides: tuple[str, ...]
    command: str
    plan: Optional[LaunchPlan]  # None: a trainer this queue did not start
    resume: bool = False  # queued by `resume` (a run id, nested ids allowed)
    state: str = "queued"
    pid: Optional[int] = None
    start_time: Optional[int] = None  # of an external trainer, to tell it from a reused pid
    returncode: Optional[int] = None
    error: Optional[str] = None
    submitted: float = dataclasses.field(default_factory=time.time)
    started: Optional[float] = None
    ended: Optional[float] = None
    process: Optional[subprocess.Popen] = None
    stop_pending: bool = False  # stop asked before the trainer could take it cleanly: sent once it can

    def to_json(self, runs_dir: Path) -> dict[str, Any]:
        log = self.output_dir / CONSOLE_LOG
        console = log.relative_to(runs_dir).as_posix() if self.plan is not None or log.is_file() else None
        return {"id": self.id, "run": self.run, "config": self.config, "overrides": list(self.overrides),
                "state": self.state, "pid": self.pid, "returncode": self.returncode, "command": self.command,
                "console_log": console, "error": self.error, "submitted": self.submitted,
                "started": self.started, "ended": self.ended}


class TrainingQueue:
    """Training jobs under `runs_dir`, at most `max_running` trainers of its own at once; thread-safe."""

    def __init__(self, runs_dir: Path | str, max_running: int = 1, poll_s: float = 0.5):
        if max_running < 1:
            raise ValueError(f"max_running = {max_running}: expected 1 or more")
        self.runs_dir = resolve_runs_dir(runs_dir)
        self.max_running = max_running
        self.poll_s = poll_s
        self._cond = threading.Condition()
        self._jobs: dict[str, _Job] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._schedule, name="difftrain-ui-training-queue", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------------
    # The API's calls

    def validate(self, request: LaunchRequest) -> list[str]:
        """`validate(runs_dir, request)` plus a run this queue already holds."""
        plan, problems = plan_launch(self.runs_dir, request)
        if plan is not None:
            with self._cond:
                problems = self._busy_problems(plan.output_dir, plan.run_id)
        return problems

    def submit(self, request: LaunchRequest) -> dict[str, Any]:
        """Queue a new run (or the resume of an existing one); LaunchError lists why it cannot."""
        return self._submit(request, resume=False)

    def jobs(self) -> list[dict[str, Any]]:
        """Every job of this queue, oldest first (TrainingJob of docs/ui.md, with times and an error line)."""
        with self._cond:
            return [job.to_json(self.runs_dir) for job in self._jobs.values()]

    def stop(self, run_id: str) -> dict[str, Any]:
        """Stop the run's queued job (dropped) or trainer (SIGINT: a clean stop with a checkpoint).

        A run training from the command line is stopped through its lock file's pid once proven to be
        `difftrain train` on that folder (trainers.find_trainer). ValueError: nothing to stop, or not allowed.
        """
        folder = run_folder(self.runs_dir, run_id)
        with self._cond:  # held throughout, so two requests never send two signals (a second one stops at once)
            job = self._active_job(folder)
            if job is not None:
                if job.state == "queued":
                    job.state, job.ended = "stopped", time.time()
                elif job.state == "running":
                    job.state, job.stop_pending = "stopping", True
                    self._send_pending_stop_locked(job)
                self._cond.notify_all()
                return job.to_json(self.runs_dir)
            if not folder.is_dir():
                raise FileNotFoundError(f"no run {run_id!r} under RUNS_DIR ({folder})")
            trainer = find_trainer(folder, run_id)
            try:
                os.kill(trainer.pid, signal.SIGINT)
            except ProcessLookupError:
                raise ValueError(f"run {run_id!r}: its trainer (pid {trainer.pid}) has just ended") from None
            except PermissionError:
                raise ValueError(f"run {run_id!r}: not allowed to signal its trainer (pid {trainer.pid}, "
                                 "another user's process)") from None
            job = _Job(id=_new_id(), run=run_id, output_dir=folder, config=None, overrides=(), command=trainer.command,
                       plan=None, state="stopping", pid=trainer.pid, start_time=trainer.start_time)
            self._jobs[job.id] = job
            return job.to_json(self.runs_dir)

    def resume(self, run_id: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
        """Queue the run again with the command that resumes it: its own `config.yaml` (the resolved config it
        last trained with, so the resume check sees no change) and `--output-dir`, plus `overrides` (e.g. a
        higher train.max_steps). Without a config.yaml (a run stopped before its first step) the original
        config and overrides are used when known. LaunchError says why not."""
        folder = run_folder(self.runs_dir, run_id)
        if check_run_dir(folder) == "new":
            raise FileNotFoundError(f"no difftrain run {run_id!r} under RUNS_DIR ({folder})")
        if (folder / "config.yaml").is_file():
            config = (folder / "config.yaml").relative_to(self.runs_dir).as_posix()
            request = LaunchRequest(config=config, overrides=tuple(overrides), name=run_id)
        else:
            original = self._original_request(folder)
            if original is None:
                raise LaunchError([f"run {run_id!r} has no config.yaml and no recorded config to resume with; "
                                   "launch it again with its config"])
            request = LaunchRequest(config=original[0], overrides=(*original[1], *overrides), name=run_id)
        return self._submit(request, resume=True)

    def close(self) -> None:
        """Drop queued jobs and stop the scheduler; trainers already running keep running."""
        with self._cond:
            self._closed = True
            for job in self._jobs.values():
                if job.state == "queued":
                    job.state, job.ended = "stopped", time.time()
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __enter__(self) -> "TrainingQueue":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------
    # Internals; every method named *_locked runs with self._cond held

    def _submit(self, request: LaunchRequest, resume: bool) -> dict[str, Any]:
        plan, problems = plan_launch(self.runs_dir, request, resume=resume)  # file reads: outside the lock
        if plan is None:
            raise LaunchError(problems)
        with self._cond:
            if self._closed:
                raise RuntimeError("the training queue is closed")
            busy = self._busy_problems(plan.output_dir, plan.run_id)
            if busy:
                raise LaunchError(busy)
            job = _Job(id=_new_id(), run=plan.run_id, output_dir=plan.output_dir, config=plan.config,
                       overrides=plan.overrides, command=plan.command(), plan=plan, resume=resume)
            self._jobs[job.id] = job
            self._cond.notify_all()
            return job.to_json(self.runs_dir)

    def _busy_problems(self, output_dir: Path, run_id: str) -> list[str]:
        job = self._active_job(output_dir)
        if job is None:
            return []
        what = "queued" if job.state == "queued" else "training"
        return [f"run {run_id!r} is already {what} (job {job.id}); stop it first, or choose another name"]

    def _active_job(self, output_dir: Path) -> Optional[_Job]:
        return next((job for job in self._jobs.values() if job.output_dir == output_dir and job.state in ACTIVE),
                    None)

    def _original_request(self, folder: Path) -> Optional[tuple[str, tuple[str, ...]]]:
        """The config and overrides a run was launched with: this queue's last job on it, else the ones its
        `.difftrain/status.json` records (keys `config`, `overrides`), if any."""
        with self._cond:
            for job in reversed(list(self._jobs.values())):
                if job.output_dir == folder and job.config is not None:
                    return job.config, job.overrides
        try:
            status = json.loads((folder / ".difftrain" / "status.json").read_text())
        except (OSError, ValueError):
            return None
        if isinstance(status, dict) and isinstance(status.get("config"), str):
            overrides = status.get("overrides") or []
            if isinstance(overrides, list) and all(isinstance(o, str) for o in overrides):
                return status["config"], tuple(overrides)
        return None

    def _schedule(self) -> None:
        with self._cond:
            while not self._closed:
                self._reap_locked()
                running = sum(1 for job in self._jobs.values() if job.plan is not None
                              and job.state in ("running", "stopping"))
                for job in list(self._jobs.values()):
                    if running >= self.max_running:
                        break
                    if job.state == "queued":
                        self._start_locked(job)
                        running += job.state == "running"
                self._cond.wait(self.poll_s)

    def _send_pending_stop_locked(self, job: _Job) -> None:
        """SIGINT once the trainer holds its run folder's lock. A signal that arrives while the new Python process
        is still starting (before difftrain's CLI runs) kills it with exit code 1 ("Fatal Python error:
        init_sys_streams"), which would read as failed; from the lock on, SIGINT is the clean stop (or exit 130
        before the trainer's own handler). Where /proc/locks cannot be read it is sent at once."""
        holders = flock_holders(job.output_dir / MARKER_DIR / LOCK_FILE)
        if holders is None or holders:
            job.process.send_signal(signal.SIGINT)
            job.stop_pending = False

    def _reap_locked(self) -> None:
        for job in self._jobs.values():
            if job.state not in ("running", "stopping"):
                continue
            if job.process is not None:
                code = job.process.poll()
                if code is None:
                    if job.stop_pending:
                        self._send_pending_stop_locked(job)
                    continue
                job.returncode, job.ended, job.state = code, time.time(), final_state(code)
                _append(job.output_dir / CONSOLE_LOG, f"==> {_now()} difftrain ui: the trainer exited with "
                        f"code {code} ({job.state})\n")
            elif job.start_time is not None and not is_alive(job.pid, job.start_time):
                job.ended, job.state = time.time(), "stopped"  # not our child: its exit code is not ours to read

    def _start_locked(self, job: _Job) -> None:
        # Checked again: a queued job may wait long, and its config or folder may have changed meanwhile
        # (a config symlink now leading out, a command-line run now training in the folder).
        request = LaunchRequest(job.plan.config, job.plan.overrides, job.run)
        try:
            plan, problems = plan_launch(self.runs_dir, request, resume=job.resume)
        except Exception as exc:  # noqa: BLE001 - one job's surprise must not end the scheduler thread
            plan, problems = None, [f"{type(exc).__name__}: {exc}"]
        if plan is None:
            job.state, job.ended, job.error = "failed", time.time(), "\n".join(problems)
            return
        log = plan.output_dir / CONSOLE_LOG
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log follows the run live
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as out:
                out.write(f"==> {_now()} difftrain ui: {plan.command()}\n".encode())
                out.flush()
                job.process = subprocess.Popen(plan.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as exc:
            job.state, job.ended, job.error = "failed", time.time(), f"could not start the trainer: {exc}"
            return
        job.plan, job.command = plan, plan.command()
        job.state, job.pid, job.started = "running", job.process.pid, time.time()
        job.start_time = process_start_time(job.pid)


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _append(path: Path, text: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as out:
            out.write(text)
    except OSError:
        pass  # the log is for reading along; a full disk must not stop the queue
