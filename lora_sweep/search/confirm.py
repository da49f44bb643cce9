"""The confirmation stage's plan: which configurations, which seeds, in which companion study.

study.confirm = {top_k: K, seeds: S} re-trains the K best configurations of a finished search, and
the one it recommends on one seed where that is another (often a cheaper one the search could not
tell from the best), until each has S seeds (the search's own run, at train.seed, is the first). The runs live in a
companion Optuna study on the same storage (`<name>.confirm`), so they never feed the search's
sampler, its budgets, its grid resume or its best trial. Each run is a queued (WAITING) trial
whose params are the search trial's plus `train.seed`: any number of workers pop them, and a
restarted sweep queues only what is neither done nor in flight.
"""

from __future__ import annotations

import dataclasses
import json
import math

import optuna
from optuna.trial import TrialState

from lora_sweep.config import Config, ConfigError
from lora_sweep.record import TrialRecord
from lora_sweep.search.space import SearchSpace

STAGE = "confirm"
SEED = "train.seed"
DONE = (TrialState.COMPLETE,)
PENDING = (TrialState.WAITING, TrialState.RUNNING)


def enabled(config: Config) -> bool:
    return config.study.confirm_top_k > 0


def study_name(config: Config) -> str:
    return f"{config.study.name}.{STAGE}"


def seeds(config: Config) -> list[int]:
    """The seeds each confirmed configuration runs under, the search's own first; the others come
    from study.confirm.seed_list, else 1, 2, 3, ... (skipping the search's)."""
    own = config.base.train.seed
    pool = (config.study.confirm or {}).get("seed_list") or range(1, 1000)
    return [own, *[s for s in pool if s != own][:config.study.confirm_seeds - 1]]


def key(params: dict, tuned=()) -> str:
    """A configuration's identity: its searched values, the seed left out (and the `tuned` paths, study.tune's:
    without them, the key of the arm whose candidates they are)."""
    return json.dumps({k: v for k, v in sorted(params.items()) if k != SEED and k not in tuned}, default=str)


def _tune_order(t, tuned) -> tuple:
    """Where a trial's tuned values stand in study.tune's lists: a tie between candidates goes to the first,
    as the report's choice (report/arms.py) does."""
    out = []
    for path in tuned:
        dist, value = t.distributions.get(path), t.params.get(path)
        choices = getattr(dist, "choices", ())
        out.append(choices.index(value) if value in choices else len(choices))
    return tuple(out)


def top_trials(config: Config, study: optuna.Study, also: tuple = ()) -> list:
    """The search's best complete trials, one per configuration, best first (ties: fewer
    trainable parameters, then the earlier trial); at most study.confirm.top_k of them, then the
    trials numbered in `also` (the search's own recommendation) where not among them already. With
    study.tune a configuration is an arm: its trial here is its best candidate's (the one the report
    chose on validation; a tie to the candidate study.tune lists first), re-run as it was."""
    sign = 1 if config.study.direction == "maximize" else -1
    tuned = config.study.tuned_paths
    ranked = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rec = TrialRecord.from_trial(t)
        value = rec.figure(config.study.metric)
        if rec.stage or math.isnan(value):
            continue
        params = rec.trainable_params if rec.trainable_params is not None else math.inf
        ranked.append(((-sign * value, params, _tune_order(t, tuned), t.number), t))
    out, seen = [], set()
    for _, t in sorted(ranked, key=lambda x: x[0]):
        if key(t.params, tuned) not in seen:
            seen.add(key(t.params, tuned))
            out.append(t)
    out = out[:config.study.confirm_top_k]
    return out + [study.trials[n] for n in also
                  if key(study.trials[n].params, tuned) not in {key(t.params, tuned) for t in out}]


def stage_config(config: Config) -> Config:
    """The configuration the confirmation runs are made with: the companion study on the same
    storage, its space the search's plus the seed, nothing sampled (every run is queued). study.tune's
    paths join its space: each run repeats its search trial's chosen candidate, raced no more."""
    if SEED in config.space:
        raise ConfigError(f"study.confirm re-trains under the seeds it chooses, but space.{SEED}="
                          f"{config.space[SEED]!r} searches the seed already. Drop one of them.")
    values = ", ".join(map(str, seeds(config)))
    study = dataclasses.replace(config.study, name=study_name(config), storage=config.storage_url,
                                sampler="random", sampler_args=None, pruner="none", pruner_args=None,
                                n_trials=None, budget_s=None, warm_start=(), confirm=None, tune=None, race=False)
    tuned = {path: str(expr) for path, expr in (config.study.tune or {}).items()}
    return dataclasses.replace(config, study=study, space={**config.space, **tuned, SEED: f"choice({values})"})


def stage_space(config: Config) -> SearchSpace:
    return SearchSpace(stage_config(config))


def search_busy(study: optuna.Study) -> list[int]:
    """Search trials still queued or running (other workers): the top-k is not final until they end."""
    return [t.number for t in study.get_trials(deepcopy=False, states=PENDING)]


def load_stage(search: optuna.Study):
    """The search's companion study (same storage), or None when no confirmation has started."""
    try:
        return optuna.load_study(study_name=f"{search.study_name}.{STAGE}", storage=search._storage)
    except KeyError:
        return None


def plan(config: Config, search: optuna.Study, stage: optuna.Study, also: tuple = ()) -> int:
    """Queue every (configuration, seed) run that is neither done nor queued or running (failed
    runs are queued again); returns how many runs wait. Call it under storage.study_lock."""
    def held(states):
        return {(key(t.system_attrs.get("fixed_params") or t.params),
                 (t.system_attrs.get("fixed_params") or t.params).get(SEED))
                for t in stage.get_trials(deepcopy=False, states=states)}

    have = held(DONE) | held(PENDING)
    for t in top_trials(config, search, also):
        for seed in seeds(config)[1:]:
            if (key(t.params), seed) not in have:
                stage.enqueue_trial({**t.params, SEED: seed},
                                    user_attrs=TrialRecord(stage=STAGE, confirms=t.number).to_user_attrs())
                have.add((key(t.params), seed))
    return len(stage.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
