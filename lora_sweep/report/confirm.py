"""The confirmation stage's verdict (study.confirm; runs stored in the companion study).

Each confirmed configuration has its search run plus its confirmation runs, one per seed, all
scored on the same eval examples. The configuration with the best mean study.metric over seeds is
compared with each other one by a two-level paired bootstrap (stats.two_level_bootstrap: seeds
resampled per configuration, examples resampled in pairs), Holm over those comparisons. It is the
winner only when it beats every other beyond that noise; otherwise the recommendation is the
cheapest configuration not distinguishable from it (fewest trainable parameters, then time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState

import lora_sweep.report.stats as stats
from lora_sweep import record
from lora_sweep.config import Config
from lora_sweep.record import TrialRecord
from lora_sweep.search import confirm

ALPHA = 0.05
RESAMPLES = 4000


@dataclass(frozen=True)
class Confirmed:
    """One configuration over its seeds."""
    trial: int                  # the search trial: the configuration's own run (first seed)
    label: str
    seeds: tuple                # the seed of each complete run
    values: tuple               # study.metric of each run, same order
    planned: int                # runs it should have (search run + queued confirmation runs)
    params: float               # trainable parameters
    seconds: float              # mean seconds per epoch over its runs
    examples: tuple = ()        # per-example results of each run (record.read_examples), same order

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def sd(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else float("nan")

    @property
    def complete(self) -> bool:
        return len(self.values) >= self.planned and len(self.examples) == len(self.values)


@dataclass(frozen=True)
class Comparison:
    other: Confirmed
    diff: stats.SeedDifference   # best - other
    p_adj: float                 # Holm-adjusted over the comparisons with the best
    level: float                 # the interval's level under Holm's step-down
    low: float
    high: float


@dataclass(frozen=True)
class Verdict:
    metric: str
    direction: str
    configs: list                # Confirmed, best first
    comparisons: list            # Comparison of the best with each other configuration
    winner: Confirmed | None     # the best, when it beats every other beyond noise
    recommended: Confirmed | None
    n_examples: int
    complete: bool               # every planned run finished (else no verdict is drawn)

    @property
    def best(self) -> Confirmed:
        return self.configs[0]


def verdict(config: Config, study: optuna.Study) -> Verdict | None:
    """The confirmation's verdict, or None when this sweep has no confirmation stage stored."""
    stage = confirm.load_stage(study)
    if stage is None:
        return None
    metric, direction = config.study.metric, config.study.direction
    sign = 1 if direction == "maximize" else -1
    runs: dict[int, list] = {}
    for t in stage.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rec = TrialRecord.from_trial(t)
        if rec.confirms is not None:
            runs.setdefault(rec.confirms, []).append((t, rec, record.examples_path(config.study_dir, t.number,
                                                                                    confirm.STAGE)))
    planned = _planned(stage)
    configs = []
    for number in sorted(planned):
        own = study.trials[number]
        rec = TrialRecord.from_trial(own)
        members = [(own, rec, record.examples_path(config.study_dir, number))] + runs.get(number, [])
        members = [m for m in members if m[0].state == TrialState.COMPLETE]
        ex = tuple(record.read_examples(p) for _, _, p in members if p.exists())
        configs.append(Confirmed(
            trial=number, label=rec.label, seeds=tuple(_seed(r, t) for t, r, _ in members),
            values=tuple(r.figure(metric) for _, r, _ in members), planned=planned[number],
            params=float(rec.trainable_params or math.inf),
            seconds=float(np.nanmean([r.figure("epoch_time_s") for _, r, _ in members])),
            examples=ex))
    if not configs:
        return None
    configs.sort(key=lambda c: (-sign * c.mean, c.params, c.trial))
    done = all(c.complete for c in configs) and len(configs) > 1
    if not done:
        return Verdict(metric, direction, configs, [], None, None, 0, False)
    ids = sorted(set.intersection(*(set(e["example_id"]) for c in configs for e in c.examples)))
    best = configs[0]
    diffs = [stats.two_level_bootstrap(_statistic(metric, best), _arrays(metric, best, ids),
                                       _arrays(metric, c, ids), resamples=RESAMPLES) for c in configs[1:]]
    p_adj = stats.holm([d.p for d in diffs])
    levels = stats.holm_levels([d.p for d in diffs], 1 - ALPHA)
    comparisons = [Comparison(c, d, p, lv, *d.interval(lv)) for c, d, p, lv in zip(configs[1:], diffs, p_adj, levels)]
    beaten = [c for c in comparisons if c.p_adj < ALPHA and sign * c.diff.estimate > 0]
    winner = best if len(beaten) == len(comparisons) else None
    tied = [best] + [c.other for c in comparisons if c not in beaten]
    recommended = winner or cheapest(tied)
    return Verdict(metric, direction, configs, comparisons, winner, recommended, len(ids), True)


CHEAPER = 0.95  # 5% fewer trainable parameters at least, so a param_budget sweep's rounding is no saving
FASTER = 0.9  # time breaks a tie in parameters only when it is clearly shorter, not by timing noise


def cheapest(tied: list) -> Confirmed:
    """Of configurations (best mean first) that cannot be told apart: the fewest trainable parameters,
    (within 5%), then the one at least 10% faster per epoch than the best of those, else the best of those."""
    fewest = min(c.params for c in tied)
    pool = [c for c in tied if c.params < fewest / CHEAPER]  # within 5% of the fewest: as cheap
    fastest = min(pool, key=lambda c: c.seconds)
    return fastest if fastest.seconds < FASTER * pool[0].seconds else pool[0]


def _planned(stage: optuna.Study) -> dict[int, int]:
    """Search trial -> the runs its configuration should have: its own plus each queued seed."""
    seeds: dict[int, set] = {}
    for t in stage.get_trials(deepcopy=False):
        rec = TrialRecord.from_trial(t)
        if rec.confirms is not None:
            params = t.system_attrs.get("fixed_params") or t.params
            seeds.setdefault(rec.confirms, set()).add(params.get(confirm.SEED))
    return {number: 1 + len(s) for number, s in seeds.items()}


def _seed(rec: TrialRecord, trial) -> int | None:
    return trial.params.get(confirm.SEED, rec.params.get("seed"))


def _statistic(metric: str, best: Confirmed):
    if metric == "eval_f1":
        classes = np.unique(np.concatenate([e["label"].astype(str).to_numpy() for e in best.examples]))
        return lambda gold, pred: stats.macro_f1(gold, pred, classes)
    return stats.mean


def _arrays(metric: str, c: Confirmed, ids: list) -> list[tuple]:
    out = []
    for e in c.examples:
        e = e.set_index("example_id").loc[ids]
        if metric == "eval_f1":
            out.append((e["label"].astype(str).to_numpy(), e["prediction"].astype(str).to_numpy()))
        elif metric == "eval_loss":
            out.append((e["loss"].to_numpy(float),))
        else:
            out.append((e["correct"].astype(float).to_numpy(),))
    return out


# -- the report's section ------------------------------------------------------------------------

def _fmt(metric: str, v: float) -> str:
    return f"{100 * v:.1f}" if metric == "eval_accuracy" else f"{v:.3f}"


def _unit(metric: str) -> str:
    return "points" if metric == "eval_accuracy" else ""


def section(v: Verdict) -> list[str]:
    """The markdown section: mean ± sd per configuration, the comparisons, the verdict."""
    m = v.metric
    shown = f"{m} (%)" if m == "eval_accuracy" else m
    lines = ["", "## Confirmation across seeds", "",
             f"The search's best configurations and its one-seed recommendation ({len(v.configs)} in all), "
             "re-trained under more seeds (adapter "
             "initialisation, classifier head and data order change; the eval examples stay the same). "
             "These runs are kept apart from the search: they never steered its sampler or budgets.", "",
             f"| Configuration | Trial | Seeds | {shown} mean ± sd | Per seed | Trainable params | s/epoch |",
             "|:--|--:|--:|--:|--:|--:|--:|"]
    for c in v.configs:
        per = ", ".join(f"{_fmt(m, x)} (seed {s})" for s, x in zip(c.seeds, c.values))
        lines.append(f"| {c.label} | #{c.trial} | {len(c.values)}/{c.planned} | {_fmt(m, c.mean)} ± "
                     f"{_fmt(m, c.sd) if not math.isnan(c.sd) else 'n/a'} | {per} | {int(c.params):,} | "
                     f"{c.seconds:.1f} |")
    if not v.complete:
        missing = sum(c.planned - len(c.values) for c in v.configs)
        return lines + ["", f"Confirmation incomplete: {missing} run(s) have no result yet. Run the same command "
                            "again to finish them; until then the recommendation comes from the search alone."]
    best = v.best
    lines += ["", f"| {best.label} vs | Difference ({_unit(m) or m}) | Interval (Holm level) | p (Holm) | "
                  "Beyond noise |", "|:--|--:|--:|--:|:--|"]
    for c in v.comparisons:
        lines.append(f"| {c.other.label} | {_signed(m, c.diff.estimate)} | {_signed(m, c.low)} to "
                     f"{_signed(m, c.high)} ({100 * c.level:.1f}%) | {_p(c.p_adj)} | "
                     f"{'yes' if c in _beaten(v) else 'no'} |")
    lines += ["", "**" + conclusion(v) + "**", "",
              f"_Procedure: for each comparison, a two-level paired bootstrap ({RESAMPLES:,} resamples): each "
              "resample draws each configuration's seeds with replacement (training noise) and one set of the "
              f"{v.n_examples:,} shared eval examples for both (sampling noise, paired); the difference of the "
              "means over seeds; two-sided bootstrap p-values, Holm-adjusted over the comparisons with the best; "
              "each interval at its Holm step-down level (percentile). With three seeds a configuration's "
              "seed-to-seed spread is estimated coarsely; more seeds (study.confirm.seeds) sharpen it._"]
    return lines


def _beaten(v: Verdict) -> list:
    sign = 1 if v.direction == "maximize" else -1
    return [c for c in v.comparisons if c.p_adj < ALPHA and sign * c.diff.estimate > 0]


def conclusion(v: Verdict) -> str:
    """One sentence: the winner, or the cheapest configuration indistinguishable from the best."""
    m, best, rec = v.metric, v.best, v.recommended
    runs = f"{len(best.values)} seeds"
    if v.winner is not None:
        return (f"Winner: {best.label} (trial #{best.trial}), {_fmt(m, best.mean)} ± {_fmt(m, best.sd)} over {runs}, "
                f"beats every other confirmed configuration beyond seed and sampling noise.")
    tied = [c.other.label for c in v.comparisons if c not in _beaten(v)]
    text = (f"No winner beyond seed and sampling noise: {', '.join(tied)} cannot be told apart from the best, "
            f"{best.label} ({_fmt(m, best.mean)} ± {_fmt(m, best.sd)} over {runs}). ")
    if rec is best:
        return text + f"Recommended: {best.label} (trial #{best.trial}); none of those is cheaper."
    cost = (f"{int(rec.params):,} trainable parameters against {int(best.params):,}" if rec.params < best.params
            else f"as many trainable parameters, {rec.seconds:.1f} s/epoch against {best.seconds:.1f}")
    return (text + f"Recommended: {rec.label} (trial #{rec.trial}), the cheapest of these ({cost}), "
            f"{_fmt(m, rec.mean)} ± {_fmt(m, rec.sd)}.")


def _signed(metric: str, x: float) -> str:
    s = f"{100 * x:+.1f}" if metric == "eval_accuracy" else f"{x:+.3f}"
    return s.replace("-", "−")


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"
