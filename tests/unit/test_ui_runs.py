"""Which folders are runs, run ids that would leave RUNS_DIR, broken folders, the run page's details and the
runs list's cache, on copies of one real tiny run."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from difftrain.config import load_config
from difftrain.training.loop import train
from difftrain.training.run_files import MetricsLog
from difftrain.training.status import status_path
from difftrain.ui.runs import RunsCache, find_runs, resolve_run, run_details

OVERRIDES = ["train.sample_every_steps=2", "sample.num_inference_steps=1", "sample.images_per_class=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run (4 steps, grids at steps 2 and 4, checkpoints 2 and 4)."""
    run = tmp_path_factory.mktemp("real") / "run"
    return train(load_config("tiny/digits-class", OVERRIDES, output_dir=str(run)), config_source="tiny/digits-class",
                 overrides=OVERRIDES)


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _ids(runs_dir: Path, cache: RunsCache | None = None) -> dict:
    return {info.id: info for info in find_runs(runs_dir, cache or RunsCache())}


def test_run_ids_cannot_leave_runs_dir(finished: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    _copy(finished, runs / "group" / "run")
    (runs / "escape").symlink_to(finished)  # a run, but outside RUNS_DIR
    (runs / "inside").symlink_to(runs / "group" / "run")
    for bad in ("..", "../real/run", "group/../../real", str(finished), "/etc", "group\\run", "", "run\x00",
                "escape", "escape/"):
        with pytest.raises(ValueError, match="run id"):
            resolve_run(runs, bad)
        with pytest.raises(ValueError, match="run id"):
            run_details(runs, bad)
    for unknown in ("nope", "group", "group/run/checkpoints", "group/run/samples"):
        with pytest.raises(FileNotFoundError, match=f"run id {unknown!r}: no run under"):
            resolve_run(runs, unknown)
    assert resolve_run(runs, "group/run") == runs.resolve() / "group" / "run"
    assert resolve_run(runs, "inside").resolve() == (runs / "group" / "run").resolve()
    assert resolve_run(runs / "group" / "run", ".") == (runs / "group" / "run").resolve()


def test_runs_are_found_up_to_three_levels_below_runs_dir(finished: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    for where in ("a", "x/b", "x/y/c", "x/y/z/too-deep", ".hidden/d", "samples/e", "x/checkpoints/f"):
        _copy(finished, runs / where)
    legacy = _copy(finished, runs / "x" / "legacy")
    shutil.rmtree(legacy / ".difftrain")
    (runs / "x" / "not-a-run").mkdir()
    (runs / "x" / "not-a-run" / "config.yaml").write_text((finished / "config.yaml").read_text())
    (runs / "out").symlink_to(finished.parent)  # a folder of runs outside RUNS_DIR: not listed
    assert list(_ids(runs)) == ["a", "x/b", "x/legacy", "x/y/c"]
    assert list(_ids(runs / "a")) == ["."] and _ids(runs / "a")["."].name == "a"
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        find_runs(tmp_path / "missing")


def test_one_broken_folder_is_one_broken_row(finished: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    good = _copy(finished, runs / "good")
    broken = {name: _copy(finished, runs / name) for name in ("record", "format", "status", "config", "metrics")}
    (broken["record"] / ".difftrain" / "run.json").write_text('{"format": 1, "config": ')
    record = json.loads((good / ".difftrain" / "run.json").read_text())
    (broken["format"] / ".difftrain" / "run.json").write_text(json.dumps({**record, "format": "1"}))
    status_path(broken["status"]).write_text(json.dumps({"state": "done"}))
    (broken["config"] / "config.yaml").write_text("train: [unclosed\n")
    (broken["metrics"] / "metrics.jsonl").unlink()
    (broken["metrics"] / "metrics.jsonl").mkdir()  # nothing difftrain writes: read errors are reported, not raised
    listed = _ids(runs)
    assert listed["good"].status == "finished" and listed["good"].error is None
    reasons = {name: listed[name].error for name in broken if listed[name].status == "broken"}
    assert reasons.keys() == broken.keys()
    assert reasons["record"].startswith(".difftrain/run.json could not be read")
    assert reasons["format"] == ".difftrain/run.json is not a difftrain run record (no integer 'format')"
    assert reasons["status"].startswith(".difftrain/status.json has no state among training, finished")
    assert reasons["config"].startswith("config.yaml is not valid YAML")
    assert reasons["metrics"].startswith("IsADirectoryError")
    assert run_details(runs, "config")["run"]["status"] == "broken"


def test_the_run_page(finished: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    run = _copy(finished, runs / "group" / "run")
    shutil.copy(run / "samples" / "step-000002.png", run / "samples" / "step-1000000.png")  # 7 digits sort last
    (run / "samples" / "sample.png").write_bytes(b"")  # `difftrain sample`'s grid is not a training grid
    (run / "evaluation.json").write_text(json.dumps({"fid": 12.5, "num_samples": 10}))
    (run / "evaluation-test.json").write_text("{not json")
    (run / ".difftrain" / "console.log").write_text("train: 100%\n")
    details = run_details(runs, "group/run")
    assert details["run"] == _ids(runs)["group/run"].to_json()
    assert details["config_yaml"] == (run / "config.yaml").read_text()
    assert details["model_card"] == (run / "README.md").read_text()
    assert [g["step"] for g in details["grids"]] == [2, 4, 1_000_000]
    assert details["grids"][0]["path"] == "group/run/samples/step-000002.png"
    assert [(c["name"], c["step"]) for c in details["checkpoints"]] == [("step-000002", 2), ("step-000004", 4)]
    on_disk = sum(p.stat().st_size for p in (run / "checkpoints" / "step-000004").rglob("*") if p.is_file())
    assert details["checkpoints"][1]["bytes"] == on_disk
    assert details["evaluations"] == [
        {"name": "evaluation-test.json", "path": "group/run/evaluation-test.json", "report": None},
        {"name": "evaluation.json", "path": "group/run/evaluation.json", "report": {"fid": 12.5, "num_samples": 10}}]
    assert details["skipped"] == {"count": 0, "path": "group/run/train.log"}
    assert details["sources"] == [{"name": "export", "label": "export (pipeline)"},
                                  {"name": "checkpoint:step-000002", "label": "checkpoint at step 2"},
                                  {"name": "checkpoint:step-000004", "label": "checkpoint at step 4"}]
    assert details["console_log"] == "group/run/.difftrain/console.log"
    for path in [g["path"] for g in details["grids"]] + [details["console_log"], details["skipped"]["path"]]:
        assert (runs / path).is_file()
    top = run_details(runs / "group" / "run", ".")
    assert top["grids"][0]["path"] == "samples/step-000002.png" and top["run"]["name"] == "run"


def test_best_is_the_first_eval_metric_present_without_keep_best_by(finished: Path, tmp_path: Path):
    run = _copy(finished, tmp_path / "run")
    cache = RunsCache()
    assert _ids(tmp_path, cache)["run"].best is None
    log = MetricsLog(run / "metrics.jsonl", writes=True)
    log.append({"step": 2, "eval": {"accuracy": 0.3, "classifier_fid": 50.0}})
    log.append({"step": 4, "eval": {"accuracy": 0.2, "classifier_fid": 40.0}})
    assert _ids(tmp_path, cache)["run"].best == {"metric": "classifier_fid", "value": 40.0, "step": 4}
    log.append({"step": 4, "eval": {"fid": 90.0, "kid": 0.1}})
    log.append({"step": 5, "eval": {"fid": 80.0, "kid": 0.2}})
    assert _ids(tmp_path, cache)["run"].best == {"metric": "fid", "value": 80.0, "step": 5}
    log.trim(4)  # a resume from step 4 drops the rows after it
    assert _ids(tmp_path, cache)["run"].best == {"metric": "fid", "value": 90.0, "step": 4}
    log.trim(3)
    log.append({"step": 4, "eval": {"accuracy": 0.9}})
    assert _ids(tmp_path, cache)["run"].best == {"metric": "classifier_fid", "value": 50.0, "step": 2}


def test_the_runs_list_is_cached_until_a_file_changes(finished: Path, tmp_path: Path):
    """Also prints the time of listing 50 runs, first and when polled again (run with -s)."""
    runs = tmp_path / "runs"
    for i in range(50):
        shutil.copytree(finished, runs / f"run{i:02d}", ignore=shutil.ignore_patterns("unet", "logs", "optimizer*"))
    cache = RunsCache()
    start = time.perf_counter()
    first = find_runs(runs, cache)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    again = find_runs(runs, cache)
    again_s = time.perf_counter() - start
    assert len(first) == 50 and all(a is b for a, b in zip(first, again))  # the same objects: nothing reread
    MetricsLog(runs / "run07" / "metrics.jsonl", writes=True).append({"step": 5, "loss": 0.25, "lr": 0.0,
                                                                      "images_per_s": 1.0, "epoch": 0.2})
    polled = {info.id: info for info in find_runs(runs, cache)}
    assert (polled["run07"].step, polled["run07"].last_loss) == (5, 0.25)
    assert polled["run08"] is again[8]
    shutil.rmtree(runs / "run07")
    assert "run07" not in {info.id for info in find_runs(runs, cache)}
    print(f"\n50 runs: first listing {first_s * 1000:.0f} ms, polled again {again_s * 1000:.1f} ms "
          f"({os.cpu_count()} CPUs)")
