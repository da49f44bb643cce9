"""The MLflow UI, for real: a tiny sweep -> `mlflow server` on 127.0.0.1 -> headless Chromium (Debian's
chromium + chromium-driver, driven by selenium) on the experiment page: the sweep's parent run and,
once expanded, its child runs are listed under their readable names.

Skips only where chromium is genuinely absent outside CI; in CI (CI=true) a missing browser fails,
since .ci/run installs it. LORA_SWEEP_SCREENSHOT=path keeps the screenshot (the README's image:
reports/assets/mlflow_ui.png).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from services import serve_mlflow

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,800", "--hide-scrollbars")


def _need_browser() -> None:
    if CHROMIUM and CHROMEDRIVER:
        return
    missing = "chromium" if not CHROMIUM else "chromedriver"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{missing} is not installed, and CI must run this test: .ci/run installs it "
                    f"(apt-get install -y chromium chromium-driver).")
    pytest.skip(f"{missing} not installed (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real two-trial rank sweep at tiny sizes; its MLflow store is what the UI will show."""
    _need_browser()
    root = tmp_path_factory.mktemp("ui")
    cmd = [sys.executable, "-m", "lora_sweep", "+sweep=rank", 'space.lora.r="choice(4,8)"', "data.train_size=32",
           "data.eval_size=32", "train.num_train_epochs=1", f"paths.sweeps_dir={root / 'sweeps'}",
           f"paths.reports_dir={root / 'reports'}"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


@pytest.fixture(scope="module")
def server(sweep):
    with serve_mlflow(f"sqlite:///{sweep / 'sweeps' / 'mlflow.db'}", sweep / "server.log") as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))  # no Selenium Manager download
    yield driver
    driver.quit()


def test_experiment_page_lists_the_sweeps_child_runs(sweep, server, browser):
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient(tracking_uri=server)
    exp = client.get_experiment_by_name("lora-sweep/rank")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert children == ["r=4 a=8 qkvo", "r=8 a=16 qkvo"]  # readable names: rank, alpha tied to 2r, targets

    wait = WebDriverWait(browser, 120)
    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    browser.get(f"{server}/#/experiments/{exp.experiment_id}/runs")
    wait.until(lambda d: "sweep rank" in body())
    assert not any(name in body() for name in children)  # nested runs start collapsed under the parent
    expander = browser.find_element(By.CSS_SELECTOR, 'button[data-component-id*="runnamecellrenderer"]')
    expander.click()
    wait.until(lambda d: all(name in body() for name in children))
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, '[role="row"]')]
    listed = [name for name in children if any(name in row for row in rows)]
    assert listed == children
    for close in browser.find_elements(By.CSS_SELECTOR, 'button[aria-label="Close"]'):
        if close.is_displayed():  # the assistant side panel: not ours, and it hides the runs table
            close.click()
    shot = sweep / "mlflow_ui.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("LORA_SWEEP_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)

    # The parent run's page: the report (findings included) as its description, the children by name.
    browser.get(f"{server}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}")
    wait.until(lambda d: "LoRA sweep: rank" in body() and all(name in body() for name in children))
    for more in browser.find_elements(By.XPATH, "//*[normalize-space(text())='Show more']"):
        if more.is_displayed():
            more.click()
    wait.until(lambda d: "Best configuration" in body())
    assert "Raising r from 4 to 8" in body()
