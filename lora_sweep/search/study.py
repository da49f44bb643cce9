"""Optuna study: created or resumed on its storage; study-wide trial budgets; warm-start points
enqueued first; a grid handed out as a queue of WAITING trials."""

from __future__ import annotations

import itertools
import logging

import optuna
from optuna.trial import TrialState

from lora_sweep.config import Config, ConfigError
from lora_sweep import record
from lora_sweep.config.load import from_stored
from lora_sweep.record import TrialRecord, write_to_storage
from lora_sweep.search import race
from lora_sweep.search.space import SearchSpace
from lora_sweep.config.urls import redact
from lora_sweep.search.samplers import make_pruner, make_sampler, sampler_name
from lora_sweep.search.storage import open_storage


# seed 004's recommended starting point ("Start with r=16, alpha=32, all attention modules,
# dropout 0.1, bias none"), for study.warm_start: [recommended].
RECOMMENDED = {"lora.r": 16, "lora.lora_alpha": 32, "lora.alpha_ratio": 2.0, "lora.target_modules": "qkvo",
               "lora.lora_dropout": 0.1, "lora.bias": "none"}
DEFAULT_N_TRIALS = 20
log = logging.getLogger("lora_sweep")
# Trials in these states hold their grid point: a resumed grid skips them. Failed ones are retried.
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
PENDING = (TrialState.WAITING, TrialState.RUNNING)


def create_study(config: Config, space: SearchSpace) -> optuna.Study:
    """Create or load (resume) the study named by study.name on study.storage."""
    sampler = make_sampler(config, space)
    pruner = make_pruner(config, space)
    storage = open_storage(config)
    study = optuna.create_study(
        study_name=config.study.name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        directions=list(config.study.directions),
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != list(config.study.directions):
        raise ConfigError(f"The stored study {config.study.name!r} optimises "
                          f"{[d.name.lower() for d in study.directions]}, but this config asks for "
                          f"{list(config.study.directions)} (study.metric/study.also_minimize). Use another "
                          f"study.name, or delete {config.study_dir} to start over.")
    return study


def warm_start_points(config: Config, space: SearchSpace) -> list[dict]:
    """study.warm_start -> Optuna params for enqueue_trial. A point sets some searched parameters;
    the others take the base config's value (the rest of the starting point) where the space holds
    it, else the sampler picks. A value outside the space is an error, before any training."""
    from lora_sweep.search.space import _current, _encode

    out = []
    for i, item in enumerate(config.study.warm_start):
        point = RECOMMENDED if item == "recommended" else dict(item)
        unknown = [] if item == "recommended" else sorted(set(point) - set(space.params))
        if unknown:
            raise ConfigError(f"study.warm_start[{i}]: {', '.join(unknown)} not searched; a warm-start point "
                              f"sets searched parameters ({', '.join(space.params) or 'none'}).")
        params = {}
        for path, p in space.params.items():
            given = path in point
            value = _encode(point[path] if given else _current(config.base, path))
            inside = _inside(p.distribution, value)
            if inside is None and given:
                raise ConfigError(f"study.warm_start[{i}]: {path}={point[path]!r} is outside space.{path}="
                                  f"{config.space[path]!r}. Widen the space or change the warm-start point.")
            if inside is not None:
                params[path] = inside
        out.append(params)
    return out


def _inside(d, value):
    """The distribution's own spelling of value (2 for 2.0 in choice(1, 2)), or None if outside."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(d, optuna.distributions.CategoricalDistribution):
        for c in d.choices:
            if (c == value and type(c) is type(value)) or (number(c) and number(value) and c == value):
                return c
        return None
    if not number(value) or not d.low <= value <= d.high:
        return None
    if d.step is not None and abs((value - d.low) / d.step - round((value - d.low) / d.step)) > 1e-9:
        return None
    return value


def enqueue_warm_start(config: Config, space: SearchSpace, study: optuna.Study) -> int:
    """Enqueue the warm-start points once (a resumed or second worker does not add them again).
    Not for grids: a grid visits every point anyway, and Optuna's GridSampler does not count an
    enqueued trial as a visited grid point, so it would train that point twice."""
    if sampler_name(config, space) == "grid":
        return 0
    points = warm_start_points(config, space)
    for params in points:
        study.enqueue_trial(params, user_attrs=TrialRecord(warm_start=True).to_user_attrs(), skip_if_exists=True)
    return len(points)


def budget_callbacks(config: Config, space: SearchSpace) -> list:
    """Stop conditions that read the shared storage after every trial, so they hold study-wide
    with several workers: n_trials counts finished and in-flight trials of every worker
    (Optuna's MaxTrialsCallback), budget_s sums the durations of finished trials."""
    callbacks = []
    if sampler_name(config, space) != "grid" or config.study.n_trials is not None:
        limit = trials_budget(config, space)
        callbacks.append(optuna.study.MaxTrialsCallback(limit, states=(*DONE, TrialState.RUNNING)))
    if config.study.budget_s is not None:
        callbacks.append(TimeBudget(config.study.budget_s))
    return callbacks


class TimeBudget:
    """Stops the study once its finished trials took budget_s seconds in total (all workers)."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s

    def spent(self, study: optuna.Study) -> float:
        return sum((t.datetime_complete - t.datetime_start).total_seconds()
                   for t in study.get_trials(deepcopy=False, states=(*DONE, TrialState.FAIL))
                   if t.datetime_start and t.datetime_complete)

    def __call__(self, study: optuna.Study, trial) -> None:
        if self.spent(study) >= self.budget_s:
            study.stop()


def trials_to_run(config: Config, space: SearchSpace, study: optuna.Study) -> int:
    """How many trials this worker should start now. A grid counts what is already done, so a
    re-run resumes instead of repeating points; other samplers run study.n_trials in total."""
    if race.racing(config, space):
        return race.remaining(race.make_plan(config, space), study)
    done = len(study.get_trials(deepcopy=False, states=DONE))
    left = max(0, trials_budget(config, space) - done)
    if left and config.study.budget_s is not None and TimeBudget(config.study.budget_s).spent(study) \
            >= config.study.budget_s:
        return 0
    return left


def trials_budget(config: Config, space: SearchSpace) -> int:
    """Trials the whole study may finish (complete or pruned), all workers together."""
    if sampler_name(config, space) == "grid":
        return space.grid_size() if config.study.n_trials is None else min(config.study.n_trials,
                                                                           space.grid_size())
    return config.study.n_trials or DEFAULT_N_TRIALS


def resume(config: Config, space: SearchSpace, study: optuna.Study) -> int:
    """Prepare a (re)started sweep; returns how many trials to start. A grid is queued: every
    point that is neither done nor already queued or running becomes a WAITING trial (failed
    points included, so they are retried), and workers pop them one at a time (see QueueStudy).
    Call it under storage.study_lock when several workers may start at once. A race (study.tune) queues
    what its arms need now (search/race.py), failed runs included."""
    if race.racing(config, space):
        race.enqueue(race.make_plan(config, space), study, retry_failed=True)
    elif sampler_name(config, space) == "grid":
        def key(params: dict) -> tuple:
            return tuple(sorted(params.items()))

        def params_of(t) -> dict:
            return t.system_attrs.get("fixed_params") or t.params

        done = {key(t.params) for t in study.get_trials(deepcopy=False, states=DONE)}
        held = done | {key(params_of(t)) for t in study.get_trials(deepcopy=False, states=PENDING)}
        room = trials_to_run(config, space, study) - (len(held) - len(done))
        for params in grid_points(space):
            if room <= 0:
                break
            if key(params) not in held:
                study.enqueue_trial(params)
                held.add(key(params))
                room -= 1
    return trials_to_run(config, space, study)


def grid_points(space: SearchSpace) -> list[dict]:
    """Every grid point, in the order the space lists its values (r=4, 8, 16, 32)."""
    grid = space.grid()
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


class QueueEmpty(Exception):
    """No WAITING trial is left for this worker: the grid is fully handed out."""


class QueueStudy(optuna.Study):
    """A study whose ask() only hands out queued (WAITING) trials. Optuna pops a waiting trial
    atomically (a conditional update in RDB storages, an ordered log in the journal), so two
    workers never get the same grid point; where plain ask() would invent a new trial once the
    queue is empty (and GridSampler would then repeat a running point), this raises QueueEmpty.
    Overrides Optuna's private pop hook; tests/unit/test_storage.py and the 4-worker test guard it."""

    def _pop_waiting_trial_id(self) -> int | None:
        trial_id = super()._pop_waiting_trial_id()
        if trial_id is None:
            raise QueueEmpty()
        return trial_id


def queue_study(study: optuna.Study) -> QueueStudy:
    return QueueStudy(study_name=study.study_name, storage=study._storage, sampler=study.sampler,
                      pruner=study.pruner)


def fail_orphans(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials FAIL (their worker is gone: the caller holds the study's owner lock)."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        try:  # the reason first: a finished trial takes no more attributes
            write_to_storage(study._storage, t._trial_id, error="worker died mid-trial (found RUNNING "
                                                                "when its sweep started again)")
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                failed.append(t.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
    return failed


def fail_stale(study: optuna.Study) -> list[int]:
    """Trials whose worker stopped sending heartbeats (RDB storages): FAIL, and re-queued."""
    import warnings

    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return sorted({t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))} - before)


def load_study(config: Config) -> optuna.Study:
    """The stored study, for reports; a clear error if there is none."""
    try:
        return optuna.load_study(study_name=config.study.name, storage=open_storage(config))
    except KeyError:
        raise ConfigError(f"No stored study named {config.study.name!r} in {redact(config.storage_url)}. "
                          f"Run the sweep first (python -m lora_sweep +sweep={config.study.name}), "
                          f"or point study.storage at where it ran.") from None


def load_stored(config: Config) -> tuple[Config, optuna.Study]:
    """The stored study, and the config its sweep ran with (export, report, ui): the settings stored with
    the study, under this command line's output options and locations; a typed value of anything the
    trials computed from that differs is a ConfigError. A study stored before its settings were (no
    stored settings): this config as it is."""
    study = load_study(config)
    rebuilt, ignored = from_stored(config, record.settings(study))
    if ignored:
        log.warning("Not applied (%s reads sweep %s's stored settings): %s", config.mode, config.study.name,
                    ", ".join(ignored))
    return rebuilt, study
