"""Optuna study on real SQLite storage: samplers/pruners from config, resume-aware trial budgets."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from lora_sweep.config import ConfigError
from lora_sweep.search.space import SearchSpace
from lora_sweep.search.study import DEFAULT_N_TRIALS, create_study, load_study, resume, trials_to_run

optuna.logging.set_verbosity(optuna.logging.ERROR)

GRID3 = {"lora.r": "choice(4,8,16)"}


def _objective(space):
    return lambda trial: space.suggest(trial) and 0.5


def test_grid_budget_counts_completed_trials_and_resumes(make_config, tmp_path):
    config = make_config(GRID3, study={"name": "grid3"})
    space = SearchSpace(config)
    study = create_study(config, space)
    assert config.storage_url == f"sqlite:///{tmp_path / 'sweeps' / 'grid3' / 'study.db'}"
    assert (tmp_path / "sweeps" / "grid3" / "study.db").is_file()
    assert isinstance(study.sampler, optuna.samplers.GridSampler)
    assert trials_to_run(config, space, study) == 3

    study.optimize(_objective(space), n_trials=2)
    assert trials_to_run(config, space, study) == 1

    study.optimize(_objective(space), n_trials=1)
    assert trials_to_run(config, space, study) == 0
    assert sorted(t.params["lora.r"] for t in study.trials) == [4, 8, 16]  # each grid point once

    # A new worker (a re-run of the same command) loads the stored study and keeps the count.
    again = create_study(config, SearchSpace(config))
    assert len(again.trials) == 3
    assert trials_to_run(config, space, again) == 0


def test_resumed_grid_runs_only_what_is_left(make_config):
    config = make_config(GRID3, study={"name": "resume"})
    space = SearchSpace(config)
    create_study(config, space).optimize(_objective(space), n_trials=2)

    study = create_study(config, SearchSpace(config))
    n = resume(config, space, study)
    assert n == 1
    study.optimize(_objective(space), n_trials=n)
    assert sorted(t.params["lora.r"] for t in study.trials) == [4, 8, 16]


def test_n_trials_caps_a_grid(make_config):
    config = make_config(GRID3, study={"name": "capped", "n_trials": 2})
    space = SearchSpace(config)
    study = create_study(config, space)
    assert trials_to_run(config, space, study) == 2
    study.optimize(_objective(space), n_trials=2)
    assert trials_to_run(config, space, study) == 0


def test_empty_space_is_one_trial_of_the_base(make_config):
    config = make_config({}, study={"name": "base"})
    space = SearchSpace(config)
    study = create_study(config, space)
    assert (space.is_grid, space.grid_size()) == (True, 1)
    assert trials_to_run(config, space, study) == 1
    study.optimize(_objective(space), n_trials=1)
    assert trials_to_run(config, space, study) == 0


def test_non_grid_budget_is_n_trials_in_total(make_config):
    space_def = {"lora.lora_dropout": "interval(0.0,0.3)"}
    config = make_config(space_def, study={"name": "random5", "sampler": "random", "n_trials": 5})
    space = SearchSpace(config)
    study = create_study(config, space)
    assert isinstance(study.sampler, optuna.samplers.RandomSampler)
    assert trials_to_run(config, space, study) == 5
    study.optimize(_objective(space), n_trials=2)
    assert trials_to_run(config, space, create_study(config, space)) == 3

    default = make_config(space_def, study={"name": "tpe-default"})
    assert trials_to_run(default, SearchSpace(default), create_study(default, SearchSpace(default))) \
        == DEFAULT_N_TRIALS


def test_pruned_trials_count_as_done_and_failed_ones_do_not(make_config):
    config = make_config({"lora.lora_dropout": "interval(0.0,0.3)"},
                         study={"name": "states", "sampler": "random", "n_trials": 4})
    space = SearchSpace(config)
    study = create_study(config, space)
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        trial = study.ask()
        space.suggest(trial)
        study.tell(trial, 0.5 if state == TrialState.COMPLETE else None, state=state)
    assert trials_to_run(config, space, study) == 2  # 4 - (1 complete + 1 pruned)


def test_sampler_pruner_and_direction_come_from_config(make_config):
    config = make_config(GRID3, study={"name": "tpe-median", "sampler": "tpe", "pruner": "median",
                                       "direction": "minimize", "metric": "eval_loss"})
    study = create_study(config, SearchSpace(config))
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE


def test_load_study_without_a_stored_study_says_run_it_first(make_config):
    stored = make_config(GRID3, study={"name": "stored"})
    create_study(stored, SearchSpace(stored))
    other = make_config(GRID3, study={"name": "other", "storage": stored.storage_url})
    with pytest.raises(ConfigError, match=r"No stored study named 'other'.*Run the sweep first"):
        load_study(other)
    assert load_study(stored).study_name == "stored"


def test_a_failed_grid_point_is_retried_on_resume(make_config):
    config = make_config(GRID3, study={"name": "retry"})
    space = SearchSpace(config)

    def first_run(trial):
        point = space.suggest(trial)
        if trial.number == 1:
            raise RuntimeError("this point fails once")
        return 0.5

    study = create_study(config, space)
    study.optimize(first_run, n_trials=3, catch=(RuntimeError,))
    failed_r = next(t.params["lora.r"] for t in study.trials if t.state == TrialState.FAIL)

    study = create_study(config, SearchSpace(config))
    n = resume(config, space, study)
    assert n == 1
    study.optimize(_objective(space), n_trials=n)
    done = sorted(t.params["lora.r"] for t in study.trials if t.state == TrialState.COMPLETE)
    assert failed_r in done
    assert done == [4, 8, 16]
