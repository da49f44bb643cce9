"""The confirmation stage's verdict (study.confirm; runs stored in the companion study).

Each confirmed configuration has its search run plus its confirmation runs, one per seed, all
scored on the same eval examples. The configuration with the best mean study.metric over seeds is
compared with each other one by a two-level paired bootstrap (stats.two_level_bootstrap: seeds
resampled per configuration, examples resampled in pairs) of the statistic study.metric ranks by
(report/compare.py: correctness, per-example loss, macro F1 or summed chrF statistics), on the
examples every run scored, Holm over those comparisons. It is the
winner only when it beats every other beyond that noise; otherwise the recommendation is the
cheapest configuration not distinguishable from it (fewest trainable parameters, then time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState

import lora_sweep.report.compare as compare
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
    test_paths: tuple = ()      # where each run's held-out test results are (data.test_size), same order

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
            runs.setdefault(rec.confirms, []).append((t, rec, *(
                record.examples_path(config.study_dir, t.number, confirm.STAGE, split) for split in ("eval", "test"))))
    planned = _planned(stage)
    configs = []
    for number in sorted(planned):
        own = study.trials[number]
        rec = TrialRecord.from_trial(own)
        members = [(own, rec, *(record.examples_path(config.study_dir, number, split=split)
                                for split in ("eval", "test")))] + runs.get(number, [])
        members = [m for m in members if m[0].state == TrialState.COMPLETE]
        ex = tuple(record.read_examples(p) for _, _, p, _ in members if p.exists())
        tests = tuple(p for *_, p in members)
        configs.append(Confirmed(
            trial=number, label=rec.label, seeds=tuple(_seed(r, t) for t, r, *_ in members),
            values=tuple(r.figure(metric) for _, r, *_ in members), planned=planned[number],
            params=float(rec.trainable_params or math.inf),
            seconds=float(np.nanmean([r.figure("epoch_time_s") for _, r, *_ in members])),
            examples=ex, test_paths=tests))
    if not configs:
        return None
    configs.sort(key=lambda c: (-sign * c.mean, c.params, c.trial))
    done = all(c.complete for c in configs) and len(configs) > 1
    if not done:
        return Verdict(metric, direction, configs, [], None, None, 0, False)
    runs = [compare.Runs(c.seeds, c.examples) for c in configs]
    ids = compare.shared_ids(metric, *runs)  # the examples every run scored (generated, for a language model)
    if not ids:
        raise compare.NoSharedExamples(f"the confirmed configurations share no example scored for {metric}")
    classes = compare.classes_of(runs) if metric == "eval_f1" else None
    stat = compare.statistic(metric, classes)
    best = configs[0]
    diffs = [stats.two_level_bootstrap(stat, [compare.arrays(metric, e, ids) for e in best.examples],
                                       [compare.arrays(metric, e, ids) for e in c.examples], resamples=RESAMPLES)
             for c in configs[1:]]
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


def test_repeat(v: Verdict | None):
    """(comparisons on test, the recommended's optimism tuple, its test value) of a complete confirmation
    whose runs all scored the held-out test split; None otherwise."""
    if v is None or not v.complete or not all(c.test_paths and all(p.exists() for p in c.test_paths)
                                              for c in v.configs):
        return None
    m = v.metric
    tests = [compare.Runs(c.seeds, tuple(record.read_examples(p) for p in c.test_paths)) for c in v.configs]
    results = compare.family(m, tests, [(0, k) for k in range(1, len(tests))], resamples=RESAMPLES)
    i = v.configs.index(v.recommended)
    optimism = compare.optimism(m, compare.Runs(v.recommended.seeds, v.recommended.examples), tests[i],
                                resamples=RESAMPLES)
    return results, optimism, compare.value(m, tests[i])


def test_summary(v: Verdict | None) -> str:
    """The sweep summary's held-out line for a confirmed recommendation ('' without one)."""
    rep = test_repeat(v)
    if rep is None:
        return ""
    _, (est, low, high, n_eval, n_test), value = rep
    rec, m = v.recommended, v.metric
    pct = "%" if m in compare.CORRECTNESS else ""
    return (f"Held-out test ({n_test:,} examples nothing chose on): {rec.label} over its {len(rec.seeds)} seeds "
            f"scores {_fmt(m, value)}{pct} (validation {_fmt(m, rec.mean)}{pct}); "
            f"selection optimism {_signed(m, est)} {_unit(m)} (95% CI {_signed(m, low)} to {_signed(m, high)})")


def test_lines(v: Verdict | None) -> list[str]:
    """The confirmation's comparisons repeated on the held-out test split (same pairs, same family), and
    the recommended configuration's selection optimism; [] without test results for every run."""
    rep = test_repeat(v)
    if rep is None:
        return []
    m = v.metric
    results, (est, low, high, n_eval, n_test), _ = rep
    sign = 1 if v.direction == "maximize" else -1
    lines = ["", f"The same comparisons on the held-out test split ({n_test:,} examples no run was chosen on; "
                 "two-level bootstrap, Holm over the same family):", "",
             f"| {v.best.label} vs | Validation | Test |", "|:--|--:|--:|"]
    for c, r in zip(v.comparisons, results):
        beyond = lambda p, d: "beyond noise" if p < ALPHA and sign * d > 0 else "not supported"  # noqa: E731
        lines.append(f"| {c.other.label} | {_signed(m, c.diff.estimate)} {_unit(m)} (p {_p(c.p_adj)}, "
                     f"{beyond(c.p_adj, c.diff.estimate)}) | {_signed(m, r.estimate)} {_unit(m)} (p {_p(r.p_adj)}, "
                     f"{beyond(r.p_adj, r.estimate)}) |")
    lines += ["", f"Selection optimism of the recommended {v.recommended.label} over its {len(v.recommended.seeds)} "
                  f"seeds (validation minus test): {_signed(m, est)} {_unit(m)} (95% CI {_signed(m, low)} to "
                  f"{_signed(m, high)}; {n_eval:,} validation and {n_test:,} test examples, resampled apart)."]
    return lines


# -- the report's section ------------------------------------------------------------------------

def detectable(c: Comparison) -> float:
    """The smallest |difference| this comparison would find with 80% power at its Holm level (NaN: none)."""
    return compare.detectable(c.level, c.diff.samples)


def _fmt(metric: str, v: float) -> str:
    return f"{100 * v:.1f}" if metric in compare.CORRECTNESS else f"{v:.3f}"


def _unit(metric: str) -> str:
    return "points" if metric in compare.CORRECTNESS else ""


def section(v: Verdict) -> list[str]:
    """The markdown section: mean ± sd per configuration, the comparisons, the verdict."""
    m = v.metric
    shown = f"{m} (%)" if m in compare.CORRECTNESS else m
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
                  "Beyond noise | Could detect (80% power) |", "|:--|--:|--:|--:|:--|--:|"]
    for c in v.comparisons:
        lines.append(f"| {c.other.label} | {_signed(m, c.diff.estimate)} | {_signed(m, c.low)} to "
                     f"{_signed(m, c.high)} ({100 * c.level:.1f}%) | {_p(c.p_adj)} | "
                     f"{'yes' if c in _beaten(v) else 'no'} | "
                     f"{'n/a' if math.isnan(detectable(c)) else _fmt(m, detectable(c))} |")
    lines += ["", "**" + conclusion(v) + "**", "",
              f"_Procedure: for each comparison, a two-level paired bootstrap ({RESAMPLES:,} resamples): each "
              "resample draws each configuration's seeds with replacement (training noise) and one set of the "
              f"{v.n_examples:,} eval examples every run scored, for both (sampling noise, paired), of "
              f"{compare.STATISTIC.get(m, m)}; the difference of the "
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
    s = f"{100 * x:+.1f}" if metric in compare.CORRECTNESS else f"{x:+.3f}"
    return s.replace("-", "−")


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"
