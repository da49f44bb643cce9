"""`python -m lora_sweep ui sweep=NAME`: the MLflow UI on the sweep's tracking store, on 127.0.0.1
(ui.port, or a free port), until Ctrl-C; prints the parent run's URL in the model-training view.
On a tracking server (tracking.uri=http://...) it prints the URL there and starts nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from lora_sweep import record
from lora_sweep.config import Config, ConfigError
from lora_sweep.config.urls import redact

HOST = "127.0.0.1"


def parent_run(config: Config):
    """(tracker, parent run id) of a sweep that ran; a ConfigError naming the sweep otherwise."""
    from lora_sweep.report.table import check_exists
    from lora_sweep.search.study import load_stored
    from lora_sweep.tracking import Tracker

    name = config.study.name
    check_exists(config)
    config, study = load_stored(config)  # the sweep's own settings (its experiment name), where stored
    parent = record.parent_run_id(study)
    if parent is None:
        raise ConfigError(f"sweep={name}: no trial of this sweep has started, so it has no MLflow run; "
                          f"run it: python -m lora_sweep +sweep={name}")
    tracker = Tracker(config.tracking_uri, config.experiment_name)
    try:
        tracker.client.get_run(parent)
    except Exception:
        raise ConfigError(f"sweep={name}: its MLflow run {parent} is not in tracking.uri="
                          f"{redact(config.tracking_uri)}; point tracking.uri at the store the sweep used") from None
    return tracker, parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _check_port(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            raise ConfigError(f"ui.port={port}: already in use on {HOST}; give another port, or ui.port=null "
                              f"(a free one)") from None


def serve_ui(config: Config, ready_timeout_s: float = 180) -> int:
    from lora_sweep.tracking import ui_base

    tracker, parent = parent_run(config)
    base = ui_base(config.tracking_uri)
    if base is not None:  # a tracking server is its own UI
        print(redact(f"MLflow: {tracker.experiment_url(base, parent)}"), flush=True)
        return 0
    port = config.ui.port
    if port is None:
        port = free_port()
    else:
        _check_port(port)
    log_path = config.study_dir / "mlflow_ui.log"
    base = f"http://{HOST}:{port}"
    # One worker and no job runner (GenAI evaluation jobs, trace rollups: nothing a sweep logs): on a
    # laptop the UI is up in seconds instead of forking a dozen processes.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
                                                                              "false")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", config.tracking_uri,
                                 "--host", HOST, "--port", str(port), "--workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    # SIGINT too: a shell starts a background job with SIGINT ignored, and `kill -INT` must still stop it.
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        _wait_ready(proc, base, log_path, ready_timeout_s)
        print(f"MLflow UI of sweep {config.study.name!r} (Ctrl-C stops it):\n"
              f"  {tracker.experiment_url(base, parent)}", flush=True)
        proc.wait()
        raise ConfigError(f"ui.port={port}: the MLflow UI stopped by itself (exit {proc.returncode}); "
                          f"see {log_path}")
    except KeyboardInterrupt:
        return 0
    finally:
        for signum in previous:  # a second Ctrl-C must not cut the server's shutdown short
            signal.signal(signum, signal.SIG_IGN)
        _stop(proc)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _wait_ready(proc, base: str, log_path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise ConfigError(f"ui.port={base.rsplit(':', 1)[1]}: the MLflow UI did not start (exit "
                              f"{proc.returncode}); see {log_path}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ConfigError(f"ui.port={base.rsplit(':', 1)[1]}: the MLflow UI did not answer within "
                              f"{timeout_s:.0f} s; see {log_path}")
        time.sleep(0.5)


def _stop(proc) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
