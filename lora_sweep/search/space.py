"""The YAML search space (Hydra's sweeper grammar) -> Optuna distributions -> concrete trials.

    lora.r: choice(4, 8, 16, 32)                  categorical (grid-able)
    lora.r: range(4, 64, step=4)                  int steps (grid-able)
    lora.lora_dropout: interval(0.0, 0.3)         float
    train.learning_rate: tag(log, interval(1e-5, 1e-3))
    lora.target_modules: choice(qkvo, [query, value])

Hydra ships the parser, so users write what they already write for Hydra's Optuna sweeper.
Conditional parameters and excluded combinations are declared beside the space (constraints.py).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from lora_sweep.search import constraints
from lora_sweep.config import Config, ConfigError, TrialSettings
from lora_sweep.search.constraints import Excluded

log = logging.getLogger("lora_sweep")

VARIANT = "variant"
_GRAMMAR = ("choice(a, b, ...), range(start, stop, step=s), interval(low, high) "
            "or tag(log, interval(low, high))")


@dataclass(frozen=True)
class Param:
    path: str
    distribution: BaseDistribution
    grid: tuple | None  # the values a grid visits (optuna-encoded), None if continuous

    def decode(self, value: Any) -> Any:
        # Optuna categoricals hold only scalars; list choices travel as JSON strings.
        if isinstance(value, str) and value.startswith("["):
            return tuple(json.loads(value))
        return value


@dataclass(frozen=True)
class Point:
    """A concrete trial: its settings, the sampled values and a human label."""

    settings: TrialSettings
    values: Mapping[str, Any]     # path -> decoded value, as sampled
    label: str


class SearchSpace:
    def __init__(self, config: Config):
        self.config = config
        params = {path: _parse(path, expr, config) for path, expr in config.space.items()}
        if "lora.lora_alpha" in params and "lora.alpha_ratio" in params:
            raise ConfigError("space.lora.lora_alpha and space.lora.alpha_ratio are both searched, but alpha_ratio "
                              "overrides lora_alpha (lora_alpha = alpha_ratio * r). Search one of them.")
        if "lora.r" in params and (config.base.lora.param_budget is not None or "lora.param_budget" in params):
            raise ConfigError(f"lora.param_budget={config.base.lora.param_budget} sets r (the largest rank within "
                              f"the budget), so space.lora.r cannot be searched with it. Search lora.r with "
                              f"lora.param_budget=null, or drop space.lora.r.")
        self.conditions, self.exclusions = constraints.parse(config, _known_paths(config))
        # Parameters whose requirement this machine lacks leave the space (the base value is used).
        self.dropped: dict[str, str] = {}
        for path, cond in self.conditions.items():
            missing = [r for r in cond.requires if not constraints.environment_has(r)]
            if missing:
                self.dropped[path] = (f"{path} is searched only where {' and '.join(missing)} is available; "
                                      f"here it stays at {_current(config.base, path)!r}")
        # Unconditional parameters first, so that conditions can read them.
        order = sorted((p for p in params if p not in self.dropped), key=lambda p: p in self.conditions)
        self.params: dict[str, Param] = {p: params[p] for p in order}
        # study.tune: candidates within each configuration, searched last (a grid lists an arm's candidates together)
        self.tuned: dict[str, Param] = {path: _tuned(path, expr, config) for path, expr in (config.study.tune or {}).items()}
        self.params.update(self.tuned)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def is_grid(self) -> bool:
        return all(p.grid is not None for p in self.params.values())

    def grid(self) -> dict[str, list]:
        """GridSampler's search space; only for grid-able spaces."""
        return {path: list(p.grid) for path, p in self.params.items()}

    def grid_size(self) -> int:
        return math.prod(len(p.grid) for p in self.params.values()) if self.is_grid else 0

    def suggest(self, trial: optuna.Trial) -> Point:
        """Sample a point; raises Excluded (the rule's message) for a combination that cannot run."""
        values = {}
        for path, p in self.params.items():
            cond = self.conditions.get(path)
            if cond is not None and not constraints.matches(cond.when, values, self.config.base):
                continue  # inactive here: the base value applies, and the sampler never sees it
            values[path] = p.decode(_suggest(trial, path, p.distribution))
        point = self.point(values)
        rule = constraints.excluded(self.exclusions, values, point.settings)
        if rule is not None:
            raise Excluded(f"{point.label}: {rule.message} (exclude.{rule.name})")
        return point

    def point(self, values: Mapping[str, Any]) -> Point:
        """Apply sampled values to the base settings (a variant first, then plain paths)."""
        overrides: dict[str, Any] = {}
        label_parts = []
        if VARIANT in values:
            variant = self.config.variants[values[VARIANT]]
            overrides.update(variant.overrides)
            label_parts.append(variant.label)
        for path, value in values.items():
            if path != VARIANT:
                overrides[path] = value
                label_parts.append(f"{path.split('.')[-1]}={_show(value)}")
        settings = self.config.base.with_overrides(overrides)
        return Point(settings=settings, values=dict(values), label=", ".join(label_parts) or "base")

    def corner_points(self) -> list[Point]:
        """Every choice and both ends of every range, each on the base: validating these before
        any training catches a bad value wherever it hides in the space."""
        points = [self.point({})]
        for path, p in self.params.items():
            if p.grid is not None:
                candidates = [p.decode(v) for v in p.grid]
            else:
                d = p.distribution
                candidates = [d.low, d.high]
            points += [self.point({path: v}) for v in candidates]
        return [p for p in points if constraints.excluded(self.exclusions, p.values, p.settings) is None]


def _known_paths(config: Config) -> set[str]:
    groups = ("model", "data", "lora", "train")
    return {VARIANT} | {f"{g}.{k}" for g in groups for k in vars(getattr(config.base, g))}


def _tuned(path: str, expr, config: Config) -> Param:
    where = f"study.tune.{path}"
    if path in config.space:
        raise ConfigError(f"{where}={expr!r}: {path} is also searched in space.{path}={config.space[path]!r}; a "
                          f"parameter is either a configuration's (space) or tuned within each one (study.tune).")
    if path == VARIANT:
        raise ConfigError(f"{where}: variants are configurations; search them in space.variant.")
    p = _parse(path, str(expr), config, where)
    if p.grid is None or len(p.grid) < 2:
        raise ConfigError(f"{where}={expr!r}: study.tune takes choice(a, b, ...) or range(...) with at least two "
                          f"candidates (each configuration races them).")
    return p


def _parse(path: str, expr: str, config: Config, where: str | None = None) -> Param:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException

    where = where or f"space.{path}"
    _check_path(path, config, where)
    try:
        override = OverridesParser.create().parse_override(f"{path}={expr}")
        value = override.value()
    except HydraException as e:
        raise ConfigError(f"{where}: cannot parse {expr!r} ({e}). Write {_GRAMMAR}.") from None
    if not override.is_sweep_override():
        raise ConfigError(f"{where}={expr!r} is a single value, not a search space: set {path}={expr} "
                          f"instead, or write {_GRAMMAR}.")
    if isinstance(value, ChoiceSweep):
        choices = [_encode(v) for v in value.list]
        if len(set(choices)) != len(choices):
            raise ConfigError(f"{where}: {expr!r} repeats a choice; each must be distinct.")
        if path == VARIANT:
            unknown = [c for c in choices if c not in config.variants]
            if unknown:
                raise ConfigError(f"{where}: unknown variant(s) {unknown}; defined: "
                                  f"{sorted(config.variants) or 'none (add a variants: section)'}.")
        return Param(path, CategoricalDistribution(choices), tuple(choices))
    if path == VARIANT:
        raise ConfigError(f"{where}: variants are names; use choice(name, ...), not {expr!r}.")
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if step is None or step <= 0 or stop <= start:
            raise ConfigError(f"{where}: {expr!r} is empty; range(start, stop, step=s) needs "
                              f"start < stop and step > 0.")
        if all(isinstance(x, int) for x in (start, stop, step)):
            grid = tuple(range(start, stop, step))
            return Param(path, IntDistribution(grid[0], grid[-1], step=step), grid)
        n = int(math.floor((stop - start) / step - 1e-9)) + 1
        grid = tuple(round(start + i * step, 12) for i in range(n))
        return Param(path, FloatDistribution(grid[0], grid[-1], step=step), grid)
    if isinstance(value, IntervalSweep):
        low, high, tags = value.start, value.end, value.tags or set()
        unknown_tags = sorted(set(tags) - {"log", "int"})
        if unknown_tags:
            raise ConfigError(f"{where}: {expr!r} has unknown tag(s) {unknown_tags}; interval(...) takes "
                              f"tag(log, ...) and/or tag(int, ...).")
        if not low < high:
            raise ConfigError(f"{where}: {expr!r} needs low < high, but got low={low}, high={high}.")
        log = "log" in tags
        if log and low <= 0:
            raise ConfigError(f"{where}: {expr!r} is log-scaled, so low must be > 0, but got {low}.")
        if "int" in tags:
            return Param(path, IntDistribution(int(low), int(high), log=log), None)
        return Param(path, FloatDistribution(float(low), float(high), log=log), None)
    raise ConfigError(f"{where}: {expr!r} is not supported; write {_GRAMMAR}.")


def _check_path(path: str, config: Config, where: str | None = None) -> None:
    if path == VARIANT:
        return
    try:
        config.base.with_overrides({path: _current(config.base, path)})
    except (ConfigError, AttributeError):
        groups = ("model", "data", "lora", "train")
        allowed = [f"{g}.{k}" for g in groups for k in vars(getattr(config.base, g))]
        raise ConfigError(f"{where or f'space.{path}'}: unknown parameter path {path!r}. Allowed: variant, "
                          + ", ".join(allowed) + ".") from None


def _suggest(trial: optuna.Trial, path: str, d: BaseDistribution) -> Any:
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(path, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(path, d.low, d.high, step=d.step, log=d.log)
    return trial.suggest_float(path, d.low, d.high, step=d.step, log=d.log)


def _current(settings: TrialSettings, path: str) -> Any:
    group, _, key = path.partition(".")
    return getattr(getattr(settings, group), key)


def _encode(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return value


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
