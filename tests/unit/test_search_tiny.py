"""Whole sweeps (run_sweep) on a tiny random BERT: pruning every N steps, excluded combinations,
multi-objective Pareto fronts and warm starts, read back from Optuna, MLflow and the report."""

from __future__ import annotations

import copy

import pytest
from optuna.trial import TrialState

from lora_sweep.config import from_mapping
from lora_sweep.run.sweep import run_sweep
from test_trial_tiny import assets  # noqa: F401  (the tiny model and csv fixture)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches")]


@pytest.fixture
def tiny_config(raw_config, assets):  # noqa: F811
    model_dir, csv_path = assets

    def _make(space, study, train=None, data=None, **top):
        raw = copy.deepcopy(raw_config)
        raw["model"]["name_or_path"] = str(model_dir)
        raw["data"].update(name_or_path=str(csv_path), encoding=None, label_column="label", labels=None,
                           **{"train_size": 80, "eval_size": 40, "max_length": 16, **(data or {})})
        raw["train"].update({"num_train_epochs": 2, "device": "cpu", "learning_rate": 5e-2,
                             "per_device_train_batch_size": 16, "save_adapter": False, **(train or {})})
        raw["lora"].update(r=4, lora_alpha=8)
        raw["study"].update(study)
        raw["space"] = space
        raw.update(top)
        return from_mapping(raw)

    return _make


def mlflow_runs(config):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=config.tracking_uri)
    exp = client.get_experiment_by_name(config.experiment_name)
    return {r.data.tags.get("optuna_trial_number"): r for r in client.search_runs([exp.experiment_id])
            if "mlflow.parentRunId" in r.data.tags}


def test_a_hopeless_trial_is_pruned_at_the_step_it_stopped(tiny_config):
    # Two warm-start points fix the order: trial 0 (a learning rate that learns) sets the bar; trial 1
    # (lr 1e-6 learns nothing) falls below it at its first evaluation, 3 optimizer steps in.
    config = tiny_config({"train.learning_rate": "choice(0.05, 1e-6)"},
                         {"name": "prune", "sampler": "tpe", "n_trials": 2, "pruner": "percentile",
                          "pruner_args": {"percentile": 50.0, "n_startup_trials": 1}, "metric": "eval_loss",
                          "warm_start": [{"train.learning_rate": 0.05}, {"train.learning_rate": 1e-6}]},
                         train={"eval_steps": 3, "num_train_epochs": 3})
    study = run_sweep(config)
    by_lr = {t.params["train.learning_rate"]: t for t in study.trials}
    good, bad = by_lr[0.05], by_lr[1e-6]
    assert len(study.trials) == 2
    assert (good.number, bad.number) == (0, 1) and bad.user_attrs.get("warm_start") is True
    assert good.state == TrialState.COMPLETE
    # 80 examples / batch 16 = 5 steps per epoch, 15 in all: evaluated at 3, 6, 9, 12, 15
    assert sorted(good.intermediate_values) == [3, 6, 9, 12, 15]
    assert bad.state == TrialState.PRUNED
    stopped = bad.user_attrs["pruned_at_step"]
    assert bad.user_attrs["pruned_at_unit"] == "step"
    assert stopped < 15 and sorted(bad.intermediate_values) == list(range(3, stopped + 1, 3))  # stopped early
    assert bad.intermediate_values[stopped] > good.intermediate_values[stopped]  # worse than the bar there
    run = mlflow_runs(config)[str(bad.number)]
    assert run.info.status == "KILLED"
    assert run.data.tags["status"] == "pruned" and run.data.tags["pruned_at_step"] == str(stopped)
    report = (config.report_dir / "report.md").read_text()
    assert f"trial {bad.number}" in report and f"pruned after step {stopped}" in report
    assert good.user_attrs["epoch_time_s"] > 0


def test_excluded_combinations_are_skipped_with_their_reason(tiny_config):
    config = tiny_config({"lora.use_dora": "choice(false, true)", "lora.init_lora_weights": "choice(mica)"},
                         {"name": "dora", "sampler": "grid"}, train={"num_train_epochs": 1})
    study = run_sweep(config)
    states = {(t.params["lora.use_dora"], t.params["lora.init_lora_weights"]): t for t in study.trials}
    assert len(states) == 2
    excluded = states[(True, "mica")]
    assert excluded.state == TrialState.PRUNED
    assert "DoRA" in excluded.user_attrs["excluded"] and "exclude.dora_mica" in excluded.user_attrs["excluded"]
    assert "epoch_time_s" not in excluded.user_attrs  # never trained
    assert states[(False, "mica")].state == TrialState.COMPLETE  # MiCA alone trains
    assert str(excluded.number) not in mlflow_runs(config)
    assert "excluded, not trained" in (config.report_dir / "report.md").read_text()


def test_multi_objective_sweep_stores_and_prints_the_pareto_front(tiny_config, capsys):
    config = tiny_config({"lora.r": "choice(2, 8)", "lora.target_modules": "choice(query, qkvo)"},
                         {"name": "mo", "sampler": "grid", "also_minimize": ["trainable_pct"]},
                         train={"num_train_epochs": 1})
    study = run_sweep(config)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    for t in complete:
        assert t.values == [t.user_attrs["eval_accuracy"], t.user_attrs["trainable_pct"]]
        assert not t.intermediate_values  # no pruning reports in a multi-objective study

    def dominated(t):
        a, p = t.values
        return any(o.values[0] >= a and o.values[1] <= p and o.values != t.values for o in complete)

    expected = sorted(t.number for t in complete if not dominated(t))
    import pandas as pd

    front = pd.read_csv(config.report_dir / "pareto.csv")
    assert sorted(front["trial"]) == expected
    assert sorted(study.user_attrs["pareto_front"]) == expected
    # the smallest adapter (r=2 on query only) is always on the front: nothing has fewer parameters
    smallest = min(complete, key=lambda t: t.values[1])
    assert smallest.number in expected
    out = capsys.readouterr().out
    assert "Pareto front (max eval_accuracy, min trainable_pct)" in out
    assert f"{len(expected)} trial(s)" in out


def test_each_complete_trial_stores_its_examples_and_the_report_pairs_them(tiny_config):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from lora_sweep import record

    config = tiny_config({"lora.r": "choice(2, 8)"}, {"name": "paired", "sampler": "grid"})
    study = run_sweep(config)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 2
    frames = {}
    for t in complete:
        path = record.examples_path(config.study_dir, t.number)
        assert path.parent.parent == config.study_dir and path.exists()
        frames[t.number] = ex = record.read_examples(path)
        assert list(ex.columns) == list(record.EXAMPLE_COLUMNS) and len(ex) == 40
        assert ex["correct"].notna().all() and ex["example_id"].is_unique
        assert ex["correct"].mean() == pytest.approx(t.user_attrs["eval_accuracy"])
        assert (ex["correct"] == (ex["prediction"] == ex["label"])).all()
        assert ex["loss"].mean() == pytest.approx(t.user_attrs["eval_loss"], rel=1e-5)  # the Trainer's mean
    source = pd.read_csv(config.base.data.name_or_path)            # the id is the example's row in the source csv
    for ex in frames.values():
        assert ex["label"].tolist() == source.loc[ex["example_id"], "label"].tolist()
    ids = [f["example_id"].tolist() for f in frames.values()]
    assert ids[0] == ids[1]                                   # the same eval examples, by id, in every trial
    assert sorted(p.name for p in (config.study_dir / "examples").iterdir()) == \
        sorted(f"trial-{n}.parquet" for n in frames)            # one file per complete trial, nothing else
    # the examples file is an artifact of the trial's MLflow run
    client = MlflowClient(tracking_uri=config.tracking_uri)
    for number, run in mlflow_runs(config).items():
        listed = [a.path for a in client.list_artifacts(run.info.run_id, "examples")]
        assert listed == [f"examples/trial-{number}.parquet"]
    report = (config.report_dir / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| Configuration"))
    assert [c.strip() for c in header.strip("|").split("|")][1:3] == ["Accuracy (%)", "95% CI"]
    assert "Paired tests" not in report                      # the paired findings, not the fallback line
    assert " beat " in report or "not supported: " in report
    assert "paired examples" in report and "Holm-adjusted" in report
    csv = pd.read_csv(config.report_dir / "report.csv")
    assert csv.loc[csv["status"] == "complete", "eval_n"].tolist() == [40, 40]
    assert sorted(csv["lora_scale"]) == [1.0, 4.0]           # lora_alpha 8 over r = 2 and 8


@pytest.mark.slow  # ~14 s: eight tiny trials; test_race covers the race in seconds; CI runs it
def test_a_raced_sweep_trains_each_arms_best_learning_rate_to_the_end(tiny_config):
    # Two ranks, three learning rates each, raced (study.tune): every candidate reaches epoch 1, each rank
    # keeps its best there on validation, and only that one trains to the end.
    config = tiny_config({"lora.r": "choice(2, 4)"},
                         {"name": "race", "tune": {"train.learning_rate": "choice(1e-6, 2e-2, 2e-1)"}},
                         data={"train_size": 60, "eval_size": 30, "test_size": 30})
    study = run_sweep(config)
    trials = study.get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert {t.params["lora.r"] for t in done} == {2, 4} and len(done) == 2  # one run to the end per rank
    for t in done:
        mates = [m for m in trials if m.params["lora.r"] == t.params["lora.r"]]
        assert len({m.params["train.learning_rate"] for m in mates}) == 3  # every candidate raced
        at_rung = {m.params["train.learning_rate"]: m.intermediate_values[1] for m in mates}
        assert at_rung[t.params["train.learning_rate"]] == max(at_rung.values())  # the arm's best at epoch 1
        # what the race read is the validation accuracy the record stores, never the test split's
        assert t.intermediate_values[1] == t.user_attrs["epochs"][0]["eval_accuracy"]
        assert t.user_attrs["test_accuracy"] is not None
        assert t.user_attrs["tuned"] == {"train.learning_rate": t.params["train.learning_rate"]}
        assert t.user_attrs["config"] == {"lora.r": t.params["lora.r"]}
    stopped = [t for t in trials if t.state == TrialState.PRUNED]
    assert stopped and all(t.user_attrs["rung_cap"] == 1 and t.last_step == 1 for t in stopped)
    # six candidates to epoch 1; a kept one that was not the last of its rank trains again from step 0
    assert 6 <= len(trials) <= 8
