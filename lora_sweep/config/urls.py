"""Storage and tracking URLs: which schemes work, and passwords kept out of every line we print."""

from __future__ import annotations

import re

from lora_sweep.config.checks import ConfigError

_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]*)(?P<at>@)", re.IGNORECASE)
_PASSWORD_KV = re.compile(r"(?P<head>\bpassword=)(?P<secret>[^&\s]+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Replace passwords in every URL (user:secret@host, ?password=secret) within text by ***."""
    text = _PASSWORD.sub(lambda m: m["head"] + "***" + m["at"], str(text))
    return _PASSWORD_KV.sub(lambda m: m["head"] + "***", text)


def kind(url: str) -> str:
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    return {"postgres": "postgresql"}.get(scheme, scheme)


def check_url(url: str, parallel: bool) -> None:
    allowed = "sqlite:///PATH (one worker), journal:///PATH or postgresql://user@host:5432/db"
    if not isinstance(url, str) or "://" not in url and not url.startswith("journal:"):
        raise ConfigError(f"study.storage must be {allowed}, but got study.storage={redact(str(url))!r}.")
    if kind(url) == "sqlite" and parallel:
        raise ConfigError(f"study.storage={redact(url)!r} is SQLite, which parallel workers corrupt or lock. "
                          f"With study.workers>1 leave study.storage=null (a journal file is used) or "
                          f"give postgresql://user@host:5432/db.")
    if kind(url) != "journal":
        check_database("study.storage", url, f"use {allowed}")


# What MLflow 3 tracking reads (mlflow.tracking._tracking_service.utils registers these stores): a
# local path or file: URI, a tracking server, Databricks, or a database through SQLAlchemy.
TRACKING_SCHEMES = ("file", "http", "https", "databricks", "databricks-uc", "uc")
TRACKING_DATABASES = ("postgresql", "mysql", "sqlite", "mssql")
_TRACKING_ALLOWED = ("a folder path, file:///PATH, http(s)://host:5000 (an MLflow server), databricks, "
                     "or a database: sqlite:///PATH, postgresql://user@host:5432/db, mysql://..., mssql://...")
# Drivers SQLAlchemy imports -> what to pip install.
_PIP_NAMES = {"MySQLdb": "mysqlclient", "psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary",
              "pymysql": "PyMySQL", "mysql": "mysql-connector-python", "asyncpg": "asyncpg", "pyodbc": "pyodbc",
              "pymssql": "pymssql", "oracledb": "oracledb", "pg8000": "pg8000"}


def check_tracking_uri(uri) -> None:
    """tracking.uri must name a store MLflow can open here (without opening it)."""
    from urllib.parse import urlsplit

    if not isinstance(uri, str) or not uri:
        raise ConfigError(f"tracking.uri={uri!r}: not a URI; use null (a SQLite store under paths.sweeps_dir) "
                          f"or {_TRACKING_ALLOWED}")
    scheme = urlsplit(uri).scheme.lower() if ":" in uri else ""
    if scheme == "" or scheme in TRACKING_SCHEMES or uri in ("databricks", "databricks-uc", "uc"):
        return
    if scheme.startswith(TRACKING_DATABASES):  # MLflow matches database schemes by prefix
        check_database("tracking.uri", uri, f"use {_TRACKING_ALLOWED}")
        return
    from importlib.metadata import entry_points

    if any(ep.name == scheme for ep in entry_points(group="mlflow.tracking_store")):  # an MLflow plugin
        return
    raise ConfigError(f"tracking.uri={redact(uri)}: MLflow has no tracking store for the scheme {scheme!r}; "
                      f"use {_TRACKING_ALLOWED}")


def check_database(field: str, url: str, allowed: str) -> None:
    """A SQLAlchemy database URL whose dialect and driver load here: SQLAlchemy's own dialect
    lookup and driver import, without connecting."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    shown = redact(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise ConfigError(f"{field}={shown}: not a database URL ({redact(str(e))}); {allowed}") from None
    try:
        dialect = parsed.get_dialect()
    except ArgumentError:  # NoSuchModuleError: no dialect (or driver) of that name
        backend, _, driver = parsed.drivername.partition("+")
        what = f"the driver {driver!r} of {backend}" if driver and _has_dialect(backend) else f"the scheme {backend!r}"
        raise ConfigError(f"{field}={shown}: SQLAlchemy knows no database for {what}; {allowed}") from None
    if getattr(dialect, "is_async", False):
        raise ConfigError(f"{field}={shown}: {dialect.driver} is an asyncio driver, which this store cannot "
                          f"use; name a synchronous one ({parsed.get_backend_name()}:// picks SQLAlchemy's "
                          f"default), or {allowed}")
    if kind(url) == "sqlite" and parsed.database and parsed.database != ":memory:" \
            and not parsed.database.startswith("file:"):
        from pathlib import Path

        folder = Path(parsed.database).expanduser().absolute().parent
        if not folder.is_dir():
            raise ConfigError(f"{field}={shown}: the folder {folder} of this SQLite file does not exist; "
                              f"create it first, or {allowed}")
    try:
        (dialect.import_dbapi if hasattr(dialect, "import_dbapi") else dialect.dbapi)()  # SQLAlchemy 2 / 1.4
    except ImportError as e:
        module = (getattr(e, "name", None) or "").split(".")[0] or str(e)
        pip = _PIP_NAMES.get(module, module)
        raise ConfigError(f"{field}={shown}: its database driver {module!r} ({parsed.get_backend_name()}+"
                          f"{dialect.driver}) is not installed; install it (pip install {pip}) or name an "
                          f"installed driver ({parsed.get_backend_name()}+DRIVER://...)") from None


def _has_dialect(backend: str) -> bool:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(f"{backend}://").get_dialect()
    except ArgumentError:
        return False
    return True



class RedactFilter:
    """logging filter: passwords in URLs never reach a log line or file."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True
