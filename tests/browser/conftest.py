"""Fixtures of the browser test: a Chromium driven by playwright, and a RUNS_DIR served by `difftrain ui`.

The RUNS_DIR holds two finished tiny runs, one run still training (stopped at the end), and a synthetic run
with 200 preview grids and 100k metrics rows for the performance check. Everything is real: runs come from
`python -m difftrain train tiny/digits-class`, the server is `python -m difftrain ui`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser.support import (
    BROKEN,
    CHROMIUM_ARGS,
    FINISHED_A,
    FINISHED_B,
    LIVE,
    SCREENSHOTS,
    VIEWPORT,
    UiServer,
    find_chromium,
    free_port,
    get_json,
    make_perf_run,
    stop_pid,
    stop_process,
    subprocess_env,
    train,
    wait_for,
)


@pytest.fixture(scope="module")
def chromium_path() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found ($DIFFTRAIN_CHROMIUM, /usr/bin/chromium, chromium, chromium-browser, "
                    "google-chrome, playwright's own): apt-get install chromium, or playwright install chromium")
    return path


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # launch() gives every run a fresh temporary profile (user-data dir).
        chromium = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def ui(chromium_path, tmp_path_factory) -> UiServer:
    """RUNS_DIR with real tiny runs, served by `python -m difftrain ui` on a free port."""
    root = tmp_path_factory.mktemp("ui")
    runs_dir = root / "runs"
    runs_dir.mkdir()
    env = subprocess_env(tmp_path_factory.getbasetemp() / "difftrain-cache")
    logs = {name: root / f"{name}.log" for name in ("digits-a", "digits-b", "live", "server")}
    finished = {"digits-a": train(runs_dir, "digits-a", FINISHED_A, env, logs["digits-a"]),
                "digits-b": train(runs_dir, "digits-b", FINISHED_B, env, logs["digits-b"])}
    live = train(runs_dir, "live", LIVE, env, logs["live"], nice=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "difftrain", "ui", str(runs_dir), "--port", str(port)],
                              env=env, stdout=logs["server"].open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for name, process in finished.items():
            try:
                returncode = process.wait(300)
            except subprocess.TimeoutExpired:
                process.kill()
                returncode = "timeout"
            assert returncode == 0, f"{name} did not train: {logs[name].read_text(errors='replace')[-3000:]}"
        make_perf_run(runs_dir / "digits-a", runs_dir / "perf")
        # A folder whose run record cannot be read: listed as broken, with the reason.
        (runs_dir / BROKEN / ".difftrain").mkdir(parents=True)
        (runs_dir / BROKEN / ".difftrain" / "run.json").write_text("{not json")
        wait_for("the UI server", lambda: get_json(url + "/api/runs"), 60, logs=(logs["server"],))
        yield UiServer(url, runs_dir, live, list(logs.values()))
    finally:
        launched = []
        try:
            launched = [job["pid"] for job in get_json(url + "/api/queue", timeout=5)["jobs"] if job.get("pid")]
        except Exception:  # noqa: BLE001 - the server may be down already; nothing it started is then known
            pass
        stop_process(server, 30)
        for pid in launched:
            stop_pid(pid)
        stop_process(live)
        for process in finished.values():
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where the test's screenshots go: a temporary folder, or docs/images with DIFFTRAIN_UPDATE_SCREENSHOTS=1
    (each run's steps and times differ, so a plain test run must not rewrite the tracked images)."""
    if os.environ.get("DIFFTRAIN_UPDATE_SCREENSHOTS", "") not in ("", "0"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return SCREENSHOTS
    return tmp_path_factory.mktemp("screenshots")
