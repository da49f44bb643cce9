"""Racing each configuration's candidates (study.tune, search/race.py), on real Optuna studies whose
trials report a constructed landscape instead of training: successive halving within the arm keeps the
best candidate, drops clearly worse ones at the first rung, never starts a candidate twice for nothing,
and reaches the same decisions with two workers and after a kill."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lora_sweep.search import race
from lora_sweep.search.space import SearchSpace
from lora_sweep.run.sweep import _search
from lora_sweep.search.study import create_study, fail_orphans, queue_study, resume

LRS = (3e-4, 1e-3, 3e-3)
# accuracy after epoch 1 and 2 for (r, lr): early rungs rank candidates as the last does; 1e-3 best for r=4,
# 3e-3 best for r=8 (the last candidate: it trains straight on when kept), 3e-4 clearly worst everywhere
LANDSCAPE = {(4, 3e-4): (0.60, 0.65), (4, 1e-3): (0.80, 0.85), (4, 3e-3): (0.75, 0.80),
             (8, 3e-4): (0.62, 0.66), (8, 1e-3): (0.74, 0.78), (8, 3e-3): (0.82, 0.86)}


@pytest.fixture
def race_config(make_config):
    def _make(tune=LRS, seeds=None, **study):
        space = {"lora.r": "choice(4, 8)"}
        if seeds:
            space["train.seed"] = f"choice({', '.join(map(str, seeds))})"
        lrs = ", ".join(f"{x:g}" for x in tune)
        return make_config(space, study={"name": "race", "tune": {"train.learning_rate": f"choice({lrs})"},
                                         **study}, train={"num_train_epochs": 2})
    return _make


class Landscape:
    """The objective's shape without training: suggest, report each epoch, ask the pruner."""

    def __init__(self, space: SearchSpace, values=LANDSCAPE, noise=None, delay=0.0):
        self.space, self.values, self.noise, self.delay = space, values, noise or {}, delay
        self.steps = 0
        self.lock = threading.Lock()

    def __call__(self, trial: optuna.Trial) -> float:
        point = self.space.suggest(trial)
        r, lr, seed = point.settings.lora.r, point.settings.train.learning_rate, point.settings.train.seed
        curve = self.values[(r, lr)]
        for step, v in enumerate(curve, start=1):
            with self.lock:
                self.steps += 1
            v += self.noise.get(seed, 0.0)
            time.sleep(self.delay)  # two workers' trials overlap
            trial.report(v, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return v


def run(config, objective=None, study=None):
    """The sweep's own loop (run.sweep._search: pop queued trials, queue what the race needs after each)."""
    space = SearchSpace(config)
    study = study or create_study(config, space)
    resume(config, space, study)
    objective = objective or Landscape(space)
    _search(config, space, study, objective, grid=True, callbacks=())
    return study, objective


def plan_rungs(config) -> tuple:
    return race.make_plan(config, SearchSpace(config)).rungs


def finals(study) -> dict:
    """(r, lr, seed) of every trial that trained to the end."""
    out = {}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        key = (t.params["lora.r"], t.params["train.learning_rate"], t.params.get("train.seed"))
        out[key] = out.get(key, 0) + 1
    return out


def test_rungs_follow_successive_halving(race_config, make_config):
    assert plan_rungs(race_config()) == (1,)  # 3 candidates, eta 3: one halving, after the first of 2 epochs
    one_epoch = make_config({"lora.r": "choice(4, 8)"}, study={"tune": {"train.learning_rate": "choice(1, 2, 3)"}},
                            train={"num_train_epochs": 1})
    assert plan_rungs(one_epoch) == ()  # no evaluation before the end: nothing to race on
    steps = make_config({"lora.r": "choice(4, 8)"}, study={"tune": {"train.learning_rate": "choice(1, 2, 3)"}},
                        train={"num_train_epochs": 2, "eval_steps": 10, "per_device_train_batch_size": 10},
                        data={"train_size": 300})
    assert plan_rungs(steps) == (20,)  # 60 steps in all: the first evaluation at or after 60 / 3


def test_the_race_keeps_each_arms_best_and_drops_the_worst_at_the_first_rung(race_config):
    study, objective = run(race_config())
    assert finals(study) == {(4, 1e-3, None): 1, (8, 3e-3, None): 1}  # each arm's best, trained to the end once
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert sorted((t.params["lora.r"], t.params["train.learning_rate"]) for t in pruned) == [
        (4, 3e-4), (4, 1e-3), (4, 3e-3), (8, 3e-4), (8, 1e-3)]  # r=8's 3e-3 completed its rung and went on
    assert all(t.last_step == 1 for t in pruned)
    # 6 candidates x 1 epoch, r=4's winner again from step 0 (2), r=8's straight on (1 more): 2.25x the 4 of one lr
    assert objective.steps == 9


def test_seeds_race_together_on_their_mean(race_config):
    # seed 2 lifts every candidate equally: the arm's choice is the same, and runs under both seeds
    landscape = Landscape(SearchSpace(race_config(seeds=(1, 2))), noise={2: 0.05})
    study, _ = run(race_config(seeds=(1, 2)), landscape)
    assert finals(study) == {(4, 1e-3, 1): 1, (4, 1e-3, 2): 1, (8, 3e-3, 1): 1, (8, 3e-3, 2): 1}


def test_without_racing_every_candidate_trains_to_the_end(race_config):
    study, objective = run(race_config(race=False))
    assert len(finals(study)) == 6 and objective.steps == 12


@pytest.fixture(params=["journal", "postgresql"])
def shared_storage(request, tmp_path):
    """The two stores several workers share: a journal file (one machine), PostgreSQL (several hosts)."""
    if request.param == "journal":
        yield f"journal:///{tmp_path}/race.journal"
        return
    sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
    from services import fresh_database, pg_url

    with fresh_database("lora_sweep_race") as db:
        yield pg_url(db)


def test_two_workers_reach_the_same_decisions_without_duplicates(race_config, shared_storage):
    config = race_config(storage=shared_storage, workers=2)
    space = SearchSpace(config)
    study = create_study(config, space)
    resume(config, space, study)
    objective = Landscape(space, delay=0.05)
    errors = []

    def worker():
        try:
            run(config, objective, create_study(config, space))  # each worker opens the study as the sweep does
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert finals(study) == {(4, 1e-3, None): 1, (8, 3e-3, None): 1}


def test_a_killed_race_resumes_to_the_same_decisions(race_config):
    config = race_config()
    space = SearchSpace(config)
    study = create_study(config, space)
    resume(config, space, study)
    queue = queue_study(study)
    queue.optimize(Landscape(space), n_trials=5, callbacks=[race.Promote(config, race.make_plan(config, space))])
    orphan = queue.ask()  # a worker popped r=8's best candidate and died before its first evaluation
    assert fail_orphans(study) == [orphan.number]
    study, _ = run(config, study=study)
    assert finals(study) == {(4, 1e-3, None): 1, (8, 3e-3, None): 1}
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))


def test_two_rungs_halve_twice_and_decide_each_rung_once_its_candidates_reached_it(race_config, make_config):
    lrs = (1e-4, 3e-4, 1e-3, 3e-3)  # 4 candidates, eta 2: rungs after epochs 1 and 2 of 4
    # 3e-3 leads at epoch 1, 1e-3 overtakes it by epoch 2 and stays ahead
    curves = {1e-4: (0.50, 0.50, 0.50, 0.50), 3e-4: (0.55, 0.56, 0.57, 0.58), 1e-3: (0.60, 0.75, 0.80, 0.85),
              3e-3: (0.70, 0.72, 0.73, 0.74)}
    values = {(r, lr): c for r in (4, 8) for lr, c in curves.items()}
    config = race_config(tune=lrs, race_eta=2)
    config = make_config({"lora.r": "choice(4, 8)"}, study={**{k: getattr(config.study, k) for k in (
        "name", "tune", "race_eta")}}, train={"num_train_epochs": 4})
    assert plan_rungs(config) == (1, 2)
    study, _ = run(config, Landscape(SearchSpace(config), values))
    assert finals(study) == {(4, 1e-3, None): 1, (8, 1e-3, None): 1}  # 3e-3 waited at epoch 2 and lost there
    for r in (4, 8):
        reached = lambda step: {t.params["train.learning_rate"] for t in study.trials  # noqa: E731
                                if t.params["lora.r"] == r and step in t.intermediate_values}
        assert reached(1) == set(lrs) and reached(2) == {1e-3, 3e-3} and reached(3) == {1e-3}
