"""The UI's launch checks (difftrain.ui.launch_request, trainers, launcher): refusals that keep a launch under
RUNS_DIR, the CLI's own lines for config and folder errors, and the checks before a trainer is signalled."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from difftrain.training.run_dir import acquire_lock, check_run_dir
from difftrain.ui import launcher
from difftrain.ui.launch_request import LaunchError, LaunchRequest, plan_launch, shipped_presets, validate
from difftrain.ui.trainers import (
    find_trainer,
    holds_flock,
    is_alive,
    lock_held,
    process_start_time,
    train_invocation,
)

SRC = Path(__file__).resolve().parents[2] / "src"


def cli_stderr(*args: str) -> list[str]:
    """The stderr lines of the real `python -m difftrain ...` (run in this process's working folder, as the UI's
    trainers are), which must exit on a user error before training."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "difftrain", *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode in (1, 2), proc.stderr
    return proc.stderr.splitlines()


def request(config: str = "tiny/digits-class", overrides: tuple = (), name: str = "run1") -> LaunchRequest:
    return LaunchRequest(config=config, overrides=overrides, name=name)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


def test_from_json_takes_the_contract_fields_and_names_bad_ones():
    got = LaunchRequest.from_json({"config": "digits", "overrides": ["train.max_steps=5"], "name": "a"})
    assert got == LaunchRequest("digits", ("train.max_steps=5",), "a")
    assert LaunchRequest.from_json({"config": "digits", "name": "a", "overrides": None}).overrides == ()
    with pytest.raises(ValueError, match="'name'"):
        LaunchRequest.from_json({"config": "digits"})
    with pytest.raises(ValueError, match="'overrides'.*list"):
        LaunchRequest.from_json({"config": "digits", "name": "a", "overrides": "train.max_steps=5"})
    with pytest.raises(ValueError, match="unknown field 'shell'"):
        LaunchRequest.from_json({"config": "digits", "name": "a", "shell": "rm -rf /"})


def test_a_valid_request_has_no_problems_and_the_argument_list_of_difftrain_train(runs: Path):
    assert validate(runs, request(overrides=("train.max_steps=4",))) == []
    plan, problems = plan_launch(runs.resolve(), request(overrides=("train.max_steps=4",)))
    assert problems == [] and plan.run_id == "run1"
    assert plan.argv() == [sys.executable, "-m", "difftrain", "train", "tiny/digits-class", "train.max_steps=4",
                           "--output-dir", str(runs.resolve() / "run1")]
    assert not (runs / "run1").exists()  # validation writes nothing


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "/tmp/abs", ".", "..", "", "a b", "a\\b"])
def test_run_names_that_are_not_one_plain_folder_are_refused(runs: Path, name: str):
    problems = validate(runs, request(name=name))
    assert len(problems) == 1 and problems[0].startswith(f"run name {name!r} refused"), problems
    assert sorted(p.name for p in runs.parent.iterdir()) == ["runs"] and not any(runs.iterdir())


def test_a_name_that_is_a_symlink_is_refused(runs: Path, tmp_path: Path):
    (tmp_path / "elsewhere").mkdir()
    (runs / "link").symlink_to(tmp_path / "elsewhere")
    assert "is a symbolic link" in validate(runs, request(name="link"))[0]


def test_config_files_outside_runs_dir_are_refused(runs: Path, tmp_path: Path):
    outside = tmp_path / "outside.yaml"
    outside.write_text((Path(__file__).resolve().parents[2] / "configs" / "tiny" / "digits-class.yaml").read_text())
    (runs / "sub").mkdir()
    (runs / "sub" / "link.yaml").symlink_to(outside)
    for config in (str(outside), "../outside.yaml", "sub/link.yaml", "sub/../../outside.yaml"):
        problems = validate(runs, request(config=config))
        assert len(problems) == 1, problems
        assert problems[0].startswith(f"config {config!r} refused: it resolves to {outside}, outside RUNS_DIR")
    # The same file inside RUNS_DIR, and a link that stays inside, are accepted; the trainer gets the real path.
    inside = runs / "sub" / "inside.yaml"
    inside.write_text(outside.read_text())
    (runs / "in-link.yml").symlink_to(inside)
    assert validate(runs, request(config="sub/inside.yaml")) == []
    plan, _ = plan_launch(runs.resolve(), request(config="in-link.yml"))
    assert plan.config_argument == str(inside.resolve()) and plan.config == "in-link.yml"


def test_names_that_are_not_shipped_presets_are_refused(runs: Path):
    for config in ("accelerate/ddp", "../configs/digits", "/etc/passwd", "--help", "-x.yaml"):
        problems = validate(runs, request(config=config))
        assert len(problems) == 1 and problems[0].startswith(f"config {config!r} refused"), (config, problems)
    assert "tiny/digits-class" in shipped_presets() and "digits" in shipped_presets()
    assert not any(name.startswith("accelerate/") for name in shipped_presets())
    names = [p["name"] for p in launcher.preset_list()]
    assert names == shipped_presets() and all(p["description"] for p in launcher.preset_list())


def test_overrides_that_would_be_options_are_refused(runs: Path):
    for word in ("--output-dir=/etc", "--num-processes=4", "-x"):
        problems = validate(runs, request(overrides=("train.max_steps=4", word)))
        assert problems == [f"override {word!r} refused: overrides are key=value words, not command-line options"]


@pytest.mark.parametrize("config, overrides", [
    ("digitz", ()),  # an unknown preset: the CLI's line lists the presets
    ("tiny/digits-class", ("foo", "bar")),  # malformed: the CLI's own check before loading anything
    ("tiny/digits-class", ("train.max_steps=abc",)),  # a wrong type
    ("tiny/digits-class", ("train.max_stepz=4", "data.resolution=7")),  # unknown key and a bad value
    ("missing.yaml", ()),  # a config file under RUNS_DIR that is not there
])
def test_config_problems_are_the_lines_the_cli_prints(runs: Path, config: str, overrides: tuple):
    problems = validate(runs, request(config=config, overrides=overrides))
    config_arg = str(runs.resolve() / config) if config.endswith(".yaml") else config
    assert problems and problems == cli_stderr("train", config_arg, *overrides, "--output-dir",
                                               str(runs.resolve() / "run1"))


def test_a_folder_that_is_not_a_run_or_is_in_use_gives_the_cli_lines(runs: Path):
    (runs / "notes").mkdir()
    (runs / "notes" / "todo.txt").write_text("mine")
    problems = validate(runs, request(name="notes"))
    assert problems == cli_stderr("train", "tiny/digits-class", "--output-dir", str(runs.resolve() / "notes"))
    assert "is not a difftrain run" in problems[0]

    busy = runs / "busy"
    with acquire_lock(busy):  # as a trainer holds it
        problems = validate(runs, request(name="busy"))
        assert problems == cli_stderr("train", "tiny/digits-class", "--output-dir", str(busy.resolve()))
        assert "is in use by another difftrain process" in problems[0]


def test_a_new_folder_holding_only_the_console_log_is_still_new(runs: Path):
    log = runs / "fresh" / ".difftrain" / "console.log"
    log.parent.mkdir(parents=True)
    log.write_text("==> a start that failed before the run folder was claimed\n")
    assert check_run_dir(runs / "fresh") == "new"
    assert validate(runs, request(name="fresh")) == []


def test_exit_codes_map_to_job_states():
    assert launcher.final_state(0) == "finished"
    assert launcher.final_state(130) == launcher.final_state(143) == "stopped"
    assert launcher.final_state(-signal.SIGINT) == "stopped"
    for code in (1, 2, -signal.SIGKILL, 137):
        assert launcher.final_state(code) == "failed"


def test_train_invocation_reads_the_command_lines_difftrain_runs_under(tmp_path: Path):
    out = tmp_path / "run"
    forms = [
        ["/usr/bin/python3", "-m", "difftrain", "train", "digits", "--output-dir", str(out)],
        ["/venv/bin/python", "/venv/bin/difftrain", "--debug", "train", "digits", f"--output-dir={out}"],
        ["/venv/bin/python", "-u", "/src/difftrain/__main__.py", "train", "x.yaml", "--output-dir", "run"],
    ]
    for argv in forms:
        got = train_invocation(argv, cwd=tmp_path)
        assert got is not None and got.output_dir == out.resolve() and not got.launcher, argv
    launch = train_invocation(["difftrain", "train", "digits", "--num-processes", "2", "--output-dir", "run"], tmp_path)
    assert launch.launcher and launch.output_dir == out.resolve()
    assert train_invocation(["difftrain", "train", "digits", "--output-dir", "run"], cwd=None).output_dir is None
    assert train_invocation(["difftrain", "train", "digits"], tmp_path).output_dir is None
    not_train = (["difftrain", "sample", str(out)], ["python", "-m", "pytest", "difftrain", "train"], ["bash"],
                 ["python3", "-c", "difftrain train", "difftrain", "train"], ["vim", "difftrain", "train"],
                 ["python3", "-m", "difftrain.other", "train"], [])
    for argv in not_train:
        assert train_invocation(argv, tmp_path) is None, argv


def test_a_lock_holder_that_is_not_difftrain_train_is_never_signalled(tmp_path: Path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="is not training"):
        find_trainer(run, "run")
    with acquire_lock(run) as lock:  # held by this test process: pytest, not `difftrain train`
        assert holds_flock(os.getpid(), lock.path)
        with pytest.raises(ValueError, match=f"pid {os.getpid()}, which is not a `difftrain train` process"):
            find_trainer(run, "run")
        info = json.loads(lock.path.read_text())
        lock.path.write_text(json.dumps({**info, "host": "another-host"}))
        with pytest.raises(ValueError, match="on host 'another-host'; only a trainer on this host"):
            find_trainer(run, "run")
        lock.path.write_text(json.dumps({**info, "host": socket.gethostname(), "pid": None}))
        with pytest.raises(ValueError, match="names no process id"):
            find_trainer(run, "run")
    assert not holds_flock(os.getpid(), run / ".difftrain" / "lock")


def test_process_identity_survives_pid_reuse_checks():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = process_start_time(child.pid)
        assert start is not None and is_alive(child.pid, start)
        assert not is_alive(child.pid, start + 1)  # the same pid, started at another time: another process
    finally:
        child.kill()
        child.wait()
    assert not is_alive(child.pid, start)


def test_queue_refuses_what_it_cannot_do_without_starting_anything(runs: Path):
    with launcher.TrainingQueue(runs) as queue:
        with pytest.raises(LaunchError) as refused:
            queue.submit(request(name="../x"))
        assert refused.value.problems == validate(runs, request(name="../x"))
        with pytest.raises(FileNotFoundError, match="no run 'nothing'"):
            queue.stop("nothing")
        (runs / "empty").mkdir()
        with pytest.raises(ValueError, match="run 'empty' is not training"):
            queue.stop("empty")
        for bad in ("../x", "/etc", "a/../../x"):
            with pytest.raises(ValueError, match=f"run id '{bad}' refused"):
                queue.stop(bad)
            with pytest.raises(ValueError, match=f"run id '{bad}' refused"):
                queue.resume(bad)
        for missing in ("nothing", "empty"):
            with pytest.raises(FileNotFoundError, match=f"no difftrain run '{missing}'"):
                queue.resume(missing)
        assert queue.jobs() == []
    with pytest.raises(ValueError, match="max_running = 0"):
        launcher.TrainingQueue(runs, max_running=0)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        launcher.TrainingQueue(runs / "missing")


# A stand-in for `difftrain train` (named `difftrain`, so its command line reads as one): it holds the folder's
# lock as the trainer does, and on SIGINT writes who received it. With --num-processes it is the launcher and
# starts "rank 0" (itself without the option) as its child, which takes the lock, as torchrun's ranks do.
FAKE_TRAINER = '''
import os, signal, subprocess, sys, time
from pathlib import Path
from difftrain.training.run_dir import acquire_lock

args = sys.argv[1:]
role = "launcher" if "--num-processes" in args else "trainer"
child = None
def on_sigint(signum, frame):
    with open(os.environ["SIGNALLED"], "a") as out:
        out.write(role + "\\n")
    if child is None:
        sys.exit(130)
    child.send_signal(signal.SIGINT)  # the launcher's wait below returns the rank's exit code
signal.signal(signal.SIGINT, on_sigint)
if role == "launcher":
    i = args.index("--num-processes")
    child = subprocess.Popen([sys.executable, __file__, *args[:i], *args[i + 2:]])
    sys.exit(child.wait())
folder = os.environ.get("LOCK_DIR") or args[args.index("--output-dir") + 1]
lock = acquire_lock(Path(folder))
while True:
    time.sleep(0.05)
'''


@pytest.fixture
def fake_trainer(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    script = tmp_path / "bin" / "difftrain"
    script.parent.mkdir()
    script.write_text(FAKE_TRAINER)
    started: list[subprocess.Popen] = []

    def start(*args: str, lock_dir: Path | None = None) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(SRC), "SIGNALLED": str(tmp_path / "signalled.txt")}
        if lock_dir is not None:
            env["LOCK_DIR"] = str(lock_dir)
        proc = subprocess.Popen([sys.executable, str(script), "train", "digits", *args], env=env, cwd=tmp_path,
                                start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the fake launcher and its rank
            proc.wait()


def _wait_locked(folder: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not lock_held(folder):
        assert proc.poll() is None and time.monotonic() < deadline, "the stand-in trainer did not take the lock"
        time.sleep(0.05)


def test_the_trainer_signalled_is_the_lock_holder_or_its_launcher(runs: Path, tmp_path: Path, fake_trainer):
    signalled = tmp_path / "signalled.txt"
    single = fake_trainer("--output-dir", "runs/one")  # relative to the trainer's own working folder
    _wait_locked(runs / "one", single)
    assert find_trainer(runs / "one", "one").pid == single.pid

    launched = fake_trainer("--num-processes", "2", "--output-dir", str(runs / "two"))
    _wait_locked(runs / "two", launched)
    found = find_trainer(runs / "two", "two")
    assert found.pid == launched.pid and "--num-processes 2" in found.command  # not rank 0, which holds the lock

    with launcher.TrainingQueue(runs) as queue:
        job = queue.stop("two")
        assert job["pid"] == launched.pid and job["state"] == "stopping" and job["console_log"] is None
        assert launched.wait(timeout=30) == 130
        assert signalled.read_text().split() == ["launcher", "trainer"]  # the launcher passed it on, once
        deadline = time.monotonic() + 10
        while next(j for j in queue.jobs() if j["id"] == job["id"])["state"] != "stopped":
            assert time.monotonic() < deadline, "the queue did not see the stopped trainer end"
            time.sleep(0.05)


def test_a_difftrain_train_on_another_folder_is_not_signalled(runs: Path, tmp_path: Path, fake_trainer):
    other = fake_trainer("--output-dir", str(runs / "other"), lock_dir=runs / "mine")
    _wait_locked(runs / "mine", other)
    with pytest.raises(ValueError, match=f"pid {other.pid} is a `difftrain train` on another folder"):
        find_trainer(runs / "mine", "mine")
    # Without --output-dir the folder comes from its config: holding this folder's lock is the proof.
    config_only = fake_trainer(lock_dir=runs / "from-config")
    _wait_locked(runs / "from-config", config_only)
    assert find_trainer(runs / "from-config", "from-config").pid == config_only.pid
    assert not (tmp_path / "signalled.txt").exists() and other.poll() is None


def test_resume_without_config_yaml_uses_the_recorded_config_under_the_same_rules(runs: Path, tmp_path: Path):
    from difftrain.training.run_dir import write_marker

    run = runs / "early"  # a run stopped before its first step: marked, but no config.yaml yet
    write_marker(run)
    with launcher.TrainingQueue(runs) as queue:
        with pytest.raises(LaunchError, match="run 'early' has no config.yaml and no recorded config"):
            queue.resume("early")
        # The recorded config passes the launch rules like any other: one outside RUNS_DIR is refused, naming it.
        outside = tmp_path / "outside.yaml"
        (run / ".difftrain" / "status.json").write_text(json.dumps(
            {"status": "interrupted", "config": str(outside), "overrides": ["train.max_steps=3"]}))
        with pytest.raises(LaunchError, match=f"config '{outside}' refused: it resolves to {outside}, outside"):
            queue.resume("early")
        assert queue.jobs() == []


# Stands in for a trainer: SIGINT before it holds the run folder's lock fails it (as a signal during the new
# interpreter's start does, exit 1); after, it is the clean stop (130).
_STARTING_TRAINER = """
import fcntl, os, signal, sys, time
signal.signal(signal.SIGINT, lambda *_: os._exit(1))
time.sleep(1.5)
lock = open(sys.argv[1], "a")
fcntl.flock(lock, fcntl.LOCK_EX)
signal.signal(signal.SIGINT, lambda *_: os._exit(130))
time.sleep(60)
"""


def test_a_stop_asked_while_the_trainer_starts_is_sent_once_it_holds_its_lock(runs: Path):
    folder = runs / "starting"
    lock_path = folder / ".difftrain" / "lock"
    assert lock_path.name == launcher.LOCK_FILE and lock_path.parent.name == launcher.MARKER_DIR
    lock_path.parent.mkdir(parents=True)
    with launcher.TrainingQueue(runs, poll_s=0.05) as queue:
        process = subprocess.Popen([sys.executable, "-c", _STARTING_TRAINER, str(lock_path)])
        job = launcher._Job(id="j1", run="starting", output_dir=folder.resolve(), config=None, overrides=(),
                            command="stand-in", plan=None, state="running", pid=process.pid, process=process)
        with queue._cond:
            queue._jobs[job.id] = job
        assert queue.stop("starting")["state"] == "stopping"
        deadline = time.monotonic() + 30
        while job.state == "stopping" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (job.state, job.returncode) == ("stopped", 130)
