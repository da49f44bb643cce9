"""python -m lora_sweep with bad input: exit code 2, a message that names the problem, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(tmp_path, *args):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "lora_sweep", *args,
         f"paths.sweeps_dir={tmp_path / 'sweeps'}", f"paths.reports_dir={tmp_path / 'reports'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "sweeps").exists() or not any((tmp_path / "sweeps").iterdir())
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())
    assert list(tmp_path.rglob("study.db")) == []
    assert list(tmp_path.rglob("mlflow.db")) == []
    assert list(tmp_path.rglob("*.log")) == []
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()  # Hydra's own


@pytest.mark.parametrize("args, expected", [
    (["lora.r=0"], ["lora-sweep: error: lora.r must be an integer > 0, but got lora.r=0."]),
    (["+sweep=rank", "study.sampler=foo"], ["study.sampler must be one of", "study.sampler='foo'"]),
    (["sweep=rank", "study.pruner=bar"], ["study.pruner must be one of", "study.pruner='bar'"]),
    (["+sweep=rank", "space.lora.r='choice(4,4)'"], ["space.lora.r", "repeats a choice"]),
    (["+sweep=pareto", "study.pruner=median"], ["study.pruner must be none when study.also_minimize is set",
                                               "Optuna cannot prune multi-objective studies"]),
    (["+sweep=joint", "space.lora.r='choice(4,8)'"], ["study.warm_start[0]: lora.r=16 is outside space.lora.r"]),
])
def test_bad_config_exits_2_before_anything_runs(tmp_path, args, expected):
    proc = run_cli(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    for part in expected:
        assert part in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_nothing_written(tmp_path)


def test_unknown_target_module_lists_the_real_ones(tmp_path):
    # Found by the preflight against the real MiniLM model, before any study or run is created.
    proc = run_cli(tmp_path, "lora.target_modules=nonexistent")
    assert proc.returncode == 2, proc.stderr
    assert "lora.target_modules: 'nonexistent' is not a Linear module of BertForSequenceClassification" \
        in proc.stderr
    for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"):
        assert name in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("args", [["report", "+sweep=rank"], ["report", "sweep=rank"], ["mode=report", "+sweep=rank"]])
def test_report_before_the_sweep_says_run_it_first(tmp_path, args):
    proc = run_cli(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    assert "No results for sweep 'rank'" in proc.stderr
    assert "Run it first: python -m lora_sweep +sweep=rank" in proc.stderr
    assert_nothing_written(tmp_path)
