"""The joint and multi-objective sweeps through the CLI on the real MiniLM and tweets, at tiny sizes."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
import torch

from test_end_to_end import lora_sweep

pytestmark = pytest.mark.slow


def test_joint_sweep_warm_starts_and_honours_its_conditions(tmp_path):
    proc = lora_sweep(tmp_path, "+sweep=joint", "study.n_trials=2", 'space.train.num_train_epochs="choice(1, 2)"')
    out = proc.stdout + proc.stderr
    assert "tpe sampler, median pruner" in out
    study = optuna.load_study(study_name="joint", storage=f"sqlite:///{tmp_path / 'sweeps' / 'joint' / 'study.db'}")
    assert len(study.trials) == 2
    first = study.trials[0]
    # seed 004's recommended point first, the base config for the rest of the searched parameters
    assert first.user_attrs["warm_start"] is True
    assert {k: first.params[k] for k in ("lora.r", "lora.alpha_ratio", "lora.target_modules", "lora.lora_dropout",
                                         "lora.bias")} == {"lora.r": 16, "lora.alpha_ratio": 2,
                                                           "lora.target_modules": "qkvo", "lora.lora_dropout": 0.1,
                                                           "lora.bias": "none"}
    assert first.user_attrs["params"]["lora_alpha"] == 32
    if not torch.cuda.is_available():
        assert "model.load_in_4bit is searched only where cuda is available" in out
        assert all("model.load_in_4bit" not in t.params for t in study.trials)
    for t in study.trials:
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED), t.user_attrs
        if t.params.get("lora.use_dora"):
            assert "lora.use_rslora" not in t.params  # conditional on DoRA being off
    assert (tmp_path / "reports" / "joint" / "report.md").is_file()


def test_pareto_sweep_prints_and_stores_its_front(tmp_path):
    proc = lora_sweep(tmp_path, "+sweep=pareto", "study.n_trials=2")
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{tmp_path / 'sweeps' / 'pareto' / 'study.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    front = pd.read_csv(tmp_path / "reports" / "pareto" / "pareto.csv")
    assert sorted(front["trial"]) == sorted(t.number for t in study.best_trials)
    assert len(front) >= 1
    assert "Pareto front (max eval_accuracy, min trainable_pct, min epoch_time_s)" in proc.stdout
