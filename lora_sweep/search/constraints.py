"""Conditional parts of a search space, declared in YAML next to `space:`.

    conditions:                        # a parameter is searched only where its condition holds
      model.load_in_4bit: {requires: cuda}          # QLoRA only where CUDA is present
      lora.use_rslora: {when: {lora.use_dora: false}}
    exclude:                           # combinations that cannot run: skipped with this message
      dora_mica:
        when: {lora.use_dora: true, lora.init_lora_weights: mica}
        message: peft cannot combine DoRA with another LoRA variant (MiCA init is one)

A `when` maps parameter paths to a value or a list of values (any of them matches); paths may be
searched or fixed in the base config. Alpha tied to r is not a condition: search `lora.alpha_ratio`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from lora_sweep.config import Config, ConfigError, TrialSettings

REQUIREMENTS = ("cuda",)


class Excluded(Exception):
    """A point of the space that an `exclude` rule forbids; the trial is skipped with the message."""


@dataclass(frozen=True)
class Condition:
    path: str
    when: Mapping[str, tuple]      # path -> allowed values
    requires: tuple[str, ...]      # environment features: cuda


@dataclass(frozen=True)
class Exclusion:
    name: str
    when: Mapping[str, tuple]
    message: str


def parse(config: Config, known_paths: set[str]) -> tuple[dict[str, Condition], list[Exclusion]]:
    conditions = {}
    for path, spec in config.conditions.items():
        where = f"conditions.{path}"
        if path not in config.space:
            raise ConfigError(f"{where}: {path!r} is not in space:, so there is nothing to make conditional. "
                              f"Searched: {', '.join(config.space) or 'nothing'}. A condition sits under a "
                              f"searched path: {{when: {{path: value(s)}}}} and/or {{requires: cuda}}.")
        if not isinstance(spec, Mapping) or not spec or set(spec) - {"when", "requires"}:
            raise ConfigError(f"{where} must be a mapping with `when: {{path: value(s)}}` and/or "
                              f"`requires: cuda`, but got {spec!r}.")
        requires = spec.get("requires") or ()
        requires = (requires,) if isinstance(requires, str) else tuple(requires)
        bad = [r for r in requires if r not in REQUIREMENTS]
        if bad:
            raise ConfigError(f"{where}.requires: unknown requirement(s) {bad}; allowed: {', '.join(REQUIREMENTS)}.")
        when = _when(f"{where}.when", spec.get("when"), known_paths, optional=True)
        if path in when:
            raise ConfigError(f"{where}.when: a parameter cannot depend on itself.")
        conditions[path] = Condition(path, when, requires)
    exclusions = []
    for name, spec in config.exclude.items():
        where = f"exclude.{name}"
        if not isinstance(spec, Mapping) or set(spec) - {"when", "message"} or "when" not in spec:
            raise ConfigError(f"{where} must be a mapping with `when: {{path: value(s)}}` and `message`, "
                              f"but got {spec!r}.")
        exclusions.append(Exclusion(name, _when(f"{where}.when", spec["when"], known_paths),
                                    str(spec.get("message") or f"excluded by {where}")))
    return conditions, exclusions


def _when(where: str, when: Any, known_paths: set[str], optional: bool = False) -> dict[str, tuple]:
    from lora_sweep.config import flatten

    if when is None and optional:
        return {}
    if not isinstance(when, Mapping) or not when:
        raise ConfigError(f"{where} must be a non-empty mapping {{parameter path: value or [values]}}, "
                          f"but got {when!r}.")
    out = {}
    for path, values in flatten(when).items():
        if path not in known_paths:
            raise ConfigError(f"{where}: unknown parameter path {path!r}. Allowed: {', '.join(sorted(known_paths))}.")
        out[path] = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    return out


def matches(when: Mapping[str, tuple], values: Mapping[str, Any], settings: TrialSettings | None) -> bool:
    """Does a point satisfy `when`? Sampled values first, then the base settings."""
    for path, allowed in when.items():
        if path in values:
            value = values[path]
        elif settings is not None:
            group, _, key = path.partition(".")
            value = getattr(getattr(settings, group), key)
        else:
            return False
        if not any(_same(value, a) for a in allowed):
            return False
    return True


def _same(value: Any, allowed: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(allowed, (list, tuple)):
        return list(value) == list(allowed)
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    return value == allowed


def excluded(exclusions: list[Exclusion], values: Mapping[str, Any], settings: TrialSettings) -> Exclusion | None:
    for rule in exclusions:
        if matches(rule.when, values, settings):
            return rule
    return None


def environment_has(requirement: str) -> bool:
    if requirement == "cuda":
        import torch

        return torch.cuda.is_available()
    return False
