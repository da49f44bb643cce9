"""The replayed search benchmark (bench/replay.py): the product's samplers, pruners and race run over a stored
table instead of training; a suggestion is answered from the table and charged the seconds it took."""

from __future__ import annotations

import copy
import math

import optuna
import pytest
from optuna.trial import TrialState

from lora_sweep import record
from lora_sweep.bench import replay, replay_report
from lora_sweep.search.space import SearchSpace

PARAMS = ("lora.r", "lora.target_modules", "train.learning_rate")
STEPS = (10, 20)


def stored(first: float, last: float, seconds: float, test: float) -> replay.Stored:
    return replay.Stored(STEPS, (first, last), (seconds / 2, seconds), test)


@pytest.fixture
def table(raw_config):
    """12 configurations; r=8 qkvo at 3e-3 best on validation (0.90) but not on test; distinct seconds each."""
    rows, i = {}, 0
    for r in (4, 8):
        for modules in ("query", "qkvo"):
            for lr in (1e-3, 3e-3, 1e-2):
                i += 1
                last = 0.70 + 0.05 * (r == 8) + 0.08 * (modules == "qkvo") + 0.02 * (lr == 3e-3) + 0.001 * i
                rows[(r, modules, lr)] = stored(last - 0.1, round(last, 3), 100.0 + i, round(last + 0.01, 3))
    rows[(8, "qkvo", 3e-3)] = stored(0.80, 0.90, 120.0, 0.85)   # the grid's pick; (8, qkvo, 1e-2) tests 0.871
    raw = copy.deepcopy(raw_config)
    raw["train"].update(num_train_epochs=2, eval_steps=10, per_device_train_batch_size=10)
    raw["data"].update(train_size=100)
    return replay.Table(PARAMS, rows, raw, "eval_accuracy", True)


def run_answer(table, method: str, n: int, seed: int = 0):
    """A real Optuna study with the method's sampler and pruner, optimizing the table's answers."""
    config = replay.method_config(table, method, seed, __import__("pathlib").Path("/nonexistent"))
    from lora_sweep.search.samplers import make_pruner, make_sampler

    space = SearchSpace(config)
    study = optuna.create_study(sampler=make_sampler(config, space), pruner=make_pruner(config, space),
                                direction="maximize")
    answer = replay.Answer(space, table)
    study.optimize(answer, n_trials=n, catch=(RuntimeError,))
    return study, answer


def test_a_suggestion_is_answered_from_the_table_and_charged_its_seconds(table):
    study, answer = run_answer(table, "random", 8)
    assert len(answer.charges) == 8
    spent = 0.0
    for t, c in zip(study.trials, answer.charges):
        key = tuple(t.params[p] for p in PARAMS)
        row = table.rows[key]
        assert c.key == key and t.state == TrialState.COMPLETE
        assert t.intermediate_values == dict(zip(STEPS, row.values))  # every stored evaluation reported
        assert t.value == row.values[-1] == c.value
        spent += row.seconds[-1]
        assert c.spent == pytest.approx(spent)


def test_a_pruned_trial_costs_only_what_ran_before_its_pruning(table):
    study, answer = run_answer(table, "tpe+median", 16)
    pruned = [(t, c) for t, c in zip(study.trials, answer.charges) if t.state == TrialState.PRUNED]
    assert pruned, "the median pruner stopped none of 16 trials on this table"
    costs = [b.spent - a.spent for a, b in zip([replay.Charge(0.0, (), "", None), *answer.charges], answer.charges)]
    for t, c in pruned:
        assert c.state == "pruned" and t.last_step == STEPS[0]
        assert costs[t.number] == pytest.approx(table.rows[c.key].seconds[0])  # half the trial's seconds


def test_grid_and_race_replays_run_the_products_search_loop(table):
    grid = replay.replay(table, "grid", seed=0)
    assert sorted(c.key for c in grid) == sorted(table.rows)  # every point once
    assert grid[-1].spent == pytest.approx(table.total_seconds)
    race = replay.replay(table, "race", seed=0)
    finals = {c.key for c in race if c.state == "complete"}
    # each arm (r, modules) trains its best learning rate at the rung to the end; the rest stop there
    for r in (4, 8):
        for modules in ("query", "qkvo"):
            arm = {k: v for k, v in table.rows.items() if k[:2] == (r, modules)}
            best = max(arm, key=lambda k: arm[k].values[0])
            assert best in finals and len(finals & set(arm)) == 1
    assert race[-1].spent < table.total_seconds
    # the seed shuffles the grid's listing order: another seed, another order, the same points
    other = replay.replay(table, "grid", seed=3)
    assert [c.key for c in other] != [c.key for c in grid] and sorted(c.key for c in other) == sorted(table.rows)


def test_regret_is_the_grid_picks_test_score_minus_the_current_picks():
    rows = {("a",): replay.Stored((1,), (0.80,), (10.0,), 0.78), ("b",): replay.Stored((1,), (0.90,), (10.0,), 0.85),
            ("c",): replay.Stored((1,), (0.85,), (10.0,), 0.88)}
    table = replay.Table(("x",), rows, {}, "eval_accuracy", True)
    charges = [replay.Charge(5.0, ("c",), "pruned", None), replay.Charge(15.0, ("a",), "complete", 0.80),
               replay.Charge(25.0, ("c",), "complete", 0.85), replay.Charge(35.0, ("b",), "complete", 0.90)]
    # against the best on test (c, 0.88): no pick yet, then a (0.88 - 0.78), c (0), b (0.88 - 0.85)
    best = replay_report.regret_curve(table, charges)
    assert [s for s, _ in best] == [5.0, 15.0, 25.0, 35.0] and best[0][1] is None
    assert [round(r, 6) for _, r in best[1:]] == [0.10, 0.0, 0.03]
    # against the grid's own pick, b (0.90 on validation), 0.85 on test: a (0.07), c (-0.03: better), b (0)
    curve = replay_report.regret_curve(table, charges, "grid")
    assert [round(r, 6) for _, r in curve[1:]] == [0.07, -0.03, 0.0]
    assert replay_report.at(curve, 20.0) == pytest.approx(0.07) and replay_report.to_pick(curve) == 25.0
    assert math.isinf(replay_report.to_pick(curve[:2]))


def test_the_table_is_read_from_a_stored_study_and_survives_its_csv(tmp_path, table):
    # stored trials as a sweep writes them: params, reported steps, records with each evaluation's seconds
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="g", direction="maximize")
    record.set_settings(study, {"config": {**table.settings, "space": {
        "lora": {"r": "choice(4, 8)", "target_modules": "choice(query, qkvo)"},
        "train": {"learning_rate": "choice(0.001, 0.003, 0.01)"}}}, "overrides": []})
    dists = {"lora.r": optuna.distributions.CategoricalDistribution((4, 8)),
             "lora.target_modules": optuna.distributions.CategoricalDistribution(("query", "qkvo")),
             "train.learning_rate": optuna.distributions.CategoricalDistribution((1e-3, 3e-3, 1e-2))}
    for key, row in table.rows.items():
        study.add_trial(optuna.trial.create_trial(
            params=dict(zip(PARAMS, key)), distributions=dists, value=row.values[-1],
            intermediate_values=dict(zip(row.steps, row.values)),
            user_attrs=record.TrialRecord(test_accuracy=row.test, epochs=[{"eval_accuracy": v} for v in row.values],
                                          evaluated_at_s=list(row.seconds)).to_user_attrs()))
    got = replay.from_study(study)
    assert got.params == PARAMS and got.rows == table.rows
    replay.write_table(got, tmp_path / "out")
    again = replay.read_table(tmp_path / "out" / "table.csv")
    assert again.rows == table.rows and again.params == PARAMS and again.settings == got.settings


def test_a_study_without_a_stored_space_is_refused_not_replayed_as_one_point():
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    with pytest.raises(ValueError, match="stores no searched space"):
        replay.from_study(study)
