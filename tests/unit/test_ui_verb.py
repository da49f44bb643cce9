"""`python -m lora_sweep ui sweep=NAME` for real: a tiny sweep, then the verb starts the MLflow UI on
its store and prints the parent run's URL; the server behind that URL answers the REST API with the
sweep's series; SIGINT stops the verb and its server, leaving no process behind."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_search_tiny import tiny_config  # noqa: F401
from test_trial_tiny import assets  # noqa: F401

from lora_sweep.run.sweep import run_sweep

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches")]

URL = re.compile(r"(http://127\.0\.0\.1:(\d+))/#/experiments/(\w+)/runs/(\w+)\S*$")


def _printed_url(proc, timeout_s: float) -> re.Match:
    """The URL line the verb prints once its server answers; fails with its output otherwise."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            seen.append(lines.get(timeout=0.5))
        except queue.Empty:
            continue
        found = URL.search(seen[-1].strip())
        if found:
            return found
    pytest.fail(f"no URL from `lora_sweep ui` within {timeout_s} s (exit {proc.poll()}):\n{''.join(seen)}")


def _get(base: str, path: str, **query) -> dict:
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}", timeout=10) as r:
        return json.load(r)


def _processes_on(port: int) -> list[str]:
    """Command lines of live processes started with --port <port> (the server and its workers)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in args and str(port).encode() in args:
            out.append(b" ".join(args).decode(errors="replace"))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find leftover processes")
@pytest.mark.slow  # ~30 s: a real MLflow UI server; CI runs it
def test_ui_verb_serves_the_parent_runs_series_and_stops_cleanly(tiny_config, tmp_path):  # noqa: F811
    from lora_sweep import record

    config = tiny_config({"lora.r": "choice(2, 4)"}, {"name": "rank", "sampler": "grid"},
                         train={"num_train_epochs": 1})
    study = run_sweep(config)
    parent = record.parent_run_id(study)
    accuracy = {t.number: t.user_attrs["eval_accuracy"] for t in study.trials}

    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_sweep", "ui", "sweep=rank", f"paths.sweeps_dir={config.paths.sweeps_dir}",
         f"paths.reports_dir={config.paths.reports_dir}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    port = None
    try:
        found = _printed_url(proc, timeout_s=120)
        base, port, run_id = found.group(1), int(found.group(2)), found.group(4)
        assert run_id == parent  # the parent run's page ...
        assert found.group(0).endswith("?workflowType=machine_learning")  # ... in the model-training view

        history = lambda key: [(m["step"], m["value"]) for m in  # noqa: E731
                               _get(base, "metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])]
        assert sorted(history("sweep/eval_accuracy")) == sorted(accuracy.items())
        assert sorted(history("sweep/best_eval_accuracy")) == [(0, accuracy[0]), (1, max(accuracy.values()))]
        keys = {m["key"] for m in _get(base, "runs/get", run_id=run_id)["run"]["data"]["metrics"]}
        assert {"recommended/eval_accuracy", "recommended/eval_accuracy_ci_low"} <= keys
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"`lora_sweep ui` did not stop within 30 s of SIGINT:\n{err}")
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err
    with pytest.raises(urllib.error.URLError):  # the server is gone with it ...
        urllib.request.urlopen(f"{base}/health", timeout=5)
    assert _processes_on(port) == []  # ... and so are its workers: no orphan
