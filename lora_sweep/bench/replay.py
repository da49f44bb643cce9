"""Search benchmark, replayed: each search method runs over a stored exhaustive grid instead of training.

    python -m lora_sweep +sweep=search_benchmark study.workers=2                    # once: the table
    python -m lora_sweep.bench.replay --study sweeps/search_benchmark --out reports/search_benchmark
    python -m lora_sweep.bench.replay --table reports/search_benchmark/table.csv    # again, from the table

The product's own samplers, pruners, search loop (run.sweep._search) and race (study.tune) run against
the table: a suggested configuration is answered with its stored evaluations one at a time, and charged
the seconds the real trial had taken by then, so a pruned or race-stopped one costs only what it ran.
Each method runs under many seeds: the sampler's seed, and for the grid and the race (whose order is the
space's listing order) a shuffled listing of every parameter's values. Regret is the held-out test gap
between the grid's pick (its best on validation) and the method's current pick (its best complete trial on
validation), against the summed trial seconds; see lora_sweep/bench/replay_report.py for the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from lora_sweep import record
from lora_sweep.config import Config
from lora_sweep.config.checks import flatten
from lora_sweep.config.load import from_mapping
from lora_sweep.search.samplers import make_pruner, make_sampler, sampler_name
from lora_sweep.search.space import SearchSpace, _current, _encode
from lora_sweep.search.study import resume

# method -> how the product is configured for it (study.* settings; "tune": the parameter raced per arm)
METHODS = {
    "grid": {"sampler": "grid", "pruner": "none"},
    "random": {"sampler": "random", "pruner": "none"},
    "tpe": {"sampler": "tpe", "pruner": "none"},
    "tpe+median": {"sampler": "tpe", "pruner": "median"},
    "tpe(4)+median": {"sampler": "tpe", "pruner": "median", "sampler_args": {"n_startup_trials": 4}},
    "race": {"sampler": "grid", "pruner": "none", "tune": "train.learning_rate"},
}
FIXED = ("status", "step", "value", "trial_seconds", "test_value", "trial")
log = logging.getLogger("lora_sweep")


@dataclass(frozen=True)
class Stored:
    """One configuration's trial in the exhaustive grid: its evaluations, what they cost, its test score."""
    steps: tuple          # the step (or epoch) of each evaluation
    values: tuple         # study.metric at each
    seconds: tuple        # the trial's seconds (training and evaluations) at each
    test: float           # the held-out test score after training (NaN: none)
    failed: bool = False  # it failed after its last evaluation (charged, never a result)


@dataclass(frozen=True)
class Table:
    params: tuple         # searched paths, in the space's order
    rows: dict            # tuple of values (params order) -> Stored
    settings: dict        # the sweep's stored configuration (plain data)
    metric: str
    maximize: bool

    def best(self, test: bool = False) -> tuple:
        """Key of the best complete configuration on validation (or test); ties: the first listed."""
        done = [(k, s) for k, s in self.rows.items() if not s.failed and s.values]
        score = (lambda s: s.test) if test else (lambda s: s.values[-1])
        sign = 1 if self.maximize else -1
        return max(done, key=lambda ks: sign * score(ks[1]))[0]

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds[-1] for s in self.rows.values() if s.seconds)


def from_study(study: optuna.Study) -> Table:
    """The exhaustive grid's table from its stored trials (their records: evaluations, seconds, test)."""
    stored = record.settings(study).get("config") or {}
    study_cfg = stored.get("study") or {}
    metric = study_cfg.get("metric", "eval_accuracy")
    test_metric = "test_" + metric.removeprefix("eval_")
    params = tuple(flatten(stored.get("space") or {}))
    if not params:
        raise ValueError(f"study {study.study_name!r} stores no searched space (a sweep from before its settings "
                         f"were stored, or not a sweep): nothing to replay")
    rows = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        rec = record.TrialRecord.from_trial(t)
        if not all(p in t.params for p in params):
            continue
        key = tuple(t.params[p] for p in params)
        evals = [e[metric] for e in rec.epochs if metric in e]
        steps = sorted(t.intermediate_values)
        if not len(steps) == len(evals) == len(rec.evaluated_at_s):
            raise ValueError(f"trial {t.number}: {len(steps)} reported steps, {len(evals)} evaluations and "
                             f"{len(rec.evaluated_at_s)} times; the table needs a sweep that records evaluated_at_s")
        test = getattr(rec, test_metric, None)
        rows[key] = Stored(tuple(steps), tuple(evals), tuple(rec.evaluated_at_s),
                           float("nan") if test is None else float(test), failed=t.state == TrialState.FAIL)
    direction = study_cfg.get("direction", "maximize")
    return Table(params, rows, stored, metric, direction != "minimize")


def to_frame(table: Table) -> pd.DataFrame:
    """One row per evaluation (a failed trial's last row says so)."""
    rows = []
    for key, s in table.rows.items():
        for i, (step, value, sec) in enumerate(zip(s.steps, s.values, s.seconds)):
            last = i == len(s.steps) - 1
            rows.append({**dict(zip(table.params, key)), "status": "fail" if (s.failed and last) else "ok",
                         "step": step, "value": value, "trial_seconds": round(sec, 3),
                         "test_value": s.test if last else float("nan")})
    return pd.DataFrame(rows)


def from_frame(frame: pd.DataFrame, meta: dict) -> Table:
    params = tuple(c for c in frame.columns if c not in FIXED)
    rows = {}
    for key, g in frame.groupby(list(params), sort=False):
        key = tuple(_plain(v) for v in (key if isinstance(key, tuple) else (key,)))
        g = g.sort_values("step")
        rows[key] = Stored(tuple(int(s) for s in g["step"]), tuple(map(float, g["value"])),
                           tuple(map(float, g["trial_seconds"])), float(g["test_value"].iloc[-1]),
                           failed=bool((g["status"] == "fail").any()))
    return Table(params, rows, meta["settings"], meta["metric"], meta["maximize"])


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def write_table(table: Table, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    to_frame(table).to_csv(folder / "table.csv", index=False)
    (folder / "table.json").write_text(json.dumps(
        {"settings": table.settings, "metric": table.metric, "maximize": table.maximize}, indent=1, default=str))
    return folder / "table.csv"


def read_table(path: Path) -> Table:
    return from_frame(pd.read_csv(path), json.loads(path.with_suffix(".json").read_text()))


# -- one replay: the product's search over the table ------------------------------------------------------

@dataclass(frozen=True)
class Charge:
    """One finished trial of a replay: the summed seconds after it, and what it gave."""
    spent: float
    key: tuple
    state: str            # complete | pruned | fail
    value: float | None   # its final validation value when complete


@dataclass
class Answer:
    """The objective: answers a suggested configuration from the table and charges its seconds."""
    space: SearchSpace
    table: Table
    budget: float | None = None          # stop the study once this many seconds are spent (None: run out)
    planned: int = 0                     # for run.sweep._search's non-grid path (study.optimize's n_trials)
    charges: list = field(default_factory=list)
    spent: float = 0.0

    def __call__(self, trial: optuna.Trial) -> float:
        point = self.space.suggest(trial)
        key = tuple(_encode(_current(point.settings, p)) for p in self.table.params)  # as trial.params hold it
        stored = self.table.rows[key]
        try:
            for step, value, sec in zip(stored.steps, stored.values, stored.seconds):
                trial.report(value, step)
                if trial.should_prune():
                    self._charge(key, "pruned", sec, None)
                    raise optuna.TrialPruned()
            if stored.failed or not stored.values:
                self._charge(key, "fail", stored.seconds[-1] if stored.seconds else 0.0, None)
                raise RuntimeError(f"{key}: the stored trial failed")
            self._charge(key, "complete", stored.seconds[-1], stored.values[-1])
            return stored.values[-1]
        finally:
            if self.budget is not None and self.spent >= self.budget:
                trial.study.stop()

    def _charge(self, key, state, seconds, value) -> None:
        self.spent += seconds
        self.charges.append(Charge(self.spent, key, state, value))


def method_config(table: Table, method: str, seed: int, workdir: Path) -> Config:
    """The product's configuration for `method` over the table's space, seeded: study.seed, and for the grid
    and the race a shuffled listing of each parameter's values (their order is the grid's order)."""
    spec = METHODS[method]
    raw = json.loads(json.dumps(table.settings))
    values = {p: list(dict.fromkeys(k[i] for k in table.rows)) for i, p in enumerate(table.params)}
    rng = random.Random(seed)
    if spec["sampler"] == "grid":
        for v in values.values():
            rng.shuffle(v)
    choice = {p: f"choice({', '.join(map(_show, v))})" for p, v in values.items()}
    tuned = {spec["tune"]: choice.pop(spec["tune"])} if "tune" in spec else {}
    raw["space"] = choice  # dotted paths: the loader flattens nested ones the same way
    grid_size = math.prod(len(v) for v in values.values())
    raw["study"] = {**raw.get("study", {}), "sampler": spec["sampler"], "pruner": spec["pruner"], "seed": seed,
                    "sampler_args": spec.get("sampler_args", {}), "pruner_args": {}, "tune": tuned, "race": True, "workers": 1,
                    "n_trials": None if spec["sampler"] == "grid" else 10 * grid_size, "storage": None,
                    "name": f"replay-{method}-{seed}", "confirm": None, "warm_start": [], "budget_s": None,
                    "timeout": None}
    raw["paths"] = {"sweeps_dir": str(workdir), "reports_dir": str(workdir)}
    return from_mapping(raw)


def _show(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def replay(table: Table, method: str, seed: int, budget: float | None = None) -> list[Charge]:
    """Run `method` under `seed` over the table with the product's search loop; the charges in order."""
    from lora_sweep.run.sweep import _search

    with tempfile.TemporaryDirectory() as tmp:
        config = method_config(table, method, seed, Path(tmp))
        space = SearchSpace(config)
        config.study_dir.mkdir(parents=True)  # the race's queue lock lives there
        study = optuna.create_study(study_name=config.study.name, sampler=make_sampler(config, space),
                                    pruner=make_pruner(config, space), directions=list(config.study.directions))
        grid = sampler_name(config, space) == "grid"
        resume(config, space, study)
        answer = Answer(space, table, None if grid else budget, planned=config.study.n_trials or 0)
        _search(config, space, study, answer, grid, callbacks=())
    return answer.charges


def main(argv: list[str] | None = None) -> int:
    from lora_sweep.bench import replay_report

    parser = argparse.ArgumentParser(prog="python -m lora_sweep.bench.replay", description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", type=Path, help="the exhaustive sweep's folder (sweeps/<name>): writes its table")
    src.add_argument("--table", type=Path, help="a stored table (table.csv, with table.json beside it)")
    parser.add_argument("--seeds", type=int, default=20, help="seeds per method (default 20)")
    parser.add_argument("--out", type=Path, default=Path("reports/search_benchmark"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from lora_sweep.bench.fair import load

    try:  # before anything is written: a bad source is one line, exit 2
        table = from_study(load(args.study)) if args.study else read_table(args.table)
    except (ValueError, OSError) as e:
        parser.error(f"{args.study or args.table}: {e}")
    if args.study:
        write_table(table, args.out)
    runs = {m: [replay(table, m, seed, budget=table.total_seconds) for seed in range(args.seeds)] for m in METHODS}
    text = replay_report.markdown(table, runs, command="python -m lora_sweep.bench.replay " + " ".join(
        sys.argv[1:] if argv is None else argv))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.md").write_text(text)
    replay_report.plot(table, runs, args.out / "regret.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
