"""Where a study lives, and how workers share it safely.

- sqlite:///...      one worker (the default). A file lock makes a second process fail fast.
- journal:///PATH    Optuna's journal file: several workers on one machine (study.workers=N).
- postgresql://...   any number of workers on any number of hosts.

RDB storages (SQLite, PostgreSQL) run Optuna heartbeats: a trial whose worker died (SIGKILL,
power loss) is failed after study.grace_period and re-queued by RetryHeartbeatStaleTrialCallback. The
journal file has no heartbeats; its workers are all children of one launcher that holds the
study's lock, so a RUNNING trial found when that lock is taken is an orphan (see orphans_to_fail).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import warnings
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from lora_sweep.config import Config, ConfigError
from lora_sweep.config.urls import kind, redact

def journal_path(url: str) -> Path:
    return Path(urlsplit(url).path if url.startswith("journal://") else url[len("journal:"):])


def open_storage(config: Config):
    """An Optuna storage object for config.storage_url, heartbeats on where the storage has them."""
    import optuna

    url = config.storage_url
    if kind(url) == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if kind(url) == "sqlite":
        config.study_dir.mkdir(parents=True, exist_ok=True)
    s = config.study
    # Workers starting together on a fresh database would race to create Optuna's tables.
    schema_lock = _pg_lock(url, "lora-sweep/schema") if kind(url) == "postgresql" else contextlib.nullcontext()
    with schema_lock, warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=s.heartbeat_interval,
            grace_period=s.grace_period or 2 * s.heartbeat_interval,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=s.max_retry),
            # A server restart or a dropped connection must not kill a day-long sweep.
            engine_kwargs={"pool_pre_ping": True} if kind(url) == "postgresql" else None)


@contextlib.contextmanager
def study_lock(config: Config) -> Iterator[None]:
    """Serialise set-up steps (queueing the grid, creating the MLflow parent run) across workers:
    a PostgreSQL advisory lock for a shared database, a file lock for local storages."""
    url = config.storage_url
    if kind(url) == "postgresql":
        with _pg_lock(url, f"lora-sweep/{config.study.name}"):
            yield
        return
    config.study_dir.mkdir(parents=True, exist_ok=True)
    with open(config.study_dir / ".setup.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _pg_lock(url: str, name: str) -> Iterator[None]:
    """A PostgreSQL session-level advisory lock, held on its own connection."""
    import sqlalchemy

    key = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


class OwnerLock:
    """Exclusive ownership of a local (SQLite or journal) study by one process tree. Holding it
    means no other sweep process is running this study, so its RUNNING trials are orphans."""

    def __init__(self, config: Config):
        self.path = config.study_dir / ".owner.lock"
        self.config = config
        self._file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise ConfigError(
                f"Another lora-sweep process is running sweep {self.config.study.name!r} on "
                f"{redact(self.config.storage_url)}, which serves one process tree. Wait for it, or run "
                f"workers together with study.workers=N, or share the study through "
                f"study.storage=postgresql://user@host:5432/db.") from None

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def is_local(url: str) -> bool:
    return kind(url) in ("sqlite", "journal")
