"""Racing each configuration's candidates (study.tune): synchronous successive halving within the arm.

An arm is a configuration of the space (its values without the seed and the tuned paths); its candidates
are study.tune's grid. Every candidate trains to the first rung under every seed; there the arm keeps the
best ceil(n / study.race_eta) by the validation metric (the mean over seeds) and drops the rest; the
survivors go on to the next rung, and after the last rung to the end. The test split is never read.

Synchronous, not asynchronous (ASHA, Optuna's SuccessiveHalvingPruner): an asynchronous rule compares a
trial with whatever reached the rung before it, across the whole study, and lets the first trials of a
rung through unconditionally, which is every first candidate when trials run one at a time. Here a rung
is decided only once every candidate of the arm has reached it. A candidate that reaches a rung before
its arm is decided stops there (Optuna PRUNED, its rung value stored); if the arm later keeps it, it is
trained again from step 0 as a new trial (no checkpoint to resume from; the cost is one rung per such
survivor). The candidate that completes its arm's rung trains straight on when it is kept.

Every decision is a pure function of the stored trials (their intermediate values), so several workers
and a sweep resumed after a kill reach the same one: plan() lists what is still missing, the pruner
decides a rung the moment it is complete.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from lora_sweep.config import Config
from lora_sweep.record import configuration
from lora_sweep.search.space import SearchSpace

log = logging.getLogger("lora_sweep")
SEED = "train.seed"
CAP = "rung_cap"  # the record's field: the rung a trial stops at unless its arm keeps it there


def racing(config: Config, space: SearchSpace) -> bool:
    return bool(space.tuned) and config.study.race


def rungs(config: Config, n: int) -> tuple[int, ...]:
    """The rungs (epochs, or optimizer steps with train.eval_steps) where an arm's candidates are compared,
    before the end: ceil(log_eta n) halvings, rung k at the first evaluation at or after R * eta^(k - K) of
    the R units of training (successive halving's equal budget per rung); n: the candidates of an arm."""
    eta = config.study.race_eta
    halvings = max(1, math.ceil(math.log(n, eta) - 1e-9))
    train = config.base.train
    if train.eval_steps:
        size = config.base.data.train_size
        per_epoch = math.ceil(size / (train.per_device_train_batch_size * train.gradient_accumulation_steps)) \
            if size else None
        total = per_epoch * train.num_train_epochs if per_epoch else None
        every = train.eval_steps
        if total is None:  # the step count is unknown before the data is read: rungs at evaluations, eta apart
            return tuple(every * eta ** k for k in range(halvings))
        points = [every * i for i in range(1, math.ceil(total / every))]
    else:
        total, points = train.num_train_epochs, list(range(1, train.num_train_epochs))
    out = []
    for k in range(1, halvings + 1):
        target = total * eta ** (k - halvings - 1)
        later = [p for p in points if p >= target - 1e-9]
        if later and later[0] not in out:
            out.append(later[0])
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    arms: list        # each arm's params (searched values without the seed and the tuned paths)
    seeds: list       # the seed values searched (one None: the base seed)
    candidates: list  # each candidate's tuned params, in the order study.tune lists them
    rungs: tuple
    eta: int
    sign: int         # +1: higher is better


def make_plan(config: Config, space: SearchSpace) -> Plan:
    grid = space.grid()
    tuned = list(space.tuned)
    arm_paths = [p for p in grid if p not in tuned and p != SEED]
    arms = [dict(zip(arm_paths, v)) for v in itertools.product(*(grid[p] for p in arm_paths))]
    candidates = [dict(zip(tuned, v)) for v in itertools.product(*(grid[p] for p in tuned))]
    seeds = list(grid[SEED]) if SEED in grid else [None]
    return Plan(arms, seeds, candidates, rungs(config, len(candidates)), config.study.race_eta,
                1 if config.study.direction == "maximize" else -1)


def _key(d: dict) -> str:
    return json.dumps({k: d[k] for k in sorted(d)}, default=str)


def _params(t) -> dict:
    return t.system_attrs.get("fixed_params") or t.params


class _Arm:
    """The stored trials of one arm, by (candidate, seed)."""

    def __init__(self, plan: Plan, trials: list):
        self.plan = plan
        self.trials = {}
        for t in trials:
            self.trials.setdefault((_key(_cand(plan, _params(t))), _params(t).get(SEED)), []).append(t)

    def of(self, cand: dict, seed) -> list:
        return self.trials.get((_key(cand), seed), [])

    def value(self, cand: dict, seed, step: int):
        for t in sorted(self.of(cand, seed), key=lambda t: t.state != TrialState.COMPLETE):
            if step in t.intermediate_values:
                return t.intermediate_values[step]
        return None

    def pending(self, cand: dict, seed) -> bool:
        """A queued or running trial of it: it goes as far as its arm keeps it, which is where the race
        needs it (a trial stopped at a rung where its arm keeps it trains straight on)."""
        return any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in self.of(cand, seed))

    def dropped(self, cand: dict, seed, retry_failed: bool) -> bool:
        """It failed and nothing of it is queued or running (not retried during a sweep: a failure is a
        result; a sweep started again retries it)."""
        return not retry_failed and not self.pending(cand, seed) and any(
            t.state == TrialState.FAIL for t in self.of(cand, seed))

    def complete(self, cand: dict, seed) -> bool:
        return any(t.state == TrialState.COMPLETE for t in self.of(cand, seed))

    def walk(self, retry_failed: bool = False):
        """The race so far: (alive candidates per decided rung, the first undecided rung's index or None,
        its missing (candidate, seed) pairs). alive[k] = the candidates that race at rung k."""
        plan = self.plan
        alive = [list(plan.candidates)]
        for k, step in enumerate(plan.rungs):
            scores, missing = [], []
            for cand in alive[-1]:
                values = []
                for seed in plan.seeds:
                    v = self.value(cand, seed, step)
                    if v is not None:
                        values.append(v)
                    elif not self.dropped(cand, seed, retry_failed):
                        missing.append((cand, seed))
                scores.append((cand, sum(values) / len(values) if values else None))
            if missing:
                return alive, k, missing
            ranked = [c for c, v in sorted((x for x in scores if x[1] is not None),
                                           key=lambda x: -plan.sign * x[1])]  # stable: ties keep the tune order
            keep = math.ceil(len(alive[-1]) / plan.eta)
            alive.append([c for c in plan.candidates if c in ranked[:keep]])
        return alive, None, []


def _cand(plan: Plan, params: dict) -> dict:
    return {p: params.get(p) for p in (plan.candidates[0] if plan.candidates else {})}


def arms_of(plan: Plan, study: optuna.Study) -> dict:
    trials = study.get_trials(deepcopy=False)
    tuned = tuple(plan.candidates[0]) if plan.candidates else ()
    groups = {}
    for t in trials:
        groups.setdefault(_key(configuration(_params(t), tuned)), []).append(t)
    return {_key(arm): _Arm(plan, groups.get(_key(arm), [])) for arm in plan.arms}


def missing(plan: Plan, study: optuna.Study, retry_failed: bool = False) -> list[tuple[dict, dict]]:
    """What to enqueue now, (Optuna params, user attrs): each arm's candidates that its current rung lacks,
    else the survivors' runs to the end; nothing already queued, running or done."""
    out = []
    for arm, state in zip(plan.arms, arms_of(plan, study).values()):
        alive, k, gaps = state.walk(retry_failed)
        if k is not None:
            step = plan.rungs[k]
            todo = [(c, s, step) for c, s in gaps if not state.pending(c, s)]
        else:
            todo = [(c, s, None) for c in alive[-1] for s in plan.seeds if not state.complete(c, s)
                    and not state.pending(c, s) and not state.dropped(c, s, retry_failed)]
        for cand, seed, cap in todo:
            params = {**arm, **({SEED: seed} if seed is not None else {}), **cand}
            out.append((params, {CAP: cap} if cap is not None else {}))
    return out


def enqueue(plan: Plan, study: optuna.Study, retry_failed: bool = False) -> int:
    """Queue what missing() lists (call it under storage.study_lock when several workers may run)."""
    todo = missing(plan, study, retry_failed)
    for params, attrs in todo:
        study.enqueue_trial(params, user_attrs=attrs)
    return len(todo)


def expected(plan: Plan) -> int:
    """Trials a race runs when every candidate that is kept at a rung must be run again from step 0."""
    n, total = len(plan.candidates), len(plan.candidates)
    for _ in plan.rungs:
        n = math.ceil(n / plan.eta)
        total += n
    return total * len(plan.arms) * len(plan.seeds)


def remaining(plan: Plan, study: optuna.Study) -> int:
    """Trials still to start: the queued ones, and at least the runs the coming decisions will add
    (0 once every arm is decided and run)."""
    count = Counter(t.state for t in study.get_trials(deepcopy=False))
    waiting, running = count[TrialState.WAITING], count[TrialState.RUNNING]
    if not (waiting or running or missing(plan, study)):
        return 0
    done = count[TrialState.COMPLETE] + count[TrialState.PRUNED]
    return max(waiting, expected(plan) - done - running)


def enqueue_under_lock(config: Config, plan: Plan, study: optuna.Study) -> int:
    from lora_sweep.search.storage import study_lock

    with study_lock(config):
        return enqueue(plan, study)


class Promote:
    """An Optuna callback: after each trial, queue what the race now needs (kept candidates' runs,
    candidates that must reach the next rung), under the study's lock so workers never queue one twice."""

    def __init__(self, config: Config, plan: Plan):
        self.config, self.plan = config, plan

    def __call__(self, study: optuna.Study, trial) -> None:
        enqueue_under_lock(self.config, self.plan, study)


class RacePruner(optuna.pruners.BasePruner):
    """Stops a racing trial at its rung unless its arm is decided there in its favour; then it trains on
    (its rung_cap moves to the next rung, or to the end)."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        # from the storage: the trial's own copy still holds a cap this pruner lifted at an earlier rung
        cap = study._storage.get_trial(trial._trial_id).user_attrs.get(CAP)
        step = trial.last_step
        if cap is None or step is None or step < cap:
            return False
        tuned = tuple(self.plan.candidates[0]) if self.plan.candidates else ()
        arm_key = _key(configuration(_params(trial), tuned))
        state = arms_of(self.plan, study).get(arm_key)
        if state is None or cap not in self.plan.rungs:
            return True
        k = self.plan.rungs.index(cap)
        alive, undecided, _ = state.walk()
        if undecided is not None and undecided <= k:
            return True  # its arm-mates have not all reached this rung: stop here, run again if kept
        kept = _cand(self.plan, _params(trial)) in alive[k + 1]
        log.info("Race, arm %s at %s: kept %s of %d candidate(s)", _label(configuration(_params(trial), tuned)),
                 cap, "; ".join(_label(c) for c in alive[k + 1]), len(alive[k]))
        if kept:
            nxt = self.plan.rungs[k + 1] if k + 1 < len(self.plan.rungs) else None
            study._storage.set_trial_user_attr(trial._trial_id, CAP, nxt)
        return not kept


def _label(d: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in d.items()) or "base"
