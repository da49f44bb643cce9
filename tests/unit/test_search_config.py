"""Samplers, pruners, conditions, exclusions, warm starts, budgets and multi-objective settings:
validated before any training, and working on real Optuna studies in SQLite (no training here)."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

from lora_sweep.report import pareto
from lora_sweep.config import ConfigError
from lora_sweep.search.constraints import Excluded
from lora_sweep.search.space import SearchSpace
from lora_sweep.search.samplers import PRUNERS, SAMPLERS
from lora_sweep.search.study import (TimeBudget, budget_callbacks, create_study, enqueue_warm_start,
                              trials_to_run, warm_start_points)

optuna.logging.set_verbosity(optuna.logging.ERROR)

MIXED = {"lora.r": "choice(4, 8, 16)", "lora.lora_dropout": "interval(0.0, 0.3)",
         "train.learning_rate": "tag(log, interval(1e-5, 1e-2))"}


def _sampled(space):
    return lambda trial: space.suggest(trial) and trial.params["lora.lora_dropout"]


# -- samplers and pruners ---------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"grid"}))
def test_every_sampler_runs_a_seeded_mixed_space(make_config, name):
    def run(study_name):
        config = make_config(MIXED, study={"name": study_name, "sampler": name, "seed": 7})
        space = SearchSpace(config)
        study = create_study(config, space)
        study.optimize(_sampled(space), n_trials=4)
        return [t.params for t in study.trials]

    first, again = run(f"{name}-a"), run(f"{name}-b")
    assert len(first) == 4 and all(set(p) == set(MIXED) for p in first)
    assert first == again  # seeded: the same command samples the same points


def test_auto_sampler_is_tpe_for_mixed_spaces_and_grid_for_choices(make_config):
    mixed = make_config(MIXED, study={"name": "auto-mixed"})
    assert isinstance(create_study(mixed, SearchSpace(mixed)).sampler, optuna.samplers.TPESampler)
    grid = make_config({"lora.r": "choice(4, 8)"}, study={"name": "auto-grid"})
    assert isinstance(create_study(grid, SearchSpace(grid)).sampler, optuna.samplers.GridSampler)


@pytest.mark.parametrize("name, cls", [("none", optuna.pruners.NopPruner), ("median", optuna.pruners.MedianPruner),
                                       ("percentile", optuna.pruners.PercentilePruner),
                                       ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
                                       ("hyperband", optuna.pruners.HyperbandPruner)])
def test_every_pruner_comes_from_config(make_config, name, cls):
    assert set(PRUNERS) == {"none", "median", "percentile", "successive_halving", "hyperband"}
    config = make_config(MIXED, study={"name": f"p-{name}", "pruner": name})
    assert isinstance(create_study(config, SearchSpace(config)).pruner, cls)


def test_pruner_and_sampler_args_reach_optuna(make_config):
    config = make_config(MIXED, study={"name": "args", "pruner": "median",
                                       "pruner_args": {"n_startup_trials": 5, "n_warmup_steps": 2},
                                       "sampler": "tpe", "sampler_args": {"n_startup_trials": 3}})
    study = create_study(config, SearchSpace(config))
    assert study.pruner._n_startup_trials == 5 and study.pruner._n_warmup_steps == 2
    assert study.sampler._n_startup_trials == 3


@pytest.mark.parametrize("study, message", [
    ({"sampler": "bayes"}, r"study.sampler must be one of auto, grid, random, tpe, nsga2, cmaes, qmc, gp, "
                           r"but got study.sampler='bayes'"),
    ({"pruner": "asha"}, r"study.pruner must be one of none, median, percentile, successive_halving, hyperband"),
    ({"metric": "accuracy"}, r"study.metric must be one of eval_accuracy, eval_f1, eval_loss"),
    ({"metric": "eval_loss", "direction": "maximize"}, r"study.direction must be minimize \(or auto\) for "
                                                       r"study.metric=eval_loss"),
    ({"also_minimize": ["memory"]}, r"study.also_minimize must be a list of distinct names from trainable_pct"),
    ({"also_minimize": ["trainable_pct"], "pruner": "median"}, r"Optuna cannot prune multi-objective studies"),
    ({"also_minimize": ["epoch_time_s"], "sampler": "cmaes"}, r"CMA-ES optimises one objective"),
    ({"budget_s": 0}, r"study.budget_s must be null or a number of seconds > 0"),
    ({"warm_start": ["guide"]}, r"study.warm_start must be a list whose items are `recommended`"),
    ({"pruner_args": 3}, r"study.pruner_args must be null or a mapping"),
])
def test_bad_study_settings_name_the_field(make_config, study, message):
    with pytest.raises(ConfigError, match=message):
        make_config(MIXED, study={"name": "bad", **study})


def test_wrong_sampler_or_pruner_args_are_config_errors(make_config):
    config = make_config(MIXED, study={"name": "x", "pruner": "median", "pruner_args": {"patience": 3}})
    with pytest.raises(ConfigError, match=r"study.pruner_args=\{'patience': 3\} do not fit study.pruner=median"):
        create_study(config, SearchSpace(config))
    config = make_config(MIXED, study={"name": "y", "sampler": "tpe", "sampler_args": {"n_startup": 3}})
    with pytest.raises(ConfigError, match=r"study.sampler_args=\{'n_startup': 3\} do not fit study.sampler=tpe"):
        create_study(config, SearchSpace(config))


def test_direction_follows_the_metric(make_config):
    loss = make_config(MIXED, study={"name": "loss", "metric": "eval_loss"})
    assert loss.study.direction == "minimize"
    f1 = make_config(MIXED, study={"name": "f1", "metric": "eval_f1"})
    assert f1.study.direction == "maximize"
    assert create_study(loss, SearchSpace(loss)).direction == optuna.study.StudyDirection.MINIMIZE


# -- conditions and exclusions ----------------------------------------------------------------

def test_a_conditional_parameter_is_sampled_only_where_its_condition_holds(make_config):
    config = make_config({"lora.use_dora": "choice(false, true)", "lora.use_rslora": "choice(false, true)"},
                         conditions={"lora.use_rslora": {"when": {"lora.use_dora": False}}},
                         study={"name": "cond", "sampler": "random", "seed": 1})
    space = SearchSpace(config)
    study = create_study(config, space)
    points = []
    study.optimize(lambda t: points.append(space.suggest(t)) or 0.0, n_trials=12)
    for point, trial in zip(points, study.trials):
        if point.values["lora.use_dora"]:
            assert "lora.use_rslora" not in trial.params and point.settings.lora.use_rslora is False
        else:
            assert "lora.use_rslora" in trial.params
    assert {p.values["lora.use_dora"] for p in points} == {False, True}


def test_requires_cuda_drops_the_parameter_without_cuda(make_config):
    config = make_config({"model.load_in_4bit": "choice(false, true)", "lora.r": "choice(4, 8)"},
                         conditions={"model": {"load_in_4bit": {"requires": "cuda"}}})
    space = SearchSpace(config)
    if torch.cuda.is_available():
        assert "model.load_in_4bit" in space.params and not space.dropped
    else:
        assert list(space.params) == ["lora.r"]
        assert "only where cuda is available" in space.dropped["model.load_in_4bit"]
        assert space.grid_size() == 2


def test_an_excluded_combination_raises_with_its_message(make_config):
    config = make_config({"lora.use_dora": "choice(true)", "lora.init_lora_weights": "choice(true, mica)"},
                         study={"name": "excl", "sampler": "grid"})
    space = SearchSpace(config)
    seen = {}

    def objective(trial):
        try:
            space.suggest(trial)
        except Excluded as e:
            seen[trial.params["lora.init_lora_weights"]] = str(e)
            raise optuna.TrialPruned() from None
        return 0.0

    create_study(config, space).optimize(objective, n_trials=2)
    assert list(seen) == ["mica"] and "DoRA" in seen["mica"] and "exclude.dora_mica" in seen["mica"]
    # the corners validated before training skip the excluded point too
    assert all(not (p.settings.lora.use_dora and p.settings.lora.init_lora_weights == "mica")
               for p in space.corner_points())


@pytest.mark.parametrize("kwargs, message", [
    ({"conditions": {"lora.bias": {"when": {"lora.r": 4}}}}, r"conditions.lora.bias: 'lora.bias' is not in space"),
    ({"conditions": {"lora.r": {"requires": "tpu"}}}, r"unknown requirement\(s\) \['tpu'\]; allowed: cuda"),
    ({"conditions": {"lora.r": {"when": {"lora.rank": 4}}}}, r"conditions.lora.r.when: unknown parameter path "
                                                              r"'lora.rank'"),
    ({"conditions": {"lora.r": {"if": {"lora.bias": "none"}}}}, r"'lora.r.if.lora.bias' is not in space.*"
                                                                r"\{when: \{path: value\(s\)\}\} and/or \{requires: cuda\}"),
    ({"conditions": {"lora.r": {"when": {"lora.bias": "none"}, "if": 1}}}, r"conditions.lora.r must be a mapping "
                                                                            r"with `when"),
    ({"exclude": {"bad": {"message": "no when"}}}, r"exclude.bad must be a mapping with `when"),
    ({"exclude": {"bad": {"when": {"lora.dora": True}}}}, r"exclude.bad.when: unknown parameter path 'lora.dora'"),
])
def test_malformed_conditions_name_what_is_wrong(make_config, kwargs, message):
    config = make_config({"lora.r": "choice(4, 8)"}, **kwargs)
    with pytest.raises(ConfigError, match=message):
        SearchSpace(config)


def test_alpha_ratio_is_searchable_and_excludes_searching_alpha_too(make_config):
    space = SearchSpace(make_config({"lora.r": "choice(4, 16)", "lora.alpha_ratio": "choice(1, 2)"}))
    point = space.point({"lora.r": 16, "lora.alpha_ratio": 2})
    assert point.settings.lora.effective_alpha == 32
    with pytest.raises(ConfigError, match=r"lora_alpha and space.lora.alpha_ratio are both searched"):
        SearchSpace(make_config({"lora.lora_alpha": "choice(8, 16)", "lora.alpha_ratio": "choice(1, 2)"}))


# -- warm start -------------------------------------------------------------------------------

def test_recommended_warm_start_runs_first_and_only_once(make_config):
    space_def = {"lora.r": "choice(4, 8, 16, 32)", "lora.lora_dropout": "interval(0.0, 0.3)",
                 "lora.target_modules": "choice(query, qkvo, all-linear)", "train.learning_rate":
                 "tag(log, interval(1e-5, 1e-2))"}
    config = make_config(space_def, study={"name": "warm", "sampler": "tpe", "warm_start": ["recommended"]})
    space = SearchSpace(config)
    study = create_study(config, space)
    assert enqueue_warm_start(config, space, study) == 1
    study.optimize(_sampled(space), n_trials=2)
    first = study.trials[0]
    assert first.params == {"lora.r": 16, "lora.lora_dropout": 0.1, "lora.target_modules": "qkvo",
                            "train.learning_rate": config.base.train.learning_rate}  # the rest: the base
    assert first.user_attrs["warm_start"] is True
    # a resumed (or second) worker does not enqueue it again
    enqueue_warm_start(config, space, create_study(config, space))
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 0


def test_a_warm_start_point_outside_the_space_is_an_error(make_config):
    config = make_config({"lora.r": "choice(4, 8)"}, study={"name": "w", "sampler": "tpe",
                                                           "warm_start": ["recommended"]})
    with pytest.raises(ConfigError, match=r"study.warm_start\[0\]: lora.r=16 is outside space.lora.r='choice\(4, ?8\)'"):
        warm_start_points(config, SearchSpace(config))
    config = make_config({"lora.r": "choice(4, 8)"}, study={"name": "w2", "sampler": "tpe",
                                                           "warm_start": [{"lora": {"bias": "all"}}]})
    with pytest.raises(ConfigError, match=r"study.warm_start\[0\]: lora.bias not searched"):
        warm_start_points(config, SearchSpace(config))


# -- budgets ----------------------------------------------------------------------------------

def test_n_trials_holds_across_concurrent_workers(make_config):
    """Two workers (separate Study objects on one SQLite file, as two processes would have), each
    told to run the whole budget: the study-wide callback stops both near the shared total."""
    config = make_config(MIXED, study={"name": "workers", "sampler": "random", "n_trials": 6})
    space = SearchSpace(config)
    create_study(config, space)

    def worker():
        study = create_study(config, SearchSpace(config))
        n = trials_to_run(config, space, study)
        study.optimize(lambda t: space.suggest(t) and time.sleep(0.05) or 0.0, n_trials=n,
                       callbacks=budget_callbacks(config, space))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = create_study(config, space).get_trials(states=(TrialState.COMPLETE,))
    # Without the callback each worker would run 6 (12 in all); with it at most one trial per other
    # worker can start in the instant between a check and its own new trial.
    assert 6 <= len(done) <= 7


def test_time_budget_stops_the_study_once_trial_seconds_add_up(make_config):
    config = make_config(MIXED, study={"name": "budget", "sampler": "random", "n_trials": 50, "budget_s": 1.5})
    space = SearchSpace(config)
    study = create_study(config, space)
    study.optimize(lambda t: space.suggest(t) and time.sleep(0.3) or 0.0, n_trials=50,
                   callbacks=budget_callbacks(config, space))
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials]
    assert 2 <= len(durations) < 50
    assert sum(durations[:-1]) < 1.5 <= sum(durations)  # stopped by the trial that crossed the budget
    assert TimeBudget(1.5).spent(study) == pytest.approx(sum(durations))
    assert trials_to_run(config, space, study) == 0  # a resumed worker starts nothing


# -- multi-objective --------------------------------------------------------------------------

def test_pareto_front_is_the_non_dominated_trials(make_config, tmp_path):
    config = make_config({"lora.r": "choice(4, 8, 16, 32)"},
                         study={"name": "mo", "sampler": "random", "also_minimize": ["trainable_pct", "epoch_time_s"]})
    assert config.study.objectives == ("eval_accuracy", "trainable_pct", "epoch_time_s")
    study = create_study(config, SearchSpace(config))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    values = {0: (0.80, 0.2, 10.0), 1: (0.85, 0.4, 10.0), 2: (0.85, 0.5, 12.0), 3: (0.79, 0.2, 9.0),
              4: (0.70, 0.3, 11.0)}
    for number, v in values.items():
        trial = study.ask()
        trial.set_user_attr("label", f"t{number}")
        study.tell(trial, list(v))
    df, path = pareto.store(config, study)
    # 2 loses to 1 everywhere; 4 loses to 0 everywhere; 0, 1, 3 each win somewhere
    assert list(df["trial"]) == [1, 0, 3]  # best accuracy first
    assert path.read_text().splitlines()[0].startswith("trial,label,eval_accuracy,trainable_pct,epoch_time_s")
    assert study.user_attrs["pareto_front"] == [1, 0, 3]
    text = pareto.format_front(config, df)
    assert "max eval_accuracy, min trainable_pct, min epoch_time_s" in text and "| t3 " in text.replace("  ", " ")
    # a stored study asked for other objectives is refused rather than mixed up
    other = make_config({"lora.r": "choice(4, 8, 16, 32)"}, study={"name": "mo", "sampler": "random"})
    with pytest.raises(ConfigError, match=r"optimises \['maximize', 'minimize', 'minimize'\]"):
        create_study(other, SearchSpace(other))
