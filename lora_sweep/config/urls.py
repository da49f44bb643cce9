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



class RedactFilter:
    """logging filter: passwords in URLs never reach a log line or file."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True
