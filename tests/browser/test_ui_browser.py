"""`difftrain ui` in a real browser: the page against the real server over real tiny runs (docs/ui.md).

Skipped only where playwright or a Chromium is missing (conftest.py says which). The tests share one RUNS_DIR
and server (module scope) and run in file order; each saves a screenshot, into docs/images/ui-*.png when
DIFFTRAIN_UPDATE_SCREENSHOTS=1 (how the docs' images are made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request

import pytest

from tests.browser.support import BROKEN, PERF_GRIDS, VIEWPORT, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.integration]

expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')").expect

STEP = re.compile(r"^(\d+) / (\d+|\?)$")


def step_of(cell) -> int | None:
    """The step a "12 / 100" cell shows; None before the run's first logged step ("— / 100")."""
    match = STEP.match(cell.inner_text().strip())
    return int(match.group(1)) if match else None


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def test_runs_list_follows_the_training_run_and_keeps_sort_and_picks(ui, page, screenshots):
    page.goto(ui.url + "/#/")
    live = page.locator('[data-testid=run-row][data-run-id="live"]')
    expect(live.locator("[data-col=status] .badge")).to_have_text("training", timeout=30_000)
    for name in ("digits-a", "digits-b"):
        expect(page.locator(f'[data-testid=run-row][data-run-id="{name}"] [data-col=status] .badge')).to_have_text("finished")
    expect(page.locator('[data-testid=run-row][data-run-id="digits-a"] [data-col=step]')).to_have_text("4 / 4")
    broken = page.locator("[data-testid=run-row][data-status=broken]")
    expect(broken).to_have_count(1)
    assert broken.get_attribute("data-run-id") == BROKEN
    expect(broken.locator("[data-testid=run-link]")).to_have_text(BROKEN)
    expect(broken.locator("[data-testid=run-reason]")).not_to_be_empty()
    assert page.locator("[data-testid=runs-table] img").count() == 0
    assert page.evaluate("window.injected") is None

    # Sort by name, ascending; the order must survive the refreshes below.
    names = [BROKEN, "digits-a", "digits-b", "live", "perf"]
    rows = page.locator("[data-testid=run-row]")
    page.locator("th[data-sort-key=name]").click()
    expect(page.locator("th[data-sort-key=name]")).to_have_attribute("aria-sort", "ascending")
    assert [rows.nth(i).get_attribute("data-run-id") for i in range(len(names))] == names
    page.locator('[data-testid=run-row][data-run-id="digits-a"] [data-testid=run-select]').check()

    # The list refreshes every 2 s: the step advances while the sort and the pick stay.
    step_cell = live.locator("[data-col=step]")
    first = wait_for("the live run's first step in the runs list", lambda: step_of(step_cell), 60, logs=tuple(ui.logs))
    wait_for("the live run's step to advance in the runs list", lambda: step_of(step_cell) > first, 60,
             logs=tuple(ui.logs))
    assert [rows.nth(i).get_attribute("data-run-id") for i in range(len(names))] == names
    expect(page.locator('[data-testid=run-row][data-run-id="digits-a"] [data-testid=run-select]')).to_be_checked()
    expect(page.locator("[data-testid=compare-button]")).to_be_disabled()
    page.locator('[data-testid=run-row][data-run-id="digits-b"] [data-testid=run-select]').check()
    expect(page.locator("[data-testid=compare-button]")).to_have_text("Compare (2)")

    # The broken run's page, reached by its link: its name and reason as text.
    broken.locator("[data-testid=run-link]").click()
    expect(page.locator("[data-testid=run-title]")).to_have_text(BROKEN)
    expect(page.locator("[data-testid=run-status]")).to_have_text("broken")
    expect(page.locator("[data-testid=run-error]")).not_to_be_empty()
    assert page.evaluate("window.injected") is None
    page.go_back()

    # A second click sorts descending; sorting by step puts the 100k-step synthetic run last of those with a step.
    page.locator("th[data-sort-key=name]").click()
    expect(rows.first).to_have_attribute("data-run-id", "perf")
    page.locator("th[data-sort-key=step]").click()
    expect(page.locator("th[data-sort-key=step]")).to_have_attribute("aria-sort", "ascending")
    ids = [rows.nth(i).get_attribute("data-run-id") for i in range(len(names))]
    assert ids[-2:] == ["perf", BROKEN], ids  # a run without a step goes last in either direction

    # A folder that goes away leaves the list at the next refresh; the picks stay.
    shutil.rmtree(ui.runs_dir / BROKEN)
    expect(rows).to_have_count(len(names) - 1)
    page.locator("th[data-sort-key=name]").click()
    expect(page.locator("[data-testid=compare-button]")).to_be_enabled()
    page.screenshot(path=screenshots / "ui-runs.png")


def test_run_page_draws_charts_and_moves_the_grid_slider(ui, page, screenshots):
    metrics_requests = []
    page.on("request", lambda r: "/api/metrics?" in r.url and metrics_requests.append(r.url))
    page.goto(ui.url + "/#/run/digits-a")
    expect(page.locator("[data-testid=run-title]")).to_have_text("digits-a")
    expect(page.locator("[data-testid=charts]")).to_have_attribute("data-drawn", "1", timeout=30_000)
    for name in ("loss", "lr", "images_per_s"):
        expect(page.locator(f'[data-testid="chart-{name}"] svg.main-svg').first).to_be_visible()

    # digits-a wrote a grid at every step: the slider starts on the newest and moves back over the others.
    slider = page.locator("[data-testid=grid-slider]")
    expect(page.locator("[data-testid=thumb]")).to_have_count(4)
    expect(page.locator("[data-testid=grid-step]")).to_contain_text("step 4")
    slider.focus()
    page.keyboard.press("Home")
    expect(page.locator("[data-testid=grid-step]")).to_contain_text("step 1  (1 of 4)")
    expect(page.locator("[data-testid=grid-image]")).to_have_attribute("src", re.compile(r"samples/step-000001\.png$"))
    page.keyboard.press("ArrowRight")
    expect(page.locator("[data-testid=grid-step]")).to_contain_text("step 2  (2 of 4)")
    assert page.locator("[data-testid=grid-image]").evaluate("img => img.complete && img.naturalWidth > 0")
    page.locator("[data-testid=thumb]").nth(2).click()
    expect(slider).to_have_value("2")

    expect(page.locator("[data-testid=config-yaml]")).to_contain_text("max_steps: 4")
    expect(page.locator("[data-testid=checkpoints-table]")).to_contain_text("step-000004")
    expect(page.locator("[data-testid=stop-button]")).to_be_disabled()
    # Refreshes pass the version they have, so a finished run's charts are never fetched again.
    with page.expect_request(lambda r: "/api/metrics?" in r.url, timeout=10_000) as refresh:
        pass
    assert "version=" not in metrics_requests[0] and "version=" in refresh.value.url, metrics_requests

    # The live run's page is the one shown in the docs: status, charts with a few hundred steps, grids.
    page.goto(ui.url + "/#/run/live")
    expect(page.locator("[data-testid=run-status]")).to_have_text("training", timeout=30_000)
    expect(page.locator("[data-testid=charts]")).to_have_attribute("data-drawn", "1", timeout=30_000)
    expect(page.locator("[data-testid=stop-button]")).to_be_enabled()
    first = page.locator("[data-testid=run-step]").inner_text()
    expect(page.locator("[data-testid=run-step]")).not_to_have_text(first, timeout=30_000)
    page.screenshot(path=screenshots / "ui-run.png")


def test_sample_panel_shows_an_error_and_then_one_image(ui, page, screenshots):
    page.goto(ui.url + "/#/run/digits-a")
    panel = page.locator("[data-testid=sample-panel]")
    expect(panel.locator("[data-testid=sample-source] option").first).to_be_attached(timeout=30_000)

    # A bad value: the server's one-line error appears in the panel.
    panel.locator("[data-testid=sample-guidance]").fill("lots")
    panel.locator("[data-testid=sample-count]").fill("1")
    panel.locator("[data-testid=sample-submit]").click()
    expect(panel.locator("[data-testid=sample-error]")).to_be_visible(timeout=60_000)
    assert panel.locator("[data-testid=sample-error]").inner_text().strip()

    panel.locator("[data-testid=sample-guidance]").fill("2")
    panel.locator("[data-testid=sample-labels]").fill("3")
    panel.locator("[data-testid=sample-steps]").fill("2")
    panel.locator("[data-testid=sample-seeds]").fill("0")
    panel.locator("[data-testid=sample-submit]").click()
    expect(panel.locator("[data-testid=sample-error]")).to_be_hidden()
    image = panel.locator("[data-testid=sample-image] img").first
    expect(image).to_be_visible(timeout=120_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    expect(panel.locator("[data-testid=sample-state]")).to_have_attribute("data-state", "done", timeout=60_000)
    expect(panel.locator("[data-testid=sample-image]")).to_have_count(1)
    expect(panel.locator("[data-testid=sample-download]").first).to_have_attribute("download", re.compile(r".+\.png$"))
    expect(panel.locator("[data-testid=sample-command]")).to_contain_text("difftrain sample")
    panel.scroll_into_view_if_needed()
    page.screenshot(path=screenshots / "ui-sample.png")


def test_compare_overlays_the_finished_runs(ui, page, screenshots):
    page.goto(ui.url + "/#/")
    for name in ("digits-a", "digits-b"):
        page.locator(f'[data-testid=run-row][data-run-id="{name}"] [data-testid=run-select]').check()
    page.locator("[data-testid=compare-button]").click()
    expect(page).to_have_url(re.compile(r"#/compare\?ids="))
    expect(page.locator("[data-testid=compare-charts]")).to_have_attribute("data-drawn", "1", timeout=30_000)
    for name in ("loss", "lr"):
        expect(page.locator(f'[data-testid="compare-chart-{name}"] .scatterlayer .trace')).to_have_count(2)
    grids = page.locator("[data-testid=compare-grid]")
    expect(grids).to_have_count(2)
    for i in range(2):
        page.wait_for_function("img => img && img.complete && img.naturalWidth > 0",
                               arg=grids.nth(i).locator("img").element_handle())
    page.screenshot(path=screenshots / "ui-compare.png")


def test_launch_page_checks_starts_and_stops_a_run(ui, page, screenshots):
    page.goto(ui.url + "/#/launch")
    expect(page.locator('[data-testid=launch-preset] option[value="tiny/digits-class"]')).to_be_attached(timeout=30_000)
    page.locator("[data-testid=launch-preset]").select_option("tiny/digits-class")
    page.locator("[data-testid=launch-name]").fill("launched")

    # Problems are shown exactly as the server returns them.
    bad = ["train.max_steps=many", "train.no_such_key=1"]
    page.locator("[data-testid=launch-overrides]").fill("\n".join(bad))
    page.locator("[data-testid=launch-check]").click()
    problems = page.locator("[data-testid=launch-problems] li")
    expect(problems.first).to_be_visible(timeout=30_000)
    answer = post_json(ui.url + "/api/launch/validate", {"config": "tiny/digits-class", "overrides": bad, "name": "launched"})
    assert answer["ok"] is False and answer["problems"]
    assert problems.all_inner_texts() == answer["problems"]

    good = ["train.max_steps=100000", "train.checkpoint_every_steps=1000", "train.sample_every_steps=1000"]
    page.locator("[data-testid=launch-overrides]").fill("\n".join(good))
    page.locator("[data-testid=launch-check]").click()
    expect(page.locator("[data-testid=launch-ok]")).to_be_visible(timeout=30_000)
    page.locator("[data-testid=launch-start]").click()
    row = page.locator('[data-testid=queue-row][data-run-id="launched"]')
    expect(row).to_be_visible(timeout=30_000)
    expect(row).to_have_attribute("data-state", "running", timeout=60_000)
    # Stop once it trains (a stop during start-up is a different path); the run list's step says so.
    wait_for("the launched run's first step",
             lambda: ui.api("/api/run?id=launched")["run"]["step"] >= 1, 120, logs=tuple(ui.logs))
    page.screenshot(path=screenshots / "ui-launch.png")
    row.locator("[data-testid=queue-stop]").click()
    expect(row).to_have_attribute("data-state", "stopped", timeout=90_000)
    expect(row.locator("[data-testid=queue-resume]")).to_be_enabled()
    job = next(j for j in ui.api("/api/queue")["jobs"] if j["run"] == "launched")
    assert job["state"] == "stopped" and job["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(job["pid"], 0)
    assert ui.api("/api/run?id=launched")["run"]["status"] == "interrupted"


def test_run_page_performance_with_200_grids_and_100k_rows(ui, browser):
    """First paint < 2 s; prints it and the time until the charts and the grid slider are drawn."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    try:
        page.goto(ui.url + "/#/run/perf")
        page.wait_for_function("() => performance.getEntriesByName('difftrain:charts-drawn').length"
                               " && performance.getEntriesByName('difftrain:grids-drawn').length", timeout=60_000)
        times = page.evaluate("""() => ({
            fcp: performance.getEntriesByType('paint').find((e) => e.name === 'first-contentful-paint').startTime,
            charts: performance.getEntriesByName('difftrain:charts-drawn')[0].startTime,
            grids: performance.getEntriesByName('difftrain:grids-drawn')[0].startTime,
            plotly: performance.getEntriesByName('difftrain:plotly-ready')[0].startTime,
        })""")
        expect(page.locator("[data-testid=thumb]")).to_have_count(PERF_GRIDS)
        expect(page.locator('[data-testid="chart-eval/classifier_fid"] svg.main-svg').first).to_be_visible()
        # Only the thumbnails near the visible part of the filmstrip are loaded, never all 200.
        page.wait_for_timeout(500)
        loaded = page.evaluate("() => performance.getEntriesByType('resource')"
                               ".filter((e) => /\\/samples\\/step-\\d+\\.png/.test(e.name)).length")
        print(f"\nrun page, {PERF_GRIDS} grids and 100k metrics rows: first contentful paint {times['fcp']:.0f} ms, "
              f"grid slider drawn {times['grids']:.0f} ms, plotly.js ready {times['plotly']:.0f} ms, "
              f"charts drawn {times['charts']:.0f} ms, "
              f"grid images loaded {loaded}")
        assert times["fcp"] < 2000, times
        assert loaded < 50, f"{loaded} of {PERF_GRIDS} grids loaded at once"
    finally:
        context.close()


def test_stop_button_stops_the_training_run(ui, page):
    page.goto(ui.url + "/#/run/live")
    expect(page.locator("[data-testid=stop-button]")).to_be_enabled(timeout=30_000)
    page.locator("[data-testid=stop-button]").click()
    expect(page.locator("[data-testid=run-action-error]")).to_be_hidden()
    expect(page.locator("[data-testid=run-status]")).to_have_text("interrupted", timeout=90_000)
    ui.live.wait(60)
    expect(page.locator("[data-testid=resume-button]")).to_be_enabled()
