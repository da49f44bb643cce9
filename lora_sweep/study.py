"""Optuna study: sampler, pruner and storage from config; resume-aware trial budgets."""

from __future__ import annotations

import warnings
from typing import Callable

import optuna
from optuna.trial import TrialState

from lora_sweep.config import Config, ConfigError
from lora_sweep.search_space import SearchSpace

# Names users write in study.sampler / study.pruner. Factories take (seed, space).
SAMPLERS: dict[str, Callable[[int, SearchSpace], optuna.samplers.BaseSampler]] = {
    "grid": lambda seed, space: optuna.samplers.GridSampler(space.grid(), seed=seed),
    "random": lambda seed, space: optuna.samplers.RandomSampler(seed=seed),
    "tpe": lambda seed, space: optuna.samplers.TPESampler(seed=seed),
    "nsga2": lambda seed, space: optuna.samplers.NSGAIISampler(seed=seed),
    "cmaes": lambda seed, space: optuna.samplers.CmaEsSampler(seed=seed),
    "qmc": lambda seed, space: optuna.samplers.QMCSampler(seed=seed),
    "gp": lambda seed, space: optuna.samplers.GPSampler(seed=seed),
}
PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    "percentile": lambda: optuna.pruners.PercentilePruner(25.0, n_startup_trials=2),
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}
DEFAULT_N_TRIALS = 20
# Trials in these states hold their grid point: a resumed grid skips them. Failed ones are retried.
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
PENDING = (TrialState.WAITING, TrialState.RUNNING)


def sampler_name(config: Config, space: SearchSpace) -> str:
    name = config.study.sampler
    if name == "auto":
        return "grid" if space.is_grid else "tpe"
    if name == "grid" and not space.is_grid:
        continuous = [p for p, v in space.params.items() if v.grid is None]
        raise ConfigError(f"study.sampler=grid needs choice(...) or range(...) for every parameter, but "
                          f"{', '.join(continuous)} use interval(...). Use study.sampler=tpe (or random), "
                          f"or make them choices.")
    return name


def create_study(config: Config, space: SearchSpace) -> optuna.Study:
    """Create or load (resume) the study named by study.name on study.storage."""
    name = sampler_name(config, space)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = SAMPLERS[name](config.study.seed, space)
        pruner = PRUNERS[config.study.pruner]()
    if config.study.storage is None:
        config.study_dir.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name=config.study.name,
        storage=config.storage_url,
        sampler=sampler,
        pruner=pruner,
        direction=config.study.direction,
        load_if_exists=True,
    )


def trials_to_run(config: Config, space: SearchSpace, study: optuna.Study) -> int:
    """How many trials this worker should start now. A grid counts what is already done, so a
    re-run resumes instead of repeating points; other samplers run study.n_trials in total."""
    done = len(study.get_trials(deepcopy=False, states=DONE))
    if sampler_name(config, space) == "grid":
        budget = space.grid_size() if config.study.n_trials is None else min(config.study.n_trials,
                                                                             space.grid_size())
    else:
        budget = config.study.n_trials or DEFAULT_N_TRIALS
    return max(0, budget - done)


def resume(config: Config, space: SearchSpace, study: optuna.Study) -> int:
    """Prepare a (re)started sweep; returns how many trials to start. GridSampler counts a failed
    point as visited, so failed grid points with no finished retry are queued again explicitly."""
    if sampler_name(config, space) == "grid":
        def key(params: dict) -> tuple:
            return tuple(sorted(params.items()))

        done = {key(t.params) for t in study.get_trials(deepcopy=False, states=DONE)}
        queued = {key(t.params) for t in study.get_trials(deepcopy=False, states=PENDING)}
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if t.params and key(t.params) not in done | queued:
                study.enqueue_trial(t.params)
                queued.add(key(t.params))
    return trials_to_run(config, space, study)


def load_study(config: Config) -> optuna.Study:
    """The stored study, for reports; a clear error if there is none."""
    try:
        return optuna.load_study(study_name=config.study.name, storage=config.storage_url)
    except KeyError:
        raise ConfigError(f"No stored study named {config.study.name!r} in {config.storage_url}. "
                          f"Run the sweep first (python -m lora_sweep +sweep={config.study.name}), "
                          f"or point study.storage at where it ran.") from None
