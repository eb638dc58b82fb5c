"""Real-browser test: ``streamlit run app.py`` on a free port, headless Debian Chromium through Playwright.

Visits every tab on synthetic fixture runs (one of them live) and the stored two_worlds benchmark, waits for
the plotly charts, asserts there is no exception box, no console error on the Two worlds tab and no "Deploy"
button, checks that the Launch tab refuses a comparison name outside the runs dir, that a live
run's chart updates by itself, and saves screenshots (to tmp_path, and
to $LAB_ARTIFACTS when set).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lab.runlog import RunWriter
from lab.synthetic_runs import SyntheticRun, append_step, make_complete, no_fsync, run_config, write_run
from tests.helpers import free_port

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
LIVE = SyntheticRun("dr_grpo", seed=1, steps=45, max_steps=90, state="running")
# A run dir someone else wrote: its name and status try to inject markup and script into the page.
HOSTILE_NAME = "x`<img src=x onerror=window.pwned=1>`-s0"
HOSTILE_STATE = '<iframe srcdoc="<script>parent.window.pwned=1</script>"></iframe>'
# tab → (plotly charts it draws on these fixtures, a text only that tab shows)
TABS = {
    "Overview": (4, "Final scores"),  # the verdict's picture, reward, Avg@k, Pass@k
    "Lengths": (4, "Steps shown over time"),
    "Gradient noise": (3, "Probe step"),
    "Weights": (2, "How α changes ΔL"),
    "Two worlds": (4, "Verdict per cell"),  # the stored benchmark: rewards, a verdict per cell, CV, k
    "Estimator playground": (3, "Monte Carlo trials"),
    "Launch": (0, "Comparison name"),
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian chromium not installed at {CHROMIUM}"),
]


@pytest.fixture
def server(tmp_path) -> Iterator[tuple[str, Path]]:
    """A streamlit server on fixture runs: the complete comparison plus one running run."""
    runs = tmp_path / "runs"
    with no_fsync():
        make_complete(runs)
        write_run(runs, LIVE)
        hostile = runs / "demo" / HOSTILE_NAME
        RunWriter(hostile).write_config(run_config(SyntheticRun("grpo", seed=9, steps=0), "demo"))
    (hostile / "status.json").write_text(
        f'{{"state": "{HOSTILE_STATE.replace(chr(34), chr(92) + chr(34))}", "error": "![b](http://example.invalid/b.png)"}}',
        encoding="utf-8",
    )
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
           "--", "--runs-dir", str(runs)]  # fmt: skip
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"streamlit did not start:\n{(tmp_path / 'streamlit.log').read_text()}")
                time.sleep(0.3)
        yield url, runs
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def save(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("LAB_ARTIFACTS"):
        target = Path(os.environ["LAB_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def wait_for_charts(page, n: int) -> None:
    """Wait until ``n`` visible plotly charts of the main area have drawn their traces."""
    if n:
        page.wait_for_function(
            "n => Array.from(document.querySelectorAll('[data-testid=stMain] .js-plotly-plot'))"
            "  .filter(e => e.offsetParent !== null && e.querySelector('g.trace')).length >= n",
            arg=n,
            timeout=30_000,
        )


def test_dashboard_in_chromium(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, runs = server
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            tab_now = ["(load)"]
            console_errors: list[tuple[str, str]] = []
            page.on(
                "console",
                lambda m: console_errors.append((tab_now[0], m.text)) if m.type == "error" else None,
            )
            page.on("pageerror", lambda err: console_errors.append((tab_now[0], str(err))))
            page.goto(url, timeout=30_000)
            # hostile run data is shown as text: no iframe, no image, no script ran
            page.get_by_text("iframe srcdoc", exact=False).first.wait_for(timeout=30_000)
            sidebar = page.locator("[data-testid=stSidebar]")
            assert sidebar.locator("iframe, img").count() == 0
            assert page.locator("iframe[srcdoc]").count() == 0
            assert page.evaluate("window.pwned === undefined")
            # a local lab: no "Deploy" button (client.toolbarMode = "viewer" in .streamlit/config.toml)
            page.locator("[data-testid=stToolbar]").first.wait_for(timeout=30_000)
            assert page.locator("[data-testid=stAppDeployButton]").count() == 0
            assert page.get_by_role("button", name="Deploy").count() == 0
            for tab, (n_charts, marker) in TABS.items():
                tab_now[0] = tab
                page.get_by_role("tab", name=tab).click()
                page.get_by_text(marker).first.wait_for(timeout=30_000)
                wait_for_charts(page, n_charts)
                page.wait_for_timeout(500)
                assert page.locator("[data-testid=stException]").count() == 0, f"exception box on {tab}"
                shot = save(page, tmp_path, tab.lower().replace(" ", "-"))
                assert shot.stat().st_size > 10_000
            assert not [e for e in console_errors if e[0] == "Two worlds"], console_errors

            # Launch refuses a name that leaves the runs dir, says why, offers no Start, creates nothing
            page.get_by_role("tab", name="Launch").click()
            page.get_by_role("button", name="Start").wait_for(timeout=30_000)
            before = set(tmp_path.rglob("*"))
            name = page.get_by_label("Comparison name")
            name.fill("../../somewhere")
            name.press("Enter")
            page.get_by_text("is not a plain folder name").wait_for(timeout=30_000)
            # the refusal's text can appear a moment before the rerun removes the old form's button: wait for it
            sync_api.expect(page.get_by_role("button", name="Start")).to_have_count(0, timeout=30_000)
            save(page, tmp_path, "launch-refused")
            assert set(tmp_path.rglob("*")) == before | {tmp_path / "dashboard-launch-refused.png"}

            # live: a new step of the running run shows up without a reload (fragment refresh)
            page.get_by_role("tab", name="Lengths").click()
            page.get_by_text(f"Completion lengths at step {LIVE.steps}").wait_for(timeout=30_000)
            append_step(
                RunWriter(runs / "demo" / "dr_grpo-s1"), LIVE, LIVE.steps + 1, np.random.default_rng(0)
            )
            page.get_by_text(f"Completion lengths at step {LIVE.steps + 1}").wait_for(timeout=20_000)
            assert page.locator("[data-testid=stException]").count() == 0
            save(page, tmp_path, "lengths-live")
        finally:
            browser.close()
