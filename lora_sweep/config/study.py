"""The study's settings: how trials are searched, scheduled, budgeted and confirmed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from lora_sweep.config.checks import _is_number, _one_of, _positive_int, _require
from lora_sweep.config.names import (COST_OBJECTIVES, DIRECTIONS, METRIC_DIRECTIONS, PRUNER_NAMES,
                                     SAMPLER_NAMES)
from lora_sweep.config.urls import check_url


@dataclass(frozen=True)
class StudyConfig:
    name: str = "single"
    storage: str | None = None
    sampler: str = "auto"
    sampler_args: Mapping[str, Any] | None = None  # keyword arguments of the Optuna sampler
    pruner: str = "none"
    pruner_args: Mapping[str, Any] | None = None   # keyword arguments of the Optuna pruner
    n_trials: int | None = None
    timeout: float | None = None
    budget_s: float | None = None  # study-wide: total seconds of finished trials, all workers together
    metric: str = "eval_accuracy"
    direction: str = "auto"        # auto: the metric's natural direction
    also_minimize: tuple = ()      # multi-objective: any of trainable_pct, peak_memory_mb, epoch_time_s
    warm_start: tuple = ()         # points enqueued as the first trials: "recommended" or {path: value}
    seed: int = 42
    workers: Any = 1                   # N local worker processes, or "auto" (one per visible GPU)
    trials_per_gpu: Any = 1            # trials run at once on each worker's device: N, or "auto" (as many as fit)
    heartbeat_interval: int = 60       # seconds between a running trial's heartbeats (RDB storages)
    grace_period: int | None = None    # seconds without a heartbeat before a trial counts as dead (null = 2x)
    max_retry: int = 3                 # how often a trial whose worker died is re-queued
    # After the search: re-train its top_k configurations until each has `seeds` seeds in all
    # (the search's own run counts as the first), {} = no confirmation stage.
    confirm: Mapping[str, Any] | None = None
    # Parameters tuned within each configuration ("arm") of the space, {path: "choice(a, b, ...)"}: each arm is
    # represented by its best candidate on validation (nuisance values, like the seed), never a configuration.
    tune: Mapping[str, Any] | None = None
    race: bool = True              # race an arm's candidates (successive halving on validation); false: all to the end
    race_eta: int = 3              # keep the best 1/race_eta of an arm's candidates at each rung

    @property
    def tuned_paths(self) -> tuple[str, ...]:
        return tuple(self.tune or {})

    @property
    def objectives(self) -> tuple[str, ...]:
        return (self.metric, *self.also_minimize)

    @property
    def directions(self) -> tuple[str, ...]:
        return (self.direction, *("minimize" for _ in self.also_minimize))

    @property
    def multi_objective(self) -> bool:
        return bool(self.also_minimize)

    def validate(self) -> None:
        _require(isinstance(self.name, str) and self.name and "/" not in self.name and self.name not in (".", ".."),
                 "study.name", self.name, "a non-empty name without '/' (it names folders)")
        _one_of("study.sampler", self.sampler, ("auto", *SAMPLER_NAMES))
        _one_of("study.pruner", self.pruner, PRUNER_NAMES)
        if self.n_trials is not None:
            _positive_int("study.n_trials", self.n_trials)
        if self.timeout is not None:
            _require(_is_number(self.timeout) and self.timeout > 0, "study.timeout", self.timeout,
                     "null or a number of seconds > 0")
        if self.budget_s is not None:
            _require(_is_number(self.budget_s) and self.budget_s > 0, "study.budget_s", self.budget_s,
                     "null or a number of seconds > 0 (trial time summed over all workers)")
        _one_of("study.metric", self.metric, tuple(METRIC_DIRECTIONS))
        _one_of("study.direction", self.direction, DIRECTIONS)
        natural = METRIC_DIRECTIONS[self.metric]
        _require(self.direction == natural, "study.direction", self.direction,
                 f"{natural} (or auto) for study.metric={self.metric}: the other way picks the worst trial")
        _require(isinstance(self.also_minimize, tuple) and len(set(self.also_minimize)) == len(self.also_minimize)
                 and all(o in COST_OBJECTIVES for o in self.also_minimize), "study.also_minimize",
                 list(self.also_minimize) if isinstance(self.also_minimize, tuple) else self.also_minimize,
                 "a list of distinct names from " + ", ".join(COST_OBJECTIVES))
        for name in ("sampler_args", "pruner_args"):
            value = getattr(self, name)
            _require(value is None or isinstance(value, Mapping), f"study.{name}", value,
                     f"null or a mapping of the {name.split('_')[0]}'s keyword arguments")
        if self.multi_objective:
            _require(self.pruner == "none", "study.pruner", self.pruner,
                     f"none when study.also_minimize is set: Optuna cannot prune multi-objective studies "
                     f"(Trial.report/should_prune are single-objective only). Drop the pruner, or drop "
                     f"study.also_minimize={list(self.also_minimize)} for a pruned single-objective search")
            _require(self.sampler != "cmaes", "study.sampler", self.sampler,
                     "grid, random, tpe, nsga2, qmc, gp or auto for a multi-objective study (Optuna's CMA-ES "
                     "optimises one objective)")
        _require(isinstance(self.warm_start, tuple) and all(
            w == "recommended" or isinstance(w, Mapping) for w in self.warm_start), "study.warm_start",
            self.warm_start, "a list whose items are `recommended` (seed 004's starting point) or mappings "
            "{parameter path: value}")
        _require(self.workers == "auto" or (isinstance(self.workers, int) and not isinstance(self.workers, bool)
                                            and self.workers >= 1),
                 "study.workers", self.workers, "an integer >= 1 or auto (one worker per visible GPU)")
        _require(self.trials_per_gpu == "auto" or (isinstance(self.trials_per_gpu, int) and self.trials_per_gpu >= 1
                                                   and not isinstance(self.trials_per_gpu, bool)),
                 "study.trials_per_gpu", self.trials_per_gpu,
                 "an integer >= 1 or auto (as many trials at once as the memory model says fit)")
        _positive_int("study.heartbeat_interval", self.heartbeat_interval)
        if self.grace_period is not None:
            _require(isinstance(self.grace_period, int) and self.grace_period > self.heartbeat_interval,
                     "study.grace_period", self.grace_period,
                     f"null or an integer number of seconds > study.heartbeat_interval ({self.heartbeat_interval})")
        _require(isinstance(self.max_retry, int) and not isinstance(self.max_retry, bool) and self.max_retry >= 0,
                 "study.max_retry", self.max_retry, "an integer >= 0")
        if self.storage is not None:
            check_url(self.storage, parallel=self.workers != 1)
        self._validate_confirm()
        self._validate_tune()

    @property
    def confirm_top_k(self) -> int:
        return int((self.confirm or {}).get("top_k", 0))

    @property
    def confirm_seeds(self) -> int:
        return int((self.confirm or {}).get("seeds", 3))

    def _validate_confirm(self) -> None:
        c = self.confirm
        allowed = "null or a mapping {top_k: K >= 2, seeds: S >= 2, seed_list: [S distinct integers]}"
        _require(c is None or isinstance(c, Mapping), "study.confirm", c, allowed)
        if not c:
            return
        unknown = sorted(set(c) - {"top_k", "seeds", "seed_list"})
        _require(not unknown, "study.confirm", dict(c), f"{allowed} (unknown: {', '.join(unknown)})")
        for key, low in (("top_k", 2), ("seeds", 2)):
            v = c.get(key, 3)
            _require(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"study.confirm.{key}", v,
                     f"an integer >= {low}" + (" (a winner needs a runner-up)" if key == "top_k" else
                                               " (seed noise needs two seeds at least)"))
        seeds = c.get("seed_list")
        if seeds is not None:
            _require(isinstance(seeds, tuple) and len(set(seeds)) == len(seeds) and len(seeds) >= self.confirm_seeds
                     and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
                     "study.confirm.seed_list", seeds,
                     f"null or a list of at least study.confirm.seeds={self.confirm_seeds} distinct integers")

    def _validate_tune(self) -> None:
        allowed = "null or a mapping {parameter path: \"choice(a, b, ...)\"}, e.g. {train.learning_rate: \"choice(3e-4, 1e-3, 3e-3)\"}"
        _require(self.tune is None or isinstance(self.tune, Mapping), "study.tune", self.tune, allowed)
        _require(isinstance(self.race, bool), "study.race", self.race,
                 "true (race each configuration's candidates) or false (train every candidate to the end)")
        _require(isinstance(self.race_eta, int) and not isinstance(self.race_eta, bool) and self.race_eta >= 2,
                 "study.race_eta", self.race_eta, "an integer >= 2 (keep the best 1/race_eta at each rung)")
        if not self.tune:
            return
        _require("train.seed" not in self.tune, "study.tune", dict(self.tune),
                 "parameters other than train.seed (seeds are repetitions: search them in space.train.seed)")
        _require(not self.multi_objective, "study.tune", dict(self.tune),
                 "null when study.also_minimize is set (an arm's best candidate is chosen on study.metric alone)")
        _require(self.pruner == "none", "study.pruner", self.pruner,
                 "none when study.tune is set (study.race races each configuration's candidates)")
