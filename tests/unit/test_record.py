"""The typed trial record (lora_sweep.record): what the objective writes is what every reader gets,
every stored field reaches report.csv, and a study written by an earlier version still reports."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from lora_sweep import record, report
from lora_sweep.record import FIELDS, TrialRecord
from lora_sweep.trial.runner import (DATA_KEYS, LM_RESULT_KEYS, RESULT_KEYS, RETENTION_KEYS, TEST_KEYS, Figures,
                                     TrialResult)

ROOT = Path(__file__).resolve().parents[2]
OLD_STUDY = ROOT / "tests" / "fixtures" / "old_study"

# A complete trial's record with every field set to something other than its default.
FULL = {"label": "r=8", "config": {"lora.r": 8}, "excluded": "rule: why", "warm_start": True, "stage": "confirm", "confirms": 3,
        "device": "cpu", "precision": "bf16", "worker": "host:42",
        "memory_before_mb": 654.3, "params": {"r": 8, "target_modules": ["query", "value"]}, "lora_scale": 2.0, "tuned": {"train.learning_rate": 0.001}, "rung_cap": 1,
        "mlflow_run_id": "abc123", "eval_accuracy": 0.875, "eval_loss": 0.31, "eval_f1": 0.86,
        "eval_perplexity": 1.36, "eval_exact_match": 0.625, "eval_chrf": 71.5,
        "train_loss": 0.42, "trainable_params": 4162, "total_params": 1001252,
        "trainable_pct": 0.4157, "peak_memory_mb": 60.3, "predicted_memory_mb": 58.9, "peak_rss_mb": 410.2,
        "infeasible": "predicted 9 MB > 8 MB allowed (train.memory_limit_mb)", "memory_limit_mb": 8.0, "epoch_time_s": 2.25, "adapter_size_mb": 0.017,
        "train_seconds": 4.6, "eval_seconds": 1.04, "epochs": [{"eval_accuracy": 0.5}, {"eval_accuracy": 0.875}],
        "evaluated_at_s": [2.8, 5.6],
        "memory_kind": "cpu_peak_rss_above_trial_start_sampled", "batch_shapes": {"16x7": 5, "16x9": 3},
        "lora_params": 4096, "test_accuracy": 0.85, "test_f1": 0.84, "test_loss": 0.35, "test_exact_match": 0.5,
        "test_n": 500, "test_seconds": 1.5,
        "error": "boom", "memory_after_mb": 655.1, "pruned_at_step": 4, "pruned_at_unit": "step",
        "pruned_at_epoch": 2, "examples_kept": 118, "examples_prompt_truncated": 3, "examples_dropped": 2,
        "data_encoding": "utf-8", "bad_rows": {"invalid JSON": 1}, "rows_set_aside": 7, "answers_generated": 40,
        "answers_capped": 2, "retention_loss": 3.1, "base_retention_loss": 3.0, "forgetting": 0.1,
        "forgetting_low": 0.05, "forgetting_high": 0.15, "retention_n": 32}


def test_full_covers_every_field_and_the_runners_results():
    assert set(FULL) == set(FIELDS)
    assert set(RESULT_KEYS + LM_RESULT_KEYS) <= set(FIELDS)  # a new result must get a field (and a csv column)
    assert set(TEST_KEYS + DATA_KEYS + RETENTION_KEYS) <= set(FIELDS)


def test_test_split_examples_are_stored_apart_from_eval(tmp_path):
    assert record.examples_path(tmp_path, 3) == tmp_path / "examples" / "trial-3.parquet"
    assert record.examples_path(tmp_path, 3, split="test") == tmp_path / "examples-test" / "trial-3.parquet"
    assert record.examples_path(tmp_path, 3, "confirm", "test") == tmp_path / "confirm" / "examples-test" / "trial-3.parquet"
    with pytest.raises(ValueError, match="split='train'"):
        record.examples_path(tmp_path, 3, split="train")


def test_a_record_round_trips_and_reads_older_and_newer_attributes():
    rec = TrialRecord(**FULL)
    assert rec.to_user_attrs() == FULL
    assert TrialRecord.from_user_attrs(rec.to_user_attrs()) == rec
    # an older study lacks keys: figures read None, the rest their defaults; a newer one's extra keys are ignored
    old = TrialRecord.from_user_attrs({"label": "r=4", "eval_accuracy": 0.5, "from_the_future": 1})
    assert (old.label, old.eval_accuracy, old.eval_seconds, old.worker, old.batch_shapes) == ("r=4", 0.5, None, "", {})
    assert math.isnan(old.figure("eval_seconds")) and old.figure("eval_accuracy") == 0.5
    assert old.to_user_attrs() == {"label": "r=4", "eval_accuracy": 0.5}  # what never happened is not stored
    with pytest.raises(TypeError):
        TrialRecord(eval_acuracy=0.5)  # a misspelt key cannot be written
    with pytest.raises(KeyError):
        old.figure("accuracy")


def test_a_trial_optuna_failed_reads_its_fail_reason():
    trial = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"label": "r=4"},
                                      system_attrs={"fail_reason": "heartbeat stopped"})
    assert TrialRecord.from_trial(trial).error == "heartbeat stopped"
    trial.set_user_attr("error", "out of memory")
    assert TrialRecord.from_trial(trial).error == "out of memory"


def test_every_stored_field_reaches_report_csv(make_config, tmp_path):
    config = make_config({"lora.r": "choice(4, 8)"}, study={"name": "full"})
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(
        params={"lora.r": 8}, distributions={"lora.r": optuna.distributions.CategoricalDistribution([4, 8])},
        value=0.875, user_attrs=TrialRecord(**FULL).to_user_attrs()))
    report.write_report(config, study)
    csv = pd.read_csv(config.report_dir / "report.csv", keep_default_na=False)
    row = csv.iloc[0]
    for name, value in FULL.items():
        assert name in csv.columns, name
        if isinstance(value, (dict, list)):
            assert TrialRecord.from_user_attrs({name: json.loads(row[name])}) == TrialRecord(**{name: value})
        elif name not in ("error", "excluded"):  # shown only for failed / pruned trials
            assert type(value)(row[name]) == value, name
    assert row["param.lora.r"] == 8 and bool(row["pareto"])


def test_the_objective_writes_the_record_readers_read(make_config, monkeypatch):
    """The objective's wiring: which measurement lands in which field (rss before the trial, rss after
    a failure, the runner's figures, the worker), with a stand-in runner and tracker."""
    from lora_sweep.run import objective as objective_module
    from lora_sweep.search.space import SearchSpace

    config = make_config({"lora.r": "choice(4, 8)"}, study={"name": "wiring", "sampler": "grid"})
    rss = iter([111.04, 222.06, 333.0, 444.0])
    monkeypatch.setattr(objective_module, "rss_mb", lambda: next(rss))
    monkeypatch.setattr(objective_module, "release_memory", lambda: None)
    figures = {k: float(i + 1) for i, k in enumerate(RESULT_KEYS)}
    outcomes = iter([TrialResult(figures=Figures(**figures, test_accuracy=0.5, test_n=7),
                                 epochs=[{"eval_accuracy": 1.0}], steps=[1],
                                 memory_kind="cpu_peak_rss_above_trial_start_sampled", batch_shapes={"16x7": 5}),
                     RuntimeError("out of memory")])

    def fake_run(settings, device, on_epoch, adapter_dir):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    class Tracker:
        def start_trial(self, parent, name, params, tags):
            return f"run{tags['optuna_trial_number']}"

        def __getattr__(self, name):
            return lambda *a, **k: None

    monkeypatch.setattr(objective_module, "run_trial", fake_run)
    objective = objective_module.Objective(config, SearchSpace(config), Tracker(), "parent", "cpu", {}, planned=2)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.GridSampler({"lora.r": [4, 8]}, seed=0))
    study.optimize(objective, n_trials=2, catch=(RuntimeError,))
    done, failed = (TrialRecord.from_trial(t) for t in study.trials)
    assert done.memory_before_mb == 111.0 and done.memory_after_mb is None
    assert {k: getattr(done, k) for k in RESULT_KEYS} == figures
    assert (done.test_accuracy, done.test_n) == (0.5, 7)                 # the figures recorded whole
    assert study.trials[0].value == figures["eval_accuracy"]            # the objective value: validation only
    assert (done.epochs, done.batch_shapes, done.memory_kind) == (
        [{"eval_accuracy": 1.0}], {"16x7": 5}, "cpu_peak_rss_above_trial_start_sampled")
    assert (done.device, done.worker, done.mlflow_run_id) == ("cpu", f"{socket.gethostname()}:{os.getpid()}", "run0")
    assert done.params["r"] == study.trials[0].params["lora.r"] and done.label == f"r={done.params['r']}"
    assert failed.memory_before_mb == 222.1 and failed.memory_after_mb == 333.0
    assert "out of memory" in failed.error and failed.eval_accuracy is None and failed.mlflow_run_id == "run1"


def test_every_figure_a_trial_returns_is_a_record_field():
    """The objective records a trial's Figures whole: each of its fields must be one of the record's."""
    from dataclasses import fields

    assert {f.name for f in fields(Figures)} <= set(FIELDS)
    assert {f.name for f in fields(Figures)} == set(RESULT_KEYS + LM_RESULT_KEYS + TEST_KEYS + DATA_KEYS + RETENTION_KEYS)


def test_study_attributes_have_one_accessor_each():
    study = optuna.create_study()
    assert (record.meta(study), record.timings(study), record.parent_run_id(study), record.pareto_front(study)) == (
        {}, {}, None, [])
    record.set_meta(study, {"eval_size": 40})
    record.set_timings(study, {"trials_s": 1.5})
    record.set_parent_run_id(study, "p1")
    record.set_pareto_front(study, [3, 1])
    assert study.user_attrs == {"meta": {"eval_size": 40}, "timings": {"trials_s": 1.5},
                                "mlflow_parent_run_id": "p1", "pareto_front": [3, 1]}  # the keys earlier versions read
    assert record.has_meta(study) and record.pareto_front(study) == [3, 1]
    assert record.precision(study) == {}
    record.set_precision(study, {"choice": "bf16", "speedup": 1.7})
    assert study.user_attrs["precision"] == {"choice": "bf16", "speedup": 1.7} == record.precision(study)


def test_report_mode_renders_a_study_written_by_the_earlier_version(tmp_path):
    """tests/fixtures/old_study: two trials (r=4, r=8) stored by the version before the record existed
    (see its README). Report mode rebuilds its report: every column that version wrote holds the same
    values, the columns it never wrote to the csv (eval_seconds, worker, memory_before_mb,
    batch_shapes) now carry its stored figures."""
    journal = tmp_path / "study.journal"
    shutil.copy(OLD_STUDY / "study.journal", journal)
    reports = tmp_path / "reports"
    proc = subprocess.run(
        [sys.executable, "-m", "lora_sweep", "report", "+sweep=rank", f"study.storage=journal:///{journal}",
         f"paths.sweeps_dir={tmp_path / 'sweeps'}", f"paths.reports_dir={reports}",
         f"tracking.uri=file://{tmp_path / 'mlruns'}", "tracking.log_artifacts=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| r=8 " in proc.stdout

    new = pd.read_csv(reports / "rank" / "report.csv")
    old = pd.read_csv(OLD_STUDY / "report.csv")
    assert set(old.columns) <= set(new.columns)
    pd.testing.assert_frame_equal(new[old.columns], old, check_dtype=False)
    assert new["eval_seconds"].tolist() == pytest.approx([1.004810816000031, 0.10101174700002957])
    assert new["memory_before_mb"].tolist() == [654.0, 712.7]
    assert new["worker"].str.startswith("vm:").all()
    assert new["batch_shapes"].tolist() == ['{"16x7":5}', '{"16x7":5}']
    assert new["epochs"].map(json.loads).map(len).tolist() == [1, 1]

    text = (reports / "rank" / "report.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| r=")]
    # as the earlier version rendered it, plus the accuracy's Wilson interval (40 eval examples)
    assert rows == [["r=4", "50.0", "35.2–64.8", "2,114", "0.21", "60", "2.2", "✓", "#0"],
                    ["r=8", "100.0", "91.2–100.0", "4,162", "0.42", "5", "3.6", "✓", "#1"]]
    assert new["lora_scale"].tolist() == [2.0, 2.0]  # from the stored params (r, lora_alpha=2r)
    assert "Paired tests" in text  # no per-example results in that study: today's findings
