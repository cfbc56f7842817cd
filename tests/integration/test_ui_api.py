"""`difftrain ui`'s HTTP API on a folder of real tiny runs: every route, the token and host checks, and
attempts to leave RUNS_DIR (docs/ui.md)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from difftrain.config import load_config
from difftrain.training.loop import train
from difftrain.ui.app import create_app
from difftrain.ui.paths import OutsideRunsDir, inside_runs_dir

pytestmark = pytest.mark.integration

TINY = ["train.max_steps=4", "train.batch_size=4", "train.checkpoint_every_steps=2", "train.eval_every_steps=2",
        "train.eval_num_samples=9", "train.eval_inception=false", "sample.num_inference_steps=2"]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """RUNS_DIR with one finished tiny class-conditional run `digits`, a broken folder, and a secret outside."""
    root = tmp_path_factory.mktemp("ui")
    runs = root / "runs"
    runs.mkdir()
    os.environ.setdefault("DIFFTRAIN_CACHE", str(root / "cache"))
    train(load_config("tiny/digits-class", TINY, output_dir=str(runs / "digits")))
    broken = runs / "broken" / ".difftrain"
    broken.mkdir(parents=True)
    (broken / "run.json").write_text("{not json")
    (root / "secret.txt").write_text("outside RUNS_DIR")
    (runs / "link-out").symlink_to(root / "secret.txt")
    return runs


@pytest.fixture(scope="module")
def client(runs_dir: Path):
    with TestClient(create_app(runs_dir), base_url="http://127.0.0.1:7860") as c:
        yield c


def test_inside_runs_dir_refuses_every_way_out(tmp_path: Path):
    root = tmp_path.resolve()
    (root / "runs").mkdir()
    (root / "runs" / "out").symlink_to(root)
    runs = root / "runs"
    assert inside_runs_dir(runs, "a/b.png") == runs / "a" / "b.png"
    assert inside_runs_dir(runs, ".") == runs
    for bad in ("../x", "/etc/passwd", "a/../../x", "out/x", "a\\..\\x", "a\x00b"):
        with pytest.raises(OutsideRunsDir):
            inside_runs_dir(runs, bad)


def test_page_static_files_and_plotly_are_served(client: TestClient):
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    plotly = client.get("/static/plotly.min.js")
    assert plotly.status_code == 200 and "plotly" in plotly.text[:2000].lower()
    assert plotly.headers["content-type"].startswith("text/javascript")


def test_runs_list_shows_the_run_and_the_broken_folder(client: TestClient, runs_dir: Path):
    answer = client.get("/api/runs").json()
    assert answer["runs_dir"] == str(runs_dir.resolve())
    by_id = {run["id"]: run for run in answer["runs"]}
    digits = by_id["digits"]
    assert digits["status"] == "finished" and digits["step"] == 4 and digits["max_steps"] == 4
    assert digits["kind"] == "pixel-class" and digits["preset"] is None  # trained through train(), not the CLI
    last_loss = [json.loads(line) for line in (runs_dir / "digits" / "metrics.jsonl").read_text().splitlines()
                 if "loss" in line][-1]["loss"]
    assert digits["last_loss"] == pytest.approx(last_loss)
    assert by_id["broken"]["status"] == "broken" and by_id["broken"]["error"]


def test_run_page_lists_config_card_grids_checkpoints_and_sources(client: TestClient, runs_dir: Path):
    answer = client.get("/api/run", params={"id": "digits"}).json()
    assert answer["config_yaml"] == (runs_dir / "digits" / "config.yaml").read_text()
    assert answer["model_card"] == (runs_dir / "digits" / "README.md").read_text()
    assert [c["name"] for c in answer["checkpoints"]] == ["step-000002", "step-000004"]
    names = [s["name"] for s in answer["sources"]]
    assert "export" in names and "checkpoint:step-000004" in names
    for grid in answer["grids"]:
        image = client.get(f"/files/{grid['path']}")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"


def test_metrics_series_and_unchanged_version(client: TestClient):
    first = client.get("/api/metrics", params={"id": "digits"}).json()
    assert first["series"]["loss"]["x"] == [1, 2, 3, 4]
    assert "eval/classifier_fid" in first["series"]
    again = client.get("/api/metrics", params={"id": "digits", "version": first["version"]}).json()
    assert again == {"unchanged": True, "version": first["version"]}
    bad = client.get("/api/metrics", params={"id": "digits", "max_points": 1})
    assert bad.status_code == 400 and "max_points" in bad.json()["error"]


@pytest.mark.parametrize("run_id", ["../secret.txt", "/etc", "digits/../../x", "link-out"])
def test_run_ids_outside_runs_dir_are_refused(client: TestClient, run_id: str):
    for path in ("/api/run", "/api/metrics"):
        answer = client.get(path, params={"id": run_id})
        assert answer.status_code in (403, 404), (path, run_id, answer.text)
        assert "outside RUNS_DIR" not in answer.text or answer.status_code == 403
        assert "error" in answer.json()


def test_files_outside_runs_dir_are_refused(client: TestClient):
    assert client.get("/files/link-out").status_code == 403
    assert client.get("/files/%2e%2e/secret.txt").status_code in (403, 404)
    assert client.get("/files/digits/%2e%2e/%2e%2e/secret.txt").status_code in (403, 404)
    assert client.get("/files/digits/nope.png").status_code == 404
    assert client.get("/files/digits").status_code == 404  # a folder is not a file
    assert client.get("/api/run", params={"id": "nope"}).status_code == 404


def test_unknown_host_is_refused_without_a_token(runs_dir: Path):
    with TestClient(create_app(runs_dir), base_url="http://evil.example") as c:
        answer = c.get("/api/runs")
    assert answer.status_code == 403 and "Host" in answer.json()["error"]


def test_token_is_needed_and_accepted_three_ways(runs_dir: Path):
    with TestClient(create_app(runs_dir, token="s3cret"), base_url="http://10.0.0.5:7860") as c:
        assert c.get("/api/runs").status_code == 403
        assert c.get("/api/runs", params={"token": "wrong"}).status_code == 403
        assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        login = c.get("/", params={"token": "s3cret"}, follow_redirects=False)
        assert login.status_code == 303 and "difftrain_token" in login.headers["set-cookie"]
        assert c.get("/api/runs").status_code == 200  # the cookie now


def test_a_post_from_another_origin_is_refused(client: TestClient):
    answer = client.post("/api/launch/validate", json={"config": "tiny/digits-class", "overrides": [], "name": "x"},
                         headers={"Origin": "http://evil.example"})
    assert answer.status_code == 403 and "Origin" in answer.json()["error"]


def test_presets_and_launch_validation(client: TestClient):
    presets = client.get("/api/presets").json()["presets"]
    assert "tiny/digits-class" in [p["name"] for p in presets]
    ok = client.post("/api/launch/validate", json={"config": "tiny/digits-class", "overrides": ["train.max_steps=2"],
                                                   "name": "new-run"}).json()
    assert ok["ok"] and ok["problems"] == []
    bad = client.post("/api/launch/validate", json={"config": "tiny/digits-class",
                                                    "overrides": ["train.max_steps=abc"], "name": "new-run"}).json()
    assert not bad["ok"] and any("train.max_steps" in line for line in bad["problems"])
    for name in ("../escape", "a/b", ".hidden"):
        answer = client.post("/api/launch/validate", json={"config": "tiny/digits-class", "overrides": [], "name": name})
        assert answer.status_code == 400 or not answer.json()["ok"], name
    outside = client.post("/api/launch/validate", json={"config": "/etc/passwd", "overrides": [], "name": "x"})
    assert outside.status_code == 400 or not outside.json()["ok"]
    malformed = client.post("/api/launch", content=b"{oops", headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]
    refused = client.post("/api/launch", json={"config": "tiny/digits-class", "overrides": ["foo"], "name": "x"})
    assert refused.status_code == 400 and refused.json()["error"]


def test_sample_job_makes_an_image_and_reports_the_command(client: TestClient, runs_dir: Path):
    submitted = client.post("/api/sample", json={"run": "digits", "source": "export", "class_labels": "3",
                                                 "num_images": 1, "num_inference_steps": 2, "seed": "0"})
    assert submitted.status_code == 200, submitted.text
    job = submitted.json()["job"]
    assert job["command"].startswith("difftrain sample")
    deadline = time.monotonic() + 120
    while job["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = client.get(f"/api/sample/{job['id']}").json()["job"]
    assert job["state"] == "done", job
    assert len(job["images"]) == 1
    png = client.get(f"/files/{job['images'][0]}")
    assert png.status_code == 200
    Image.open(runs_dir / job["images"][0]).verify()
    bad = client.post("/api/sample", json={"run": "digits", "source": "export", "prompts": ["a cat"]})
    assert bad.status_code == 400 and "prompt" in bad.json()["error"]
    assert client.get("/api/sample/no-such-job").status_code == 404
    outside = client.post("/api/sample", json={"run": "../secret.txt", "source": "export"})
    assert outside.status_code == 403 and "RUNS_DIR" in outside.json()["error"]


def test_queue_launch_stop_and_resume(client: TestClient, runs_dir: Path):
    started = client.post("/api/launch", json={"config": "tiny/digits-class", "name": "queued-run",
                                               "overrides": ["train.max_steps=2000", "train.checkpoint_every_steps=1",
                                                             "train.eval_every_steps=null"]})
    assert started.status_code == 200, started.text
    job = started.json()["job"]
    assert job["run"] == "queued-run" and job["state"] in ("queued", "running")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        jobs = {j["run"]: j for j in client.get("/api/queue").json()["jobs"]}
        if (runs_dir / "queued-run" / "checkpoints").is_dir() and jobs["queued-run"]["state"] == "running":
            break
        time.sleep(0.5)
    stopped = client.post("/api/stop", params={"id": "queued-run"}).json()["job"]
    assert stopped["state"] in ("stopping", "stopped")
    while time.monotonic() < deadline:
        jobs = {j["run"]: j for j in client.get("/api/queue").json()["jobs"]}
        if jobs["queued-run"]["state"] == "stopped":
            break
        time.sleep(0.5)
    assert jobs["queued-run"]["state"] == "stopped", jobs
    assert (runs_dir / "queued-run" / ".difftrain" / "console.log").stat().st_size > 0
    statuses = {r["id"]: r["status"] for r in client.get("/api/runs").json()["runs"]}
    assert statuses["queued-run"] == "interrupted"
    resumed = client.post("/api/resume", params={"id": "queued-run"}).json()["job"]
    assert resumed["run"] == "queued-run"
    client.post("/api/stop", params={"id": "queued-run"})
    # Trainers outlive the UI by design: leave none running after the test.
    while time.monotonic() < deadline + 60:
        jobs = {j["run"]: j for j in client.get("/api/queue").json()["jobs"] if j["id"] == resumed["id"]}
        if jobs["queued-run"]["state"] not in ("queued", "running", "stopping"):
            break
        time.sleep(0.5)
    assert jobs["queued-run"]["state"] in ("stopped", "finished"), jobs


def test_the_ui_command_refuses_a_missing_folder_and_a_busy_port_in_one_line(tmp_path: Path):
    import socket
    import subprocess
    import sys

    missing = subprocess.run([sys.executable, "-m", "difftrain", "ui", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"difftrain ui: error: RUNS_DIR {tmp_path / 'nope'} is not a folder; give the folder that holds your runs "
        "(it is created by `difftrain train --output-dir RUNS_DIR/NAME`)"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = subprocess.run([sys.executable, "-m", "difftrain", "ui", str(tmp_path), "--port", str(port)],
                               capture_output=True, text=True, timeout=120)
    assert taken.returncode == 1 and f"--port {port}: the address is in use" in taken.stderr
    assert len(taken.stderr.strip().splitlines()) == 1
