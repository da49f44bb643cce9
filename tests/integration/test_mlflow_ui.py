"""The MLflow UI, for real: a tiny sweep -> `python -m lora_sweep ui` (the MLflow UI on 127.0.0.1) ->
headless Chromium (Debian's chromium + chromium-driver, driven by selenium) on the experiment page: the
sweep's parent run and, once expanded, its child runs are listed under their readable names; the URL
the verb prints opens the model-training view, where the parent run charts the sweep series.

Skips only where chromium is genuinely absent outside CI; in CI (CI=true) a missing browser fails,
since .ci/run installs it. LORA_SWEEP_SCREENSHOT=path keeps the screenshot (the README's image:
reports/assets/mlflow_ui.png).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

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
    cmd = [sys.executable, "-m", "lora_sweep", "+sweep=rank", 'space.lora.r="choice(4,8)"', "data.train_size=32", "data.test_size=32",
           "data.eval_size=32", "train.num_train_epochs=1", f"paths.sweeps_dir={root / 'sweeps'}",
           f"paths.reports_dir={root / 'reports'}"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (root / "stdout.txt").write_text(proc.stdout)
    return root


@pytest.fixture(scope="module")
def printed_url(sweep):
    """`python -m lora_sweep ui sweep=rank` on the sweep's store: the URL it prints; Ctrl-C (SIGINT) stops it."""
    proc = subprocess.Popen([sys.executable, "-m", "lora_sweep", "ui", "sweep=rank",
                             f"paths.sweeps_dir={sweep / 'sweeps'}", f"paths.reports_dir={sweep / 'reports'}"],
                            cwd=sweep, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                seen.append(lines.get(timeout=0.5).strip())
            except queue.Empty:
                continue
            if seen[-1].startswith("http://"):
                break
        else:
            pytest.fail(f"`lora_sweep ui` printed no URL (exit {proc.poll()}):\n" + "\n".join(seen))
        yield seen[-1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(printed_url):
    return re.match(r"http://[^/]+", printed_url).group(0)


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
    assert "Against the most accurate" in body()


def test_printed_url_opens_the_model_training_view_with_the_sweep_series(sweep, printed_url, browser):
    """A fresh profile (GenAI view by default) opens the URL `lora_sweep ui` printed: the model-training
    view, the parent run's metrics table and its charts of the sweep series over the trial number, and
    each child run's own metrics."""
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    assert printed_url.endswith("?workflowType=machine_learning")
    found = re.search(r"#/experiments/(\w+)/runs/(\w+)", printed_url)
    experiment_id, parent_id = found.groups()
    summary = (sweep / "stdout.txt").read_text()  # the sweep's summary points at the same page
    assert f"/#/experiments/{experiment_id}/runs/{parent_id}?workflowType=machine_learning" in summary

    wait = WebDriverWait(browser, 60)
    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    browser.get(printed_url)  # the run's Overview: its metrics table
    wait.until(lambda d: "sweep/best_eval_accuracy" in body() and "sweep/eval_accuracy" in body())
    assert "recommended/eval_accuracy_ci_low" in body()
    # The model-training view: its sidebar and breadcrumb say Runs; the GenAI view's list Observability,
    # Evaluation runs, ... and the breadcrumb says Evaluations.
    assert "Runs" in body().splitlines()
    assert "Observability" not in body() and "Evaluation runs" not in body()

    # Model metrics, filtered to the sweep section: one line chart per series, over the trial number.
    browser.find_element(By.XPATH, "//button[@role='tab' and normalize-space(.)='Model metrics']").click()
    search = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']"))
    search.send_keys("sweep/", Keys.ENTER)
    legends = ("sweep rank (sweep/eval_accuracy)", "sweep rank (sweep/best_eval_accuracy)")
    wait.until(lambda d: all(legend in body() for legend in legends) and "Step" in body())
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep / 'sweeps' / 'mlflow.db'}")
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2
    cards = '[data-testid="experiment-view-compare-runs-card"]'
    points = lambda d: [len(c.find_elements(By.CSS_SELECTOR, ".scatterlayer path.point"))  # noqa: E731
                        for c in d.find_elements(By.CSS_SELECTOR, cards)]
    wait.until(lambda d: points(d) == [len(children)] * 2)  # both charts plot a point per trial
    browser.save_screenshot(str(sweep / "parent_metrics.png"))

    for child in children:  # each child's Overview lists its own metrics
        browser.get(printed_url.replace(parent_id, child.info.run_id))
        wait.until(lambda d, name=child.info.run_name: name in body() and "Metrics (" in body()
                   and all(k in body() for k in ("eval_accuracy", "eval_f1", "eval_loss")))
        assert "sweep/eval_accuracy" not in body()
