"""Each configuration ("arm") at its own best candidate: study.tune's values, chosen on validation.

study.tune names nuisance parameters (a learning rate) tuned within each configuration of the space: an
arm trains several candidates (raced by successive halving, or all to the end with study.race=false) and
is represented by the candidate with the best mean study.metric on the eval split over its complete runs
(ties: the candidate study.tune lists first, which is the trials frame's row order). choose() keeps those
runs alone, so the findings' paired verdict, the recommendation, the held-out test split's repeat and the
export all compare arms at their chosen candidate; it reads the metric column it is given and nothing of
the test split. A study without tuned values passes through unchanged.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

import lora_sweep.report.compare as compare
from lora_sweep.config.names import METRIC_DIRECTIONS

SEED = "param.train.seed"
PENDING = ("running", "waiting")


@dataclass(frozen=True)
class Candidate:
    """One candidate of an arm: its tuned values and what its trials did."""
    tuned: dict          # path -> value
    trials: tuple        # every trial that trained it, any status (trial order as the frame lists them)
    complete: tuple      # those complete (the runs its value averages)
    value: float         # mean of the metric over its complete runs; NaN when none completed

    @property
    def key(self) -> str:
        return _key(self.tuned)


@dataclass(frozen=True)
class ArmChoice:
    """One arm's choice: the candidate it is compared at, out of those it tried."""
    arm: str             # the arm's name, without its tuned values or seed ("r=8")
    key: str             # its configuration as the frame keys it (the "config" column; per sweep, where several)
    chosen: dict         # the chosen candidate's tuned values (path -> value)
    candidates: tuple    # Candidate, tune order: every tuned value any trial of the arm had, failed or pruned too
    trials: tuple        # the chosen candidate's complete runs: the arm's runs in every comparison

    @property
    def tried(self) -> int:
        return len(self.candidates)

    @property
    def completed(self) -> int:
        return sum(bool(c.complete) for c in self.candidates)

    @property
    def values(self) -> dict:
        """Candidate (its tuned values as JSON text) -> its validation value."""
        return {c.key: c.value for c in self.candidates}


def tuned_of(value) -> dict:
    """A row's tuned values: the frame's JSON text (or a dict) -> dict; {} where none."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip():
        return json.loads(value) or {}
    return {}


def _key(tuned: dict) -> str:
    return json.dumps({k: tuned[k] for k in sorted(tuned)}, default=str)


def tuned_paths(df: pd.DataFrame) -> set[str]:
    """The paths study.tune tuned within each configuration (the record's `tuned`, JSON in the frame)."""
    if "tuned" not in df:
        return set()
    return {k for v in df["tuned"].dropna() for k in tuned_of(v)}


def arm_keys(df: pd.DataFrame) -> pd.Series:
    """Each row's arm: its configuration without the seed and the tuned values (per sweep, where several)."""
    if "config" in df and df["config"].notna().all():
        keys = df["config"].astype(str)
    else:
        skip = {SEED} | {f"param.{p}" for p in tuned_paths(df)}
        cols = [c for c in df.columns if c.startswith("param.") and c not in skip]
        keys = pd.Series([compare.config_key({c: r[c] for c in cols if pd.notna(r[c])}) for _, r in df.iterrows()],
                         index=df.index, dtype=str)
    return df["sweep"].astype(str) + "\x00" + keys if "sweep" in df else keys


def arm_label(label: str, paths=()) -> str:
    """A run's label without its seed and tuned parts ("r=8, seed=2, learning_rate=0.001" -> "r=8")."""
    leaves = {"seed", *(p.split(".")[-1] for p in paths)}
    parts = [p for p in str(label).split(", ") if p.split("=", 1)[0] not in leaves or "=" not in p]
    return ", ".join(parts) or "base"


def is_tuned(df: pd.DataFrame) -> bool:
    return bool(len(df)) and "tuned" in df and any(tuned_of(v) for v in df["tuned"])


def choose(done: pd.DataFrame, metric: str, direction: str,
           trials: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[ArmChoice]]:
    """The rows of each arm's chosen candidate (`done`: complete trials; `trials`: every trial, for the
    candidates tried, default `done`) and each arm's choice; `done` unchanged and [] without tuned values."""
    every = done if trials is None else trials
    if not is_tuned(every) or not len(done):
        return done, []
    sign = 1 if direction == "maximize" else -1
    done_arm, done_cand = arm_keys(done), done["tuned"].map(lambda v: _key(tuned_of(v)))
    all_arm, all_cand = arm_keys(every), every["tuned"].map(lambda v: _key(tuned_of(v)))
    choices, keep = [], set()
    for arm in dict.fromkeys(done_arm):
        rows = done[done_arm == arm]
        order = list(dict.fromkeys([*all_cand[all_arm == arm], *done_cand[done_arm == arm]]))
        candidates = []
        for cand in order:
            mine = rows[done_cand[done_arm == arm] == cand]
            values = mine[metric].astype(float) if metric in mine else pd.Series(dtype=float)
            tried = every[(all_arm == arm) & (all_cand == cand)]["trial"] if "trial" in every else []
            candidates.append(Candidate(json.loads(cand), tuple(int(t) for t in tried) or tuple(mine["trial"]),
                                        tuple(int(t) for t in mine["trial"]),
                                        float(values.mean()) if values.notna().any() else math.nan))
        ran = [c for c in candidates if c.complete]
        best = min(ran, key=lambda c: (1, 0) if math.isnan(c.value) else (0, -sign * c.value))  # stable: tune order
        keep.add((arm, best.key))
        paths = {p for c in candidates for p in c.tuned}
        choices.append(ArmChoice(arm_label(rows["label"].iloc[0] if "label" in rows else "", paths),
                                 arm, best.tuned, tuple(candidates), best.complete))
    mask = [(a, c) in keep for a, c in zip(done_arm, done_cand)]
    return done[mask], choices


def chosen_trials(df: pd.DataFrame, metric: str, direction: str) -> set[int] | None:
    """The complete trials of every arm's chosen candidate; None without tuned values (every trial counts)."""
    done = df[df["status"] == "complete"] if len(df) else df
    kept, choices = choose(done, metric, direction, df)
    return {int(t) for t in kept["trial"]} if choices else None


def represents(df: pd.DataFrame, metric: str = "eval_accuracy", direction: str | None = None) -> np.ndarray:
    """Per row: a run of its arm's chosen candidate (every row without tuned values); direction: the metric's own."""
    direction = direction or METRIC_DIRECTIONS.get(metric, "maximize")
    chosen = chosen_trials(df, metric, direction) if "trial" in df and is_tuned(df) else None
    return np.array([chosen is None or int(t) in chosen for t in (df["trial"] if chosen is not None else df.index)] if len(df) else [], dtype=bool)


def show(tuned: dict, full: bool = False) -> str:
    """Tuned values as text: "learning_rate=0.001" (full: "train.learning_rate=0.001")."""
    return ", ".join(f"{k if full else k.split('.')[-1]}={v:g}" if isinstance(v, float) else
                     f"{k if full else k.split('.')[-1]}={v}" for k, v in tuned.items())


def _figure(metric: str, x: float) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{100 * x:.1f}" if metric in compare.CORRECTNESS else f"{x:.1f}" if metric == "eval_chrf" else f"{x:.4g}"


def tuned_column(table: pd.DataFrame, done: pd.DataFrame, df: pd.DataFrame, metric: str,
                 direction: str) -> pd.DataFrame:
    """The main table with a "Tuned" column after the configuration: each arm's chosen rows read
    "learning_rate=0.001 (best of 3)", the candidates it did not choose stay blank; unchanged untuned."""
    _, choices = choose(done, metric, direction, df)
    if not choices:
        return table
    by_trial = {t: c for c in choices for t in c.trials}
    cells = [f"{show(by_trial[t].chosen)} (best of {by_trial[t].tried})" if t in by_trial else ""
             for t in done["trial"].astype(int)]
    out = table.copy()
    out.insert(out.columns.get_loc("Configuration") + 1, "Tuned", cells)
    return out


def _rungs(arm: pd.DataFrame) -> list[int]:
    """The rungs the arm's race stopped candidates at (their caps, and where pruned trials stopped)."""
    steps = set()
    for col in ("rung_cap", "pruned_at_step"):
        if col in arm:
            steps |= {int(s) for s in arm[col].dropna()}
    return sorted(steps)


def _at(runs: pd.DataFrame, step: int) -> float:
    """A candidate's validation value at a step: per seed its first run that reached it, mean over seeds."""
    per_seed = {}
    for _, r in runs.iterrows():
        inter = json.loads(r["intermediate"]) if isinstance(r.get("intermediate"), str) else {}
        seed = r.get("seed")
        if str(step) in inter and str(seed) not in per_seed:
            per_seed[str(seed)] = float(inter[str(step)])
    return sum(per_seed.values()) / len(per_seed) if per_seed else math.nan


def _outcome(c: Candidate, choice: ArmChoice, runs: pd.DataFrame, unit: str, open_race: bool) -> str:
    if c.key == _key(choice.chosen):
        return "chosen"
    if c.complete:
        return "ran to the end, lost"
    status = set(runs["status"])
    if status & set(PENDING):
        return "still racing"
    stopped = runs[(runs["status"] == "pruned") & runs.get("pruned_at_step", pd.Series(dtype=float)).notna()]
    if len(stopped):
        at = int(stopped["pruned_at_step"].max())
        return f"stopped at {unit} {at}, race undecided" if open_race else f"dropped at {unit} {at}"
    if "pruned" in status and "infeasible" in runs and (runs["infeasible"].fillna("") != "").any():
        return "infeasible, not trained"  # its predicted memory exceeded the limit; no race stopped it
    return "failed" if "failed" in status else "excluded, not trained" if "pruned" in status else "no result"


def section(done: pd.DataFrame, df: pd.DataFrame, metric: str, direction: str) -> list[str]:
    """The report's "Tuned per configuration" section ([] without tuned values): per arm, the chosen
    candidate, how many it tried and completed, and each candidate's validation value at each rung and at
    the end with what became of it. `done`: the trials the findings compare; `df`: every trial."""
    _, choices = choose(done, metric, direction, df)
    if not choices:
        return []
    paths = sorted({p for c in choices for x in c.candidates for p in x.tuned})
    raced = "rung_cap" in df and df["rung_cap"].notna().any()
    units = [u for u in df.get("pruned_at_unit", pd.Series(dtype=object)).dropna() if u]
    unit = units[0] if units else "rung"
    percent = " (%)" if metric in compare.CORRECTNESS else ""
    arm_of, cand_of = arm_keys(df), df["tuned"].map(lambda v: _key(tuned_of(v)))
    lines = ["", "## Tuned per configuration", "",
             f"Each configuration was compared at its own best candidate of {', '.join(f'`{p}`' for p in paths)}: "
             f"the one with the best mean {metric} on the validation (eval) split over its complete runs"
             + (", its candidates raced by successive halving on the same metric (at each rung the best of them "
                "train on, the rest stop there)" if raced else ", every candidate trained to the end")
             + ". The findings, the recommendation and the held-out test split's repeat of the verdict all read the "
             "chosen candidate's runs; the test split took no part in the choice. Validation " + metric + percent
             + " of each candidate at each rung and at the end (mean over seeds), its trials, and what became of it:",
             "", "| Configuration | Chosen | Tried | Completed | Candidates on validation |", "|:--|:--|--:|--:|:--|"]
    for choice in choices:
        arm = df[arm_of == choice.key]
        open_race = bool(arm["status"].isin(PENDING).any())
        cells = []
        for c in choice.candidates:
            runs = arm[cand_of[arm.index] == c.key]
            figures = [f"{_figure(metric, _at(runs, s))} at {unit} {s}" for s in _rungs(arm)
                       if not math.isnan(_at(runs, s))]
            if c.complete:
                figures.append(f"{_figure(metric, c.value)} at the end")
            trials = ", ".join(f"#{t}" for t in c.trials)
            cells.append(f"{show(c.tuned)}: {', '.join(figures) or 'no validation figure'}, "
                         f"{_outcome(c, choice, runs, unit, open_race)} ({trials})")
        lines.append(f"| {_cell(choice.arm)} | {_cell(show(choice.chosen))} | {choice.tried} | {choice.completed} | "
                     f"{_cell('; '.join(cells))} |")
    edges = [f"{choice.arm} ({', '.join(at_edge(choice))})" for choice in choices if at_edge(choice)]
    if edges:
        lines += ["", f"At the edge of the candidates: {'; '.join(edges)}. Such a configuration's own best may lie "
                  "beyond what was tried, so it may be compared below its best; widen study.tune to check."]
    return lines


def at_edge(choice: ArmChoice) -> list[str]:
    """The chosen tuned values that are the smallest or largest of 3 or more numeric candidates."""
    out = []
    for path, value in choice.chosen.items():
        values = sorted({c.tuned.get(path) for c in choice.candidates} - {None})
        if len(values) >= 3 and all(isinstance(v, (int, float)) for v in values) and value in (values[0], values[-1]):
            out.append(f"{path.rsplit('.', 1)[-1]}={value:g}, the {'smallest' if value == values[0] else 'largest'} "
                       f"of {len(values)}")
    return out


def why_stopped(row, df: pd.DataFrame) -> str:
    """Why a pruned trial stopped, for the report's trials without a result: a race's stop at its rung says
    whether its configuration kept the candidate (trained again from the start) or dropped it there."""
    at = row["pruned_at"] or f"epoch {row['pruned_at_epoch']}"
    if "rung_cap" not in row or pd.isna(row["rung_cap"]) or not tuned_of(row.get("tuned")):
        return f"pruned after {at}"
    arm, cand = arm_keys(df), df["tuned"].map(lambda v: _key(tuned_of(v)))
    seed = df["seed"].astype(str) == str(row["seed"]) if "seed" in df else True  # another seed is another run
    same = (arm == arm.loc[row.name]) & (cand == cand.loc[row.name]) & seed & (df["trial"] > row["trial"])
    again = ", ".join(f"#{int(t)}" for t in df[same]["trial"])
    head = f"stopped after {at} by its configuration's race"
    return f"{head}: kept there, trained again from the start as {again}" if again else f"{head}: dropped there"


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).replace("|", "\\|")


def run_tags(df: pd.DataFrame, metric: str, direction: str) -> dict[str, str]:
    """MLflow run id -> its `tuned_choice` tag, for every trial of a tuned arm: the chosen candidate's runs
    say what they were chosen from, the others which candidate their arm chose instead."""
    done = df[df["status"] == "complete"] if len(df) else df
    _, choices = choose(done, metric, direction, df)
    if not choices or "mlflow_run_id" not in df:
        return {}
    runs = dict(zip(df["trial"].astype(int), df["mlflow_run_id"]))
    out = {}
    for choice in choices:
        chosen = (f"{show(choice.chosen, full=True)}, best of {choice.tried} candidate"
                  f"{'' if choice.tried == 1 else 's'} on validation ({metric})")
        for c in choice.candidates:
            tag = chosen if c.key == _key(choice.chosen) else f"not chosen: {choice.arm} chose {chosen}"
            out.update({runs[t]: tag for t in c.trials if runs.get(t)})
    return out


def card_line(df: pd.DataFrame, number: int, metric: str, direction: str) -> str:
    """The model card's sentence on trial `number`'s tuned values ('' where it has none)."""
    done = df[df["status"] == "complete"] if len(df) else df
    _, choices = choose(done, metric, direction, df)
    choice = next((c for c in choices for x in c.candidates if number in x.trials), None)
    if choice is None:
        return ""
    mine = next(x for x in choice.candidates if number in x.trials)
    of = f"{choice.tried} candidate{'' if choice.tried == 1 else 's'}"
    if mine.key == _key(choice.chosen):
        return (f"Tuned within its configuration ({choice.arm}): {show(mine.tuned, full=True)}, the best of {of} "
                f"on the validation (eval) split by {metric}; the held-out test split took no part in the choice.")
    return (f"Tuned within its configuration ({choice.arm}): {show(mine.tuned, full=True)} is one of {of}, not the "
            f"one chosen: on the validation (eval) split by {metric} the configuration chose "
            f"{show(choice.chosen, full=True)} (trial{'' if len(choice.trials) == 1 else 's'} "
            f"{', '.join(f'#{t}' for t in choice.trials)}).")
