"""Many workers, one study: real `python -m lora_sweep` processes on the real PostgreSQL at
127.0.0.1:5432 (a fresh database per test) logging to a real `mlflow server` on loopback.

- 4 workers share a 12-point grid: exactly one complete trial per point, one MLflow parent.
- SIGTERM mid-trial ends it cleanly; SIGKILL mid-trial leaves nothing stuck after a restart.
- study.workers=2 on CPU: the launcher splits the cores and shares a journal file.
- study.trials_per_gpu=2 on CPU: two trials at once, each computing exactly what a sequential run does.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lora_sweep.record import TrialRecord
from services import SECRET, lora_sweep_cmd, pg_url, worker_env

pytestmark = pytest.mark.slow

GRID12 = 'space.lora.r="choice(1,2,3,4,5,6,7,8,9,10,11,12)"'


def start(tmp: Path, name: str, *args: str, **env: str) -> tuple[subprocess.Popen, Path]:
    out = tmp / f"{name}.log"
    proc = subprocess.Popen(lora_sweep_cmd(tmp, *args), cwd=tmp, env=worker_env(**env),
                            stdout=open(out, "w"), stderr=subprocess.STDOUT)
    return proc, out


def finish(proc: subprocess.Popen, out: Path, expect: int = 0, timeout: float = 600) -> str:
    code = proc.wait(timeout=timeout)
    text = out.read_text()
    assert code == expect, f"exit {code} (expected {expect})\n{text[-4000:]}"
    return text


def load(db: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=pg_url(db))


def mlflow_runs(url: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def wait_for_trial_start(proc: subprocess.Popen, out: Path, timeout: float = 300) -> int:
    """Block until the worker's log says a trial started training (its MLflow run exists by then);
    returns the trial number. The log is read, not the database: the signal must land mid-trial."""
    started = re.compile(r"\] trial (\d+) \(r=\d+\): r=")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = started.search(out.read_text())
        if match:
            return int(match[1])
        assert proc.poll() is None, f"worker exited before a trial started:\n{out.read_text()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"no trial started within {timeout} s:\n{out.read_text()[-3000:]}")


def assert_secret_nowhere(tmp: Path, study: optuna.Study, runs: list, logs: list[str]) -> None:
    for run in runs:
        for where in (run.data.params, run.data.tags):
            assert not any(SECRET in str(v) for v in where.values()), where
    assert not any(SECRET in text for text in logs)
    assert SECRET not in json.dumps(study.user_attrs, default=str)
    for folder in ("reports", "sweeps"):  # report.md/csv, plots, sweep.log, the local files of the sweep
        for path in (tmp / folder).rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


def test_four_workers_share_one_grid_without_repeating_a_point(tmp_path, study_db, mlflow_url):
    args = ["+sweep=rank", GRID12, "study.name=four", f"study.storage={pg_url(study_db)}",
            f"tracking.uri={mlflow_url}"]
    workers = [start(tmp_path, f"w{i}", *args) for i in range(4)]
    logs = [finish(p, out) for p, out in workers]

    study = load(study_db, "four")
    trials = study.get_trials()
    complete = Counter(t.params["lora.r"] for t in trials if t.state == TrialState.COMPLETE)
    assert complete == Counter(range(1, 13))  # exactly one complete trial per grid point
    assert len(trials) == 12, [(t.number, t.state, t.params) for t in trials]  # nothing extra, nothing failed
    busy = Counter(t.user_attrs["worker"] for t in trials)
    assert len(busy) >= 2, f"one worker did everything: {busy}"  # the points were shared out

    parents, children = mlflow_runs(mlflow_url, "lora-sweep/four")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # one parent for all workers
    assert len(children) == 12
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(int(c.data.params["r"]) for c in children) == list(range(1, 13))
    assert_secret_nowhere(tmp_path, study, parents + children, logs)
    assert "postgresql://postgres:***@127.0.0.1:5432" in study.user_attrs["meta"]["command"]


def test_sigterm_then_sigkill_mid_trial_then_a_restart_finishes_the_grid(tmp_path, study_db, mlflow_url):
    # 96 examples: trials long enough (several seconds) that a signal lands mid-trial.
    args = ["+sweep=rank", 'space.lora.r="choice(2,4,8)"', "study.name=kill", "data.train_size=96",
            f"study.storage={pg_url(study_db)}", f"tracking.uri={mlflow_url}", "study.heartbeat_interval=1", "study.grace_period=3",
            "tracking.log_artifacts=false"]

    # SIGTERM: the current trial ends as failed (interrupted), its run is closed, exit status 130.
    proc, out = start(tmp_path, "term", *args)
    victim = wait_for_trial_start(proc, out)
    proc.send_signal(signal.SIGTERM)
    text = finish(proc, out, expect=130)
    assert "re-run the same command to resume" in text
    interrupted = load(study_db, "kill").trials[victim]
    assert interrupted.state == TrialState.FAIL and "interrupted" in interrupted.user_attrs["error"]
    parents, children = mlflow_runs(mlflow_url, "lora-sweep/kill")
    assert {r.info.status for r in parents + children} <= {"FINISHED", "KILLED"}  # nothing left RUNNING

    # SIGKILL: nothing can be closed by the dying worker; the trial and its run stay RUNNING ...
    proc, out = start(tmp_path, "kill", *args)
    number = wait_for_trial_start(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed = load(study_db, "kill").trials[number]
    assert killed.state == TrialState.RUNNING
    killed_run = killed.user_attrs["mlflow_run_id"]
    assert {c.info.run_id: c.info.status for c in mlflow_runs(mlflow_url, "lora-sweep/kill")[1]}[killed_run] \
        == "RUNNING"

    # ... until the next start: heartbeats have stopped, the trial is failed and queued again,
    # its MLflow run is marked KILLED, and the grid completes with each point done once.
    time.sleep(3)  # study.grace_period
    proc, out = start(tmp_path, "restart", *args)
    text = finish(proc, out)
    assert "left RUNNING by a worker that died" in text
    study = load(study_db, "kill")
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0
    complete = Counter(t.params["lora.r"] for t in study.trials if t.state == TrialState.COMPLETE)
    assert complete == Counter([2, 4, 8])
    assert study.trials[killed.number].state == TrialState.FAIL
    parents, children = mlflow_runs(mlflow_url, "lora-sweep/kill")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_id = {c.info.run_id: c for c in children}
    assert by_id[killed_run].info.status == "KILLED"
    assert "worker died" in by_id[killed_run].data.tags["error"]
    assert not [c for c in children if c.info.status == "RUNNING"]
    assert sum(c.info.status == "FINISHED" for c in children) == 3


def test_cpu_workers_launcher_splits_cores_and_shares_a_journal(tmp_path):
    proc, out = start(tmp_path, "launcher", "+sweep=rank", 'space.lora.r="choice(1,2,3,4)"', "study.name=local",
                      "study.workers=2", "tracking.log_artifacts=false")
    text = finish(proc, out)
    cores = re.search(r"Starting 2 workers .*: w0: CPU cores ([\d,]+); w1: CPU cores ([\d,]+)", text)
    assert cores, text[-3000:]
    assert not set(cores[1].split(",")) & set(cores[2].split(","))  # each worker has cores of its own
    journal = tmp_path / "sweeps" / "local" / "study.journal"
    assert journal.is_file() and not (tmp_path / "sweeps" / "local" / "study.db").exists()
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="local", storage=JournalStorage(JournalFileBackend(str(journal))))
    complete = Counter(t.params["lora.r"] for t in study.trials if t.state == TrialState.COMPLETE)
    assert complete == Counter([1, 2, 3, 4]) and len(study.trials) == 4
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    assert "[w0]" in text and "[w1]" in text
    # The report reads the journal without being told where it is.
    report = (tmp_path / "reports" / "local" / "report.md").read_text()
    assert len(re.findall(r"^\| r=\d+ +\|", report, flags=re.M)) == 4  # the table's rows (not the test split's)



# Loaded by each packed worker through PYTHONPATH: a trial waits, untimed, until both workers hold one,
# so two trials do run at once (the second worker starts several seconds after the first, which
# would otherwise train both points alone). Waiting changes no figure of a trial.
BARRIER = """
import importlib.abc, importlib.util, os, sys, time
from pathlib import Path


class Barrier(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "lora_sweep.trial.runner" or "LORA_SWEEP_WORKER" not in os.environ:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            train, here = module.run_trial, Path(os.environ["PACK_BARRIER"])

            def run_trial(*args, **kwargs):
                (here / os.environ["LORA_SWEEP_WORKER"]).touch()
                deadline = time.monotonic() + 60
                while len(list(here.iterdir())) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                return train(*args, **kwargs)

            module.run_trial = run_trial

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Barrier())
"""


def records(study: optuna.Study) -> dict[str, TrialRecord]:
    """label -> record of each trial, all complete, none trained twice."""
    rows = [TrialRecord.from_trial(t) for t in study.trials]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * len(rows), [r.error for r in rows]
    assert len({r.label for r in rows}) == len(rows), [r.label for r in rows]
    return {r.label: r for r in rows}


def test_packed_trials_equal_sequential_ones_on_cpu(tmp_path):
    data = tmp_path / "sentiment.csv"  # learnable: the two ranks end at different losses
    rng = random.Random(0)
    words = (["bad", "awful", "sad", "hate", "poor"], ["good", "great", "happy", "love", "nice"])
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *([" ".join(rng.choices(words[i % 2], k=5)), "pn"[i % 2]]
                                                      for i in range(64))])
    args = ["+sweep=rank", 'space.lora.r="choice(2,4)"', f"data.name_or_path={data}", "data.encoding=null",
            "data.label_column=label", "data.labels=null", "data.max_length=16", "train.per_device_train_batch_size=8",
            "train.learning_rate=0.01", "train.mixed_precision=no", "train.save_adapter=false",
            "tracking.log_artifacts=false"]
    seq_dir, packed_dir, hook = tmp_path / "seq", tmp_path / "packed", tmp_path / "hook"
    for folder in (seq_dir, packed_dir, hook / "barrier"):
        folder.mkdir(parents=True)
    (hook / "sitecustomize.py").write_text(BARRIER)
    # Both at once, each in its own folder (two new sweeps creating one MLflow database collide): the
    # sequential one at 1 thread (worker_env); the packed launcher without a thread count of its own,
    # so the 1 thread its workers train at is what packing gave them.
    seq, seq_out = start(seq_dir, "seq", *args, "study.name=seq")
    packed_out = packed_dir / "packed.log"
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in worker_env(PYTHONPATH=path, PACK_BARRIER=str(hook / "barrier")).items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cores = set(sorted(os.sched_getaffinity(0))[:2])  # two cores at most: 1 thread per packed trial anywhere
    packed = subprocess.Popen(lora_sweep_cmd(packed_dir, *args, "study.name=packed", "study.trials_per_gpu=2"),
                              cwd=packed_dir, env=env, stdout=open(packed_out, "w"), stderr=subprocess.STDOUT,
                              preexec_fn=lambda: os.sched_setaffinity(0, cores))
    seq_log, text = finish(seq, seq_out), finish(packed, packed_out)

    shared = "CPU cores " + ",".join(map(str, sorted(cores)))
    assert f"Starting 2 workers on journal:///{packed_dir}/sweeps/packed/study.journal: w0: {shared} (trial slot " \
           f"1/2, 1 thread); w1: {shared} (trial slot 2/2, 1 thread)" in text, text[-3000:]
    for w in ("[w0]", "[w1]"):  # both worker processes trained, at 1 torch thread each
        assert re.search(rf"{re.escape(w)} Device: CPU: .*, 1 threads of", text), text[-3000:]
    assert re.search(r"Device: CPU: .*, 1 threads of", seq_log), seq_log[-3000:]

    sequential = records(optuna.load_study(study_name="seq", storage=f"sqlite:///{seq_dir / 'sweeps/seq/study.db'}"))
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    journal = JournalStorage(JournalFileBackend(str(packed_dir / "sweeps/packed/study.journal")))
    together = records(optuna.load_study(study_name="packed", storage=journal))
    assert sorted(sequential) == sorted(together) == ["r=2", "r=4"]
    assert len({r.worker for r in together.values()}) == 2 and packed.pid not in {
        int(r.worker.rsplit(":", 1)[1]) for r in together.values()}  # one trial in each worker, none in the launcher
    for label, one in sequential.items():
        for name in ("eval_accuracy", "eval_loss", "train_loss", "peak_memory_mb", "predicted_memory_mb"):
            assert getattr(together[label], name) == getattr(one, name), (label, name)
    assert sequential["r=2"].eval_loss != sequential["r=4"].eval_loss  # the points differ: a swap would show
