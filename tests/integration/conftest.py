"""Fixtures for the scale-out tests: one `mlflow server` per session, a fresh database per test."""

from __future__ import annotations

import pytest

from services import fresh_database, mlflow_server


@pytest.fixture(scope="session")
def mlflow_url(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture
def study_db():
    with fresh_database() as name:
        yield name
