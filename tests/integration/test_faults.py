"""Trials that run out of memory or whose loss goes non-finite are recorded, with their reasons,
as failed; memory returns to the baseline and the sweep goes on. Real faults, no fakes: the worker
runs under RLIMIT_AS (limited_worker.py) and a LoRA rank whose weights alone exceed the limit makes
torch's allocator fail; a learning rate of 1e30 drives the weights to inf/nan within the epoch
(eval_loss=nan). Real PostgreSQL and `mlflow server`, as in test_workers.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from services import TINY, pg_url, worker_env

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
LIMIT_MB = 3072
# r=65536 on MiniLM's 24 attention Linear layers: 24 * 2 * 384 * 65536 * 4 bytes = 4.8 GB of LoRA weights.
VARIANTS = [
    "+variants.ok.label=ok", "+variants.ok.set.lora.r=4",
    "+variants.oom.label=oom", "+variants.oom.set.lora.r=65536",
    "+variants.diverge.label=diverge", "+variants.diverge.set.train.learning_rate=1e30",
    "+variants.diverge.set.train.per_device_train_batch_size=8",
    "+variants.after.label=after", "+variants.after.set.lora.r=8",
    '+space.variant="choice(ok,oom,diverge,after)"',
]


def test_oom_and_nan_trials_fail_with_reasons_and_the_sweep_goes_on(tmp_path, study_db, mlflow_url):
    cmd = [sys.executable, str(HERE / "limited_worker.py"), str(LIMIT_MB), *VARIANTS, "study.name=faults",
           f"study.storage={pg_url(study_db)}", f"tracking.uri={mlflow_url}", "tracking.log_artifacts=false",
           *TINY, f"paths.sweeps_dir={tmp_path / 'sweeps'}", f"paths.reports_dir={tmp_path / 'reports'}"]
    # One malloc arena per thread would reserve 64 MB of address space each: keep the limit about data.
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=worker_env(MALLOC_ARENA_MAX="2", PYTHONPATH=str(HERE.parents[1])))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]

    study = optuna.load_study(study_name="faults", storage=pg_url(study_db))
    by = {t.params["variant"]: t for t in study.trials}
    assert len(study.trials) == 4
    assert {k: t.state for k, t in by.items()} == {"ok": TrialState.COMPLETE, "oom": TrialState.FAIL,
                                                   "diverge": TrialState.FAIL, "after": TrialState.COMPLETE}
    oom, nan = by["oom"].user_attrs, by["diverge"].user_attrs
    assert oom["error"].startswith("out of memory (") and "lower train.per_device_train_batch_size" in oom["error"]
    assert "can't allocate memory" in oom["error"] or "MemoryError" in oom["error"]
    # Memory is back at the baseline: the process is no larger after the failed trial than before it
    # (within allocator noise), and the next trial trains under the same limit.
    print(f"process RSS: oom trial {oom['memory_before_mb']} MB before, {oom['memory_after_mb']} MB after; "
          f"next trial starts at {by['after'].user_attrs['memory_before_mb']} MB")
    assert oom["memory_after_mb"] < oom["memory_before_mb"] + 64, oom
    assert by["after"].user_attrs["memory_before_mb"] < oom["memory_before_mb"] + 64
    assert nan["error"].startswith("NonFiniteLoss: ") and "loss became nan" in nan["error"], nan["error"]
    for failed in (oom, nan):  # never recorded as a result
        assert "eval_accuracy" not in failed and "trainable_params" not in failed

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url)
    exp = client.get_experiment_by_name("lora-sweep/faults")
    runs = {r.data.tags.get("label"): r for r in client.search_runs([exp.experiment_id])}
    assert runs["oom"].info.status == runs["diverge"].info.status == "FAILED"
    assert runs["oom"].data.tags["error"] == oom["error"] and runs["diverge"].data.tags["error"] == nan["error"]
    assert runs["ok"].info.status == runs["after"].info.status == "FINISHED"

    report = (tmp_path / "reports" / "faults" / "report.md").read_text()
    assert "**failed**: out of memory" in report and "NonFiniteLoss" in report
    table = report.split("## Trials without a result")[0]
    assert "| ok " in table and "| after " in table and "| oom " not in table and "| diverge " not in table
