"""Names users write in study.sampler / study.pruner -> Optuna objects, with their arguments checked."""

from __future__ import annotations

import warnings
from typing import Callable

import optuna

from lora_sweep.config import Config, ConfigError
from lora_sweep.search.space import SearchSpace


class QueuedGridSampler(optuna.samplers.GridSampler):
    """GridSampler that leaves queued trials alone: a queued trial carries its grid point, and
    GridSampler.after_trial would look for a grid_id it never assigned (and stop the study when
    every point is merely running, which would end workers that could still pop retries)."""

    def after_trial(self, study, trial, state, values) -> None:
        if "grid_id" in trial.system_attrs:
            super().after_trial(study, trial, state, values)


# Names users write in study.sampler / study.pruner. Sampler factories take (seed, space, **sampler_args).
SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "grid": lambda seed, space, **kw: QueuedGridSampler(space.grid(), seed=seed, **kw),
    "random": lambda seed, space, **kw: optuna.samplers.RandomSampler(seed=seed, **kw),
    "tpe": lambda seed, space, **kw: optuna.samplers.TPESampler(seed=seed, **kw),
    "nsga2": lambda seed, space, **kw: optuna.samplers.NSGAIISampler(seed=seed, **kw),
    "cmaes": lambda seed, space, **kw: optuna.samplers.CmaEsSampler(seed=seed, **kw),
    "qmc": lambda seed, space, **kw: optuna.samplers.QMCSampler(seed=seed, **kw),
    "gp": lambda seed, space, **kw: optuna.samplers.GPSampler(seed=seed, **kw),
}
# Factories take study.pruner_args as keyword arguments (they override these defaults). A sweep
# has few trials, so the median/percentile pruners start judging after 2 complete ones.
PRUNERS: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": lambda **kw: optuna.pruners.MedianPruner(**{"n_startup_trials": 2, "n_warmup_steps": 0, **kw}),
    "percentile": lambda **kw: optuna.pruners.PercentilePruner(**{"percentile": 25.0, "n_startup_trials": 2,
                                                                 **kw}),
    "successive_halving": lambda **kw: optuna.pruners.SuccessiveHalvingPruner(**kw),
    "hyperband": lambda **kw: optuna.pruners.HyperbandPruner(**kw),
}
def sampler_name(config: Config, space: SearchSpace) -> str:
    name = config.study.sampler
    if space.tuned and (name not in ("auto", "grid") or not space.is_grid):
        raise ConfigError(f"study.tune ({', '.join(space.tuned)}) races each configuration's candidates over a grid, "
                          f"so it needs study.sampler=grid (or auto) and choice(...)/range(...) in space, but got "
                          f"study.sampler={name} over {', '.join(f'{k}={v}' for k, v in space.config.space.items())}. "
                          f"Search the tuned parameter in space instead, or make the space a grid.")
    if name == "auto":
        return "grid" if space.is_grid else "tpe"
    if name == "grid" and not space.is_grid:
        continuous = [p for p, v in space.params.items() if v.grid is None]
        raise ConfigError(f"study.sampler=grid needs choice(...) or range(...) for every parameter, but "
                          f"{', '.join(continuous)} use interval(...). Use study.sampler=tpe (or random), "
                          f"or make them choices.")
    return name


def make_pruner(config: Config, space: SearchSpace | None = None) -> optuna.pruners.BasePruner:
    """study.pruner's Optuna pruner; with study.tune raced (space given), the race's own pruner."""
    if space is not None and space.tuned and config.study.race:
        from lora_sweep.search.race import RacePruner, make_plan

        return RacePruner(make_plan(config, space))
    args = dict(config.study.pruner_args or {})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return PRUNERS[config.study.pruner](**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"study.pruner_args={args} do not fit study.pruner={config.study.pruner}: {e}. "
                          f"See optuna.pruners for its keyword arguments.") from None


def make_sampler(config: Config, space: SearchSpace) -> optuna.samplers.BaseSampler:
    name = sampler_name(config, space)
    args = dict(config.study.sampler_args or {})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = SAMPLERS[name](config.study.seed, space, **args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"study.sampler_args={args} do not fit study.sampler={name}: {e}. "
                          f"See optuna.samplers for its keyword arguments.") from None
    return sampler

