"""The confirmation stage (study.confirm): its statistics on constructed runs, and a tiny sweep whose
top configurations are re-trained under more seeds in a companion study, apart from the search."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import lora_sweep.report.stats as stats
from lora_sweep.config import ConfigError
from lora_sweep.search import confirm
from test_search_tiny import mlflow_runs, tiny_config  # noqa: F401  (the tiny sweep fixture)
from test_trial_tiny import assets  # noqa: F401

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches")]


def test_two_level_bootstrap_without_any_noise_is_the_exact_difference():
    right, wrong = np.ones(50), np.zeros(50)
    d = stats.two_level_bootstrap(stats.mean, [(right,), (right,)], [(wrong,), (wrong,), (wrong,)], resamples=999)
    assert d.estimate == 1.0 and d.interval() == (1.0, 1.0)
    assert d.p == pytest.approx(2 / 1000)  # no resample reaches 0: the smallest p 999 resamples can give


def test_two_level_bootstrap_resamples_the_seeds():
    # Each seed scores the same on every example, so only the seed draw varies: first's three seeds
    # score 0.6, 0.7, 0.8, second's 0.7 each. A mean of three draws from {0.6, 0.7, 0.8} is 0.6 with
    # probability 1/27 (3.7%, above the 2.5% tail) and 0.8 likewise: the 95% interval is -0.1 to +0.1.
    first = [(np.full(40, v),) for v in (0.6, 0.7, 0.8)]
    second = [(np.full(40, 0.7),)] * 3
    d = stats.two_level_bootstrap(stats.mean, first, second, resamples=4000, seed=1)
    assert d.estimate == pytest.approx(0.0)
    low, high = d.interval()
    assert low == pytest.approx(-0.1) and high == pytest.approx(0.1)
    assert d.p > 0.5
    # Examples alone (one seed each) would see no noise here: the seed level is what widens it.
    alone = stats.two_level_bootstrap(stats.mean, first[:1], second[:1], resamples=500)
    assert alone.interval() == pytest.approx((-0.1, -0.1))


def test_holm_levels_step_down():
    assert stats.holm_levels([0.01, 0.04, 0.03]) == pytest.approx([1 - 0.05 / 3, 0.95, 1 - 0.05 / 2])


def test_confirm_settings_are_checked(tiny_config):  # noqa: F811
    for bad, field in (({"top_k": 1}, "study.confirm.top_k"), ({"top_k": 2, "seeds": 1}, "study.confirm.seeds"),
                       ({"top_k": 2, "seedz": 3}, "study.confirm"),
                       ({"top_k": 2, "seeds": 3, "seed_list": [1]}, "study.confirm.seed_list")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            tiny_config({"lora.r": "choice(2, 4)"}, {"name": "c", "confirm": bad})
    config = tiny_config({"train.seed": "choice(1, 2)"}, {"name": "c", "confirm": {"top_k": 2}})
    with pytest.raises(ConfigError, match="space.train.seed"):
        confirm.stage_config(config)


def _sweep(tmp_path, model_dir, csv_path) -> subprocess.Popen:
    args = [f"model.name_or_path={model_dir}", f"data.name_or_path={csv_path}", "data.encoding=null",
            "data.label_column=label", "data.labels=null", "data.train_size=80", "data.eval_size=40",
            "data.max_length=16", "train.device=cpu", "train.num_train_epochs=2", "train.per_device_train_batch_size=8", "train.save_adapter=false",
            "lora.r=4", "lora.lora_alpha=8", "study.name=conf", '+space.train.learning_rate="choice(0.05, 1e-6)"', "study.sampler=grid",
            "study.confirm={top_k:2,seeds:3}", f"paths.sweeps_dir={tmp_path / 'sweeps'}",
            f"paths.reports_dir={tmp_path / 'reports'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lora_sweep", *args], cwd=tmp_path, env=env,
                            stdout=open(tmp_path / "out.txt", "a"), stderr=subprocess.STDOUT)


@pytest.mark.slow  # two sweep processes, one killed: about a minute; CI runs it, make test-fast skips it
def test_a_killed_confirmation_resumes_without_repeating_a_finished_run(tmp_path, assets):  # noqa: F811
    storage = f"sqlite:///{tmp_path / 'sweeps' / 'conf' / 'study.db'}"

    def stage_trials():
        try:
            return optuna.load_study(study_name="conf.confirm", storage=storage).get_trials(deepcopy=False)
        except (KeyError, Exception):
            return []

    proc = _sweep(tmp_path, *assets)
    deadline = time.monotonic() + 300
    while not any(t.state == TrialState.COMPLETE for t in stage_trials()):
        assert proc.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-stage: one confirmation run done, the next one under way
    proc.wait(timeout=30)
    before = {t.number: t.datetime_complete for t in stage_trials() if t.state == TrialState.COMPLETE}
    assert 1 <= len(before) < 4

    proc = _sweep(tmp_path, *assets)
    assert proc.wait(timeout=300) == 0, (tmp_path / "out.txt").read_text()[-3000:]
    study = optuna.load_study(study_name="conf", storage=storage)
    assert len(study.trials) == 2 and not any(t.user_attrs.get("stage") for t in study.trials)  # search apart
    runs = stage_trials()
    done = [t for t in runs if t.state == TrialState.COMPLETE]
    # each (configuration, seed) trained once: the runs finished before the kill were not repeated
    assert sorted((t.user_attrs["confirms"], t.params["train.seed"]) for t in done) == [
        (0, 1), (0, 2), (1, 1), (1, 2)]
    assert {t.number: t.datetime_complete for t in done if t.number in before} == before
    assert len(runs) - len(done) <= 1  # at most the run the kill interrupted, failed and queued again
    for t in done:  # the search trial's configuration, under another seed
        own = study.trials[t.user_attrs["confirms"]]
        assert {k: v for k, v in t.params.items() if k != "train.seed"} == own.params
        assert (tmp_path / "sweeps" / "conf" / "confirm" / "examples" / f"trial-{t.number}.parquet").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lora-sweep/conf")
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    tagged = [r for r in children if r.data.tags.get("stage") == "confirm"]
    assert sum(r.info.status == "FINISHED" for r in tagged) == 4 and not [r for r in children
                                                                          if r.info.status == "RUNNING"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {study.user_attrs["mlflow_parent_run_id"]}

    # lr 0.05 learns the tiny task and lr 1e-6 does not, under every seed: a winner beyond noise
    report = (tmp_path / "reports" / "conf" / "report.md").read_text()
    assert "## Confirmation across seeds" in report and report.count("| 3/3 |") == 2
    winner = next(t for t in study.trials if t.params["train.learning_rate"] == 0.05)
    assert f"Winner: learning_rate=0.05 (trial #{winner.number})" in report
    assert f"(trial #{winner.number}): the confirmation stage's winner over 3 seeds" in report


def test_the_search_s_own_pick_is_confirmed_beside_the_top_k(tiny_config):  # noqa: F811
    config = tiny_config({"lora.r": "choice(2, 4, 8)"}, {"name": "c", "confirm": {"top_k": 2, "seeds": 3}})
    study = optuna.create_study(direction="maximize")
    dist = {"lora.r": optuna.distributions.CategoricalDistribution([2, 4, 8])}
    for r, acc in ((2, 0.85), (4, 0.88), (8, 0.87)):
        study.add_trial(optuna.trial.create_trial(params={"lora.r": r}, distributions=dist, value=acc, user_attrs={
            "eval_accuracy": acc, "trainable_params": 1000 * r}))
    assert [t.params["lora.r"] for t in confirm.top_trials(config, study)] == [4, 8]
    assert [t.params["lora.r"] for t in confirm.top_trials(config, study, also=(0,))] == [4, 8, 2]
    assert [t.params["lora.r"] for t in confirm.top_trials(config, study, also=(2,))] == [4, 8]  # already there
