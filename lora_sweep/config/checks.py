"""The error every bad value raises, and the small checks that word it: field, value, what is allowed."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and what to do."""



def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 4}} and {'lora.r': 4} both -> {'lora.r': 4}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def flatten_paths(d: Mapping[str, Any]) -> dict[str, Any]:
    """Like flatten, but stops at a condition's own keys (when/requires): {'lora': {'r': {'when': ..}}}
    -> {'lora.r': {'when': ..}}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v and not set(v) & {"when", "requires"}:
            out.update({f"{k}.{kk}": vv for kk, vv in flatten_paths(v).items()})
        else:
            out[str(k)] = v
    return out



def _build(cls, values: Mapping[str, Any], group: str):
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"Unknown key(s) {', '.join(f'{group}.{k}' for k in unknown)}. "
                          f"Allowed in {group}: {', '.join(sorted(allowed))}.")
    missing = [f.name for f in fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"Missing required key(s) {', '.join(f'{group}.{k}' for k in missing)}.")
    return cls(**{k: _normalise(v) for k, v in values.items()})


def _normalise(value: Any) -> Any:
    # Lists become tuples so that configs are hashable (base models are cached per ModelConfig).
    if isinstance(value, list):
        return tuple(_normalise(v) for v in value)
    if isinstance(value, dict):  # warm-start points: {'lora': {'r': 16}} -> {'lora.r': 16}
        return {k: _normalise(v) for k, v in flatten(value).items()} if value else value
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _require(ok: Any, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {allowed}, but got {name}={value!r}.")


def _positive_int(name: str, value: Any) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
             "an integer > 0")


def _bool(name: str, value: Any) -> None:
    _require(isinstance(value, bool), name, value, "true or false")


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    _require(value in allowed, name, value, "one of " + ", ".join(map(str, allowed)))


def _codec(name: Any) -> bool:
    """Whether Python knows this text encoding (data.encoding)."""
    import codecs

    try:
        return bool(codecs.lookup(name))
    except (LookupError, TypeError):
        return False
