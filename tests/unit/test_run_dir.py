"""Run folders: which ones difftrain may write into, the run record, and the one-trainer lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from difftrain.training.run_dir import (RUN_FORMAT, RunDirError, check_before_claim, check_run_dir, claim_run_dir,
                                        marker_path, read_marker)


def _legacy_run(folder: Path) -> None:
    """What a run made before run records leaves: a checkpoint whose progress.json names the version (as 0.1.0
    wrote it: without the later `numerics`)."""
    checkpoint = folder / "checkpoints" / "step-000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "progress.json").write_text(json.dumps({"step": 4, "images_seen": 32, "epoch": 0.5,
                                                          "num_processes": 1, "difftrain_version": "0.1.0",
                                                          "config": {}}))
    (folder / "config.yaml").write_text("train: {}\n")


def test_missing_and_empty_folders_are_new(tmp_path: Path):
    assert check_run_dir(tmp_path / "missing") == "new"
    (tmp_path / "empty").mkdir()
    assert check_run_dir(tmp_path / "empty") == "new"
    (tmp_path / "bare" / ".difftrain").mkdir(parents=True)  # a start killed before its record was written
    assert check_run_dir(tmp_path / "bare") == "new"


def test_any_other_non_empty_folder_is_refused_whatever_it_holds(tmp_path: Path):
    (tmp_path / "config.yaml").write_text("model: {}\ntrain: {}\n")  # a config.yaml no longer makes a run
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RunDirError, match=r"is not empty \(checkpoints, config.yaml\) and is not a difftrain run"):
        check_run_dir(tmp_path)
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        check_run_dir(file)


def test_legacy_run_is_recognised_and_marked_on_claim(tmp_path: Path):
    _legacy_run(tmp_path)
    assert check_run_dir(tmp_path) == "legacy"
    with claim_run_dir(tmp_path):
        record = read_marker(tmp_path)
    assert record["format"] == RUN_FORMAT and record["migrated_from"] == "0.1.0"
    assert check_run_dir(tmp_path) == "run"


def test_unreadable_or_newer_run_record_is_refused(tmp_path: Path):
    with claim_run_dir(tmp_path):
        pass
    record = json.loads(marker_path(tmp_path).read_text())
    record["format"] = RUN_FORMAT + 1
    marker_path(tmp_path).write_text(json.dumps(record))
    with pytest.raises(RunDirError, match=f"run format {RUN_FORMAT + 1}"):
        check_run_dir(tmp_path)
    marker_path(tmp_path).write_text("{cut sh")
    with pytest.raises(RunDirError, match="could not be read"):
        check_run_dir(tmp_path)


def test_a_second_claim_names_the_holder_and_a_released_lock_is_free(tmp_path: Path):
    with claim_run_dir(tmp_path, "train-vae"):
        for attempt in (lambda: claim_run_dir(tmp_path), lambda: check_before_claim(tmp_path)):
            with pytest.raises(RunDirError, match=f"in use by another difftrain process: difftrain train-vae with "
                                                  f"pid {os.getpid()} on host"):
                attempt()
    check_before_claim(tmp_path)
    claim_run_dir(tmp_path).release()


def test_a_lock_dies_with_its_process(tmp_path: Path):
    """The holder is killed (SIGKILL, no clean-up): the kernel drops its flock and the folder is free again."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from difftrain.training.run_dir import claim_run_dir
        lock = claim_run_dir(Path({str(tmp_path)!r}))
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
            check_before_claim(tmp_path)
        holder.kill()
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    claim_run_dir(tmp_path).release()
