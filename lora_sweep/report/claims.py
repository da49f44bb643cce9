"""Published claims (the config's `claims:`, lora_sweep/config/claims.py) checked on a sweep's stored runs,
each with a verdict: holds, does not hold, or cannot tell.

Each variant a claim names is represented by its chosen candidate's complete runs (arms.choose: study.tune's
values chosen on validation; without study.tune, the variant's complete runs). A claim's comparisons are one
family (compare.family: paired on the same examples, exact McNemar or a bootstrap, Holm over the claim's
comparisons, each interval at its Holm level, each with the smallest difference it could have detected), on
study.metric:

- directional (better than): each comparison holds where it puts the `better` side ahead beyond noise (Holm
  p < 0.05), does not hold where it puts it behind, and cannot tell otherwise;
- equivalence (within): a pair does not hold where it differs beyond noise, holds where it does not and its
  interval lies inside +-margin (points: accuracy and exact match in percentage points, macro F1 x 100, chrF
  in its points, a loss in its own units), and cannot tell otherwise.

A split's verdict: every comparison holds -> holds; any does not hold -> does not hold; else cannot tell. The
claim's verdict is decided on validation (the eval split, which also chose the learning rates) and repeated
on the held-out test split with the same runs: where the two disagree, cannot tell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Mapping

import pandas as pd

import lora_sweep.report.arms as arms
import lora_sweep.report.compare as compare
import lora_sweep.report.heldout as heldout
import lora_sweep.report.paired as paired
from lora_sweep.config import Claim, Config, Variant
from lora_sweep.report.findings import compared

VALIDATION, TEST = "validation", "test"
VARIANT = "param.variant"


class Verdict(str, Enum):
    HOLDS = "holds"
    DOES_NOT_HOLD = "does not hold"
    CANNOT_TELL = "cannot tell"


@dataclass(frozen=True)
class Side:
    """One variant as a claim compares it: its chosen candidate's complete runs."""
    variant: str         # its name under variants:
    label: str           # its label there
    tuned: dict          # the chosen candidate's tuned values (path -> value); {} without study.tune
    trials: tuple        # the runs compared (trial numbers)
    edge: tuple = ()     # chosen values at the edge of their candidates (arms.at_edge): its best may lie beyond

    @property
    def name(self) -> str:
        return f"{self.label} at {arms.show(self.tuned)}" if self.tuned else self.label


@dataclass(frozen=True)
class Evidence:
    """One comparison of a claim on one split, first minus second, and what it says of the claim."""
    first: Side
    second: Side
    first_value: float   # the metric of each on the examples both were scored on (mean over runs)
    second_value: float
    comparison: compare.Comparison
    verdict: Verdict


@dataclass(frozen=True)
class SplitVerdict:
    split: str           # VALIDATION | TEST
    verdict: Verdict
    evidence: tuple      # Evidence, one per comparison of the claim (Claim.pairs order)

    @property
    def widest(self) -> float:
        """The widest |interval bound| over the comparisons (the metric's units)."""
        return max(max(abs(e.comparison.low), abs(e.comparison.high)) for e in self.evidence)


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    metric: str
    direction: str
    verdict: Verdict
    sides: tuple                      # Side per variant with runs to compare (Claim.variants order)
    validation: SplitVerdict | None   # None where some variant has nothing to compare (`missing`)
    test: SplitVerdict | None         # None where not repeated on held-out data (`unrepeated` says why)
    missing: Mapping[str, str]        # variant -> why it has no result to compare
    unrepeated: str | None = None

    @property
    def name(self) -> str:
        return self.claim.name

    @property
    def source(self) -> str:
        return self.claim.source

    @property
    def statement(self) -> str:
        return self.claim.statement


def check(claims, variants: Mapping[str, Variant], df: pd.DataFrame, examples: dict | None, tests: dict | None,
          metric: str = "eval_accuracy", direction: str = "maximize") -> list[ClaimResult]:
    """Each claim's verdict on the trials frame `df` (every trial), with each trial's per-example results on
    validation (`examples`) and on the test split (`tests`): trial number -> frame."""
    examples, tests = examples or {}, tests or {}
    done = compared(df, metric) if len(df) else df
    kept, choices = arms.choose(done, metric, direction, df) if len(done) else (done, [])
    tuned = {t: c.chosen for c in choices for t in c.trials}
    edges = {t: tuple(arms.at_edge(c)) for c in choices for t in c.trials}
    out = []
    for claim in claims:
        sides, missing = {}, {}
        for name in claim.variants:
            side = _side(name, variants, kept, tuned, examples, metric, edges)
            if isinstance(side, Side):
                sides[name] = side
            else:
                missing[name] = side
        if missing:
            out.append(ClaimResult(claim, metric, direction, Verdict.CANNOT_TELL, tuple(sides.values()), None, None,
                                   missing))
            continue
        order = [sides[v] for v in claim.variants]
        validation = _split(claim, order, _runs(order, kept, examples), metric, direction, VALIDATION)
        unrepeated = _unrepeated(order, tests, metric)
        test = None if unrepeated else _split(claim, order, _runs(order, kept, tests), metric, direction, TEST)
        verdict = validation.verdict if test is None or test.verdict == validation.verdict else Verdict.CANNOT_TELL
        out.append(ClaimResult(claim, metric, direction, verdict, tuple(order), validation, test, {}, unrepeated))
    return out


def _side(name: str, variants: Mapping[str, Variant], kept: pd.DataFrame, tuned: dict, examples: dict,
          metric: str, edges: dict | None = None) -> Side | str:
    """The variant's Side, or why it has none."""
    rows = kept[kept[VARIANT].astype(str) == name] if VARIANT in kept and len(kept) else kept.iloc[:0]
    if not len(rows):
        return "no complete run"
    if "config" in rows and rows["config"].nunique() > 1:
        return (f"{rows['config'].nunique()} configurations (searched with other parameters; a claim compares one "
                "configuration per variant)")
    trials = tuple(int(t) for t in rows["trial"])
    if not all(t in examples and compare.scored(metric, examples[t]).any() for t in trials):
        return f"no per-example results of {metric}"
    return Side(name, variants[name].label if name in variants else name, dict(tuned.get(trials[0], {})), trials,
                (edges or {}).get(trials[0], ()))


def _runs(sides: list[Side], kept: pd.DataFrame, frames: dict) -> list[compare.Runs]:
    rows = kept.set_index(kept["trial"].astype(int))
    return [compare.Runs(tuple(paired.seed_of(rows.loc[t]) for t in s.trials), tuple(frames[t] for t in s.trials))
            for s in sides]


def _unrepeated(sides: list[Side], tests: dict, metric: str) -> str | None:
    """Why the test split cannot repeat the claim (None where it can)."""
    if not tests:
        return "the runs have no held-out test results (data.test_size)"
    lacking = [s.name for s in sides
               if not all(t in tests and compare.scored(metric, tests[t]).any() for t in s.trials)]
    return f"no held-out test results for {', '.join(lacking)}" if lacking else None


def _split(claim: Claim, sides: list[Side], runs: list[compare.Runs], metric: str, direction: str,
           split: str) -> SplitVerdict:
    results = compare.family(metric, runs, list(claim.pairs))
    classes = compare.classes_of(runs) if metric == "eval_f1" else None
    sign = 1 if direction == "maximize" else -1
    evidence = []
    for r in results:
        ids = compare.shared_ids(metric, runs[r.first], runs[r.second])
        a, b = (compare.value(metric, runs[k], ids, classes) for k in (r.first, r.second))
        reading = _equivalent(r, claim.margin, metric) if claim.within else _directional(r, sign)
        evidence.append(Evidence(sides[r.first], sides[r.second], a, b, r, reading))
    readings = {e.verdict for e in evidence}
    verdict = (Verdict.DOES_NOT_HOLD if Verdict.DOES_NOT_HOLD in readings else
               Verdict.HOLDS if readings == {Verdict.HOLDS} else Verdict.CANNOT_TELL)
    return SplitVerdict(split, verdict, tuple(evidence))


def _directional(r: compare.Comparison, sign: int) -> Verdict:
    if r.significant() and sign * r.estimate > 0:
        return Verdict.HOLDS
    if r.significant() and sign * r.estimate < 0:
        return Verdict.DOES_NOT_HOLD
    return Verdict.CANNOT_TELL


def _equivalent(r: compare.Comparison, margin: float, metric: str) -> Verdict:
    if r.significant():
        return Verdict.DOES_NOT_HOLD
    inside = max(abs(r.low), abs(r.high)) * scale(metric) <= margin  # NaN bounds: not inside
    # a bootstrap interval collapses where few examples tell the pair apart: equivalence also needs a test
    # that could have seen a difference of the margin
    return Verdict.HOLDS if inside and sensitivity(r, metric) * scale(metric) <= margin else Verdict.CANNOT_TELL


def sensitivity(r: compare.Comparison, metric: str) -> float:
    """The smallest difference the comparison could have detected; where no example tells the pair apart, the
    95% upper bound on the share of examples that could (3/n, the rule of three): |difference| is at most it."""
    if not math.isnan(r.mde):
        return r.mde
    return 3.0 / r.n if metric in compare.CORRECTNESS and r.n else math.inf


def scale(metric: str) -> float:
    """Points per unit of the metric's per-example statistic (a claim's margin is in points)."""
    return 100.0 if metric in (*compare.CORRECTNESS, "eval_f1") else 1.0


# -- the report's section ------------------------------------------------------------------------------------

def report_section(config: Config, df: pd.DataFrame, examples: dict | None) -> list[str]:
    """The report's "Claims" section for config.claims ([] without claims), test results read beside the study."""
    if not config.claims:
        return []
    tests = heldout.load_test_examples(config.study_dir, df) if len(df) else {}
    return section(check(config.claims, config.variants, df, examples, tests, config.study.metric,
                         config.study.direction))


def section(results: list[ClaimResult]) -> list[str]:
    """## Claims: per claim its statement and source, the verdict in bold, the paired evidence per split."""
    if not results:
        return []
    m = results[0].metric
    tuned = any(s.tuned for r in results for s in r.sides)
    lines = ["", "## Claims", "",
             "Published claims checked on this sweep's runs, each variant "
             + ("at its chosen candidate (the best mean " + m + " on validation; see Tuned per configuration)"
                if tuned else "over its complete runs")
             + f". A claim's comparisons are one family on {compare.STATISTIC[m]}, paired on the same examples "
             "(an exact McNemar test with one run a side under one seed, else a bootstrap), p-values Holm-adjusted "
             "over the claim's comparisons, each interval at its Holm step-down level; Could detect: the smallest "
             "difference the test finds with 80% power. A directional claim holds where every comparison puts the "
             "named side ahead beyond noise (Holm p < 0.05) and does not hold where any puts it behind; an "
             "equivalence claim does not hold where any pair differs beyond noise, and holds where none does and "
             "every interval lies inside ±margin. Anything else: cannot tell. Each claim is decided on validation "
             "(the eval split, which also chose the learning rates) and repeated on the held-out test split; it "
             "holds or does not hold only where both agree."]
    for r in results:
        lines += _claim_lines(r)
    return lines


def _claim_lines(r: ClaimResult) -> list[str]:
    c, m = r.claim, r.metric
    names = {s.variant: s.name for s in r.sides}
    show = lambda vs: ", ".join(names.get(v, v) for v in vs)  # noqa: E731
    checked = (f"{show(c.within)} all within ±{c.margin:g} {_unit(m)} of each other" if c.within else
               f"{show(c.better)} {'each ' if len(c.better) > 1 else ''}better than {show(c.than)}")
    lines = ["", f"### {_cell(c.name)}", "", f"Claim: {c.statement.rstrip('.')}. Source: {c.source.rstrip('.')}.", "",
             f"Checked as: {checked}, on {m}.", ""]
    if r.missing:
        return lines + [f"**Verdict: cannot tell**: " + "; ".join(f"{v} has no result to compare ({w})"
                                                                  for v, w in r.missing.items()) + "."]
    splits = [s for s in (r.validation, r.test) if s is not None]
    both = ", ".join(f"{s.split}: {s.verdict.value}" for s in splits)
    lines += [f"**Verdict: {r.verdict.value}** ({both}" + ("; the splits disagree" if r.test is not None
                                                           and r.test.verdict != r.validation.verdict else "") + ").",
              "", *(f"- {s.split.capitalize()}: {_why(c, s, m)}." for s in splits)]
    if r.test is None:
        lines.append(f"- Not repeated on held-out data: {r.unrepeated}.")
    lines += [f"- {s.name}: at the edge of its candidates ({', '.join(s.edge)}); its own best may lie beyond them, "
              "so it may be compared below its best." for s in r.sides if s.edge]
    lines += ["", f"| Split | A | A ({_value_unit(m)}) | B | B ({_value_unit(m)}) | A − B ({_unit(m)}) | Interval | "
                  f"Method | b / c | Holm p | Could detect ({_unit(m)}) | Reading |",
              "|:--|:--|--:|:--|--:|--:|--:|:--|--:|--:|--:|:--|"]
    for s in splits:
        for e in s.evidence:
            x = e.comparison
            bc = f"{x.b} / {x.c}" if x.b is not None else "–"
            lines.append(f"| {s.split} | {_cell(e.first.name)} | {_figure(m, e.first_value)} | "
                         f"{_cell(e.second.name)} | {_figure(m, e.second_value)} | {_points(m, x.estimate, True)} | "
                         f"{_points(m, x.low, True)} to {_points(m, x.high, True)} ({100 * x.level:.4g}%) | "
                         f"{x.method} | {bc} | {_p(x.p_adj)} | {_mde(m, x)} | {_reading(c, e, m)} |")
    return lines


def _why(c: Claim, s: SplitVerdict, m: str) -> str:
    n = len(s.evidence)
    count = {v: sum(e.verdict == v for e in s.evidence) for v in Verdict}
    unsure = [e.comparison.mde for e in s.evidence if e.verdict == Verdict.CANNOT_TELL or c.within]
    mdes = [x for x in unsure if not math.isnan(x)]
    could = (f"they could have detected {_points(m, max(mdes))} {_unit(m)}" if mdes else
             "no example tells them apart")
    if c.within:
        if s.verdict == Verdict.DOES_NOT_HOLD:
            return f"{count[Verdict.DOES_NOT_HOLD]} of {n} pairs differ beyond noise"
        if s.verdict == Verdict.HOLDS:
            return (f"no pair differs beyond noise and every interval lies inside ±{c.margin:g} (the widest reaches "
                    f"±{_points(m, s.widest)})")
        return (f"no pair differs beyond noise, but not every pair is shown inside ±{c.margin:g} {_unit(m)}: the widest "
                f"interval bound is ±{_points(m, s.widest)} and {could}")
    if s.verdict == Verdict.HOLDS:
        return ("every comparison puts" if n > 1 else "the comparison puts") + " the better side ahead beyond noise"
    if s.verdict == Verdict.DOES_NOT_HOLD:
        return f"{count[Verdict.DOES_NOT_HOLD]} of {n} comparisons put the other side ahead beyond noise"
    return f"{count[Verdict.CANNOT_TELL]} of {n} comparisons cannot tell the two apart ({could})"


def _reading(c: Claim, e: Evidence, m: str) -> str:
    x = e.comparison
    if e.verdict == Verdict.HOLDS:
        return "holds: " + (f"interval inside ±{c.margin:g}" if c.within else "A ahead beyond noise")
    if e.verdict == Verdict.DOES_NOT_HOLD:
        return "does not hold: " + ("they differ beyond noise" if c.within else "B ahead beyond noise")
    could = ("no example tells them apart" if math.isnan(x.mde) else
             f"could have detected {_points(m, x.mde)} {_unit(m)}")
    if c.within:
        reach = max(abs(x.low), abs(x.high))
        if reach * scale(m) <= c.margin:
            bound = _points(m, sensitivity(x, m))
            return (f"cannot tell: interval inside ±{c.margin:g}, but the test could only have detected {bound} "
                    f"{_unit(m)}" + (" (no example tells them apart: at most 3/n)" if math.isnan(x.mde) else ""))
        return f"cannot tell: interval reaches ±{_points(m, reach)}, outside ±{c.margin:g}; {could}"
    return f"cannot tell: {could}"


def _value_unit(metric: str) -> str:
    return ("%" if metric in compare.CORRECTNESS else "F1 × 100" if metric == "eval_f1" else
            "chrF" if metric == "eval_chrf" else "per-example loss")


def _unit(metric: str) -> str:
    return ("points" if metric in compare.CORRECTNESS else "F1 points" if metric == "eval_f1" else
            "chrF" if metric == "eval_chrf" else "per-example loss")


def _points(metric: str, x: float, signed: bool = False) -> str:
    digits = 3 if metric in compare.LOSSES else 1
    return f"{scale(metric) * x:{'+' if signed else ''}.{digits}f}".replace("-", "−")


def _figure(metric: str, x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else _points(metric, x)


def _mde(metric: str, x: compare.Comparison) -> str:
    return "n/a" if math.isnan(x.mde) else _points(metric, x.mde)


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
