"""`python -m lora_sweep.bench` for real at a tiny size: one configuration on two seeds, the sweep
between the baseline processes, its report where the seeds say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_bench_runs_the_sweep_between_baseline_processes_and_averages_seeds(tmp_path):
    cmd = [sys.executable, "-m", "lora_sweep.bench", "data.train_size=64", "data.eval_size=32",
           "train.num_train_epochs=1", 'space.lora.r="choice(4)"', '+space.train.seed="choice(1,2)"',
           f"paths.reports_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = tmp_path / "bench" / "fp32-2seeds"
    result = json.loads((out / "bench.json").read_text())
    # half the baseline processes before the sweep, half after, each after the one before it ended
    assert [s["run"] for s in result["schedule"]] == ["baseline r=4, seed=1", "sweep", "baseline r=4, seed=2"]
    ends = [s["end_s"] for s in result["schedule"]]
    starts = [s["start_s"] for s in result["schedule"]]
    assert all(a <= b for a, b in zip(ends, starts[1:]))
    assert len(result["matmul_peak_each_gflops"]) == 4 and all(x > 0 for x in result["matmul_peak_each_gflops"])
    # the two seeds' runs, and the configuration they average into
    assert [r["configuration"] for r in result["rows"]] == ["r=4, seed=1", "r=4, seed=2"]
    (group,) = result["seed_groups"]
    assert group["configuration"] == "r=4" and group["n"] == 2
    runs = [r["sweep_accuracy"] for r in result["rows"]]
    assert group["sweep_mean"] == pytest.approx(sum(runs) / 2)
    assert "mean over its 2 seeds" in (out / "bench.md").read_text()
