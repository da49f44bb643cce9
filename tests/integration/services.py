"""Real services for the scale-out tests: a fresh PostgreSQL database per test on 127.0.0.1:5432
and an `mlflow server` subprocess on a free loopback port (PostgreSQL backend store)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="test")
# The server trusts loopback connections, so any password works: it stands for a real secret
# that must never reach MLflow, logs or reports.
SECRET = "s3cret-Pa55word"
TINY = ["data.train_size=32", "data.eval_size=16", "data.test_size=16", "train.num_train_epochs=1", "data.max_length=32"]


def _admin(sql: str) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        conn = psycopg2.connect(connect_timeout=3, **PG_ADMIN)
    except psycopg2.OperationalError as e:
        if os.environ.get("CI") == "true":  # CI machines run PostgreSQL: a skip there would hide a failure
            pytest.fail(f"PostgreSQL not reachable at 127.0.0.1:5432 in CI ({e})")
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432 ({e})")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


@contextmanager
def fresh_database(prefix: str = "lora_sweep_test"):
    """CREATE DATABASE <prefix>_<random>; yields its name; drops it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    _admin(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def pg_url(db: str, password: str = SECRET) -> str:
    return f"postgresql://postgres:{password}@127.0.0.1:5432/{db}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_mlflow(backend_store_uri: str, log_path: Path, *extra: str, timeout_s: float = 180):
    """A real `mlflow server` on 127.0.0.1:<free port> over `backend_store_uri`; yields its URL once
    /health answers, and stops it (its own session: the server and its workers) afterwards."""
    port = free_port()
    log = open(log_path, "w")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_store_uri, *extra],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@contextmanager
def mlflow_server(tmp: Path):
    """`mlflow server` on loopback, its runs in a fresh PostgreSQL database."""
    with fresh_database("lora_sweep_mlflow") as db:
        with serve_mlflow(pg_url(db, ""), tmp / "mlflow-server.log",
                          "--artifacts-destination", str(tmp / "mlartifacts"), timeout_s=120) as url:
            yield url


def lora_sweep_cmd(tmp: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lora_sweep", *TINY, *args, f"paths.sweeps_dir={tmp / 'sweeps'}",
            f"paths.reports_dir={tmp / 'reports'}"]  # args after TINY: a test may override its sizes


def worker_env(**extra: str) -> dict:
    # One torch thread per worker: four workers on a 2-core machine must not oversubscribe it.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "", **extra}
