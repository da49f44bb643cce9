"""The held-out test split in the report (data.test_size): the search's verdict, chosen on validation,
repeated on test examples that nothing choosing has read, and the pick's selection optimism
(its validation figure minus its test figure, the winner's curse made visible)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

import lora_sweep.report.compare as compare
import lora_sweep.report.paired as paired
from lora_sweep import record


def load_test_examples(study_dir: Path, df: pd.DataFrame, stage: str = "") -> dict:
    """Trial number -> its test-split per-example results, for the complete trials that stored them."""
    out = {}
    for t in df[df["status"] == "complete"]["trial"] if len(df) else []:
        path = record.examples_path(study_dir, int(t), stage, split="test")
        if path.exists():
            out[int(t)] = record.read_examples(path)
    return out


@dataclass(frozen=True)
class Repeat:
    verdict: paired.PairedVerdict   # on validation
    results: list                   # compare.Comparison per verdict.pairs, on test
    optimism: tuple                 # compare.optimism of the pick: (estimate, low, high, n_eval, n_test)
    pick_eval: float
    pick_test: float


def repeat(v: paired.PairedVerdict | None, done: pd.DataFrame, test_examples: dict) -> Repeat | None:
    """The validation verdict's comparisons on the test split (the same pairs, the same Holm family
    size); None where some compared trial has no test results."""
    if v is None or not test_examples:
        return None
    trials = [t for x in v.levels for t in x.trials]
    if any(t not in test_examples or not compare.scored(v.metric, test_examples[t]).any() for t in trials):
        return None
    runs = [paired.runs_of(x, done, test_examples) for x in v.levels]
    results = compare.family(v.metric, runs, v.pairs)
    i = v.levels.index(v.pick)
    estimate = compare.optimism(v.metric, v.runs[i], runs[i])
    classes = compare.classes_of(v.runs + runs) if v.metric == "eval_f1" else None
    return Repeat(v, results, estimate, compare.value(v.metric, v.runs[i], classes=classes),
                  compare.value(v.metric, runs[i], classes=classes))


def _cell(metric: str, r, direction: str) -> str:
    sign = 1 if direction == "maximize" else -1
    verdict = "beyond noise" if r.significant() and sign * r.estimate != 0 else "not supported"
    return f"{paired.amount(metric, r.estimate, signed=True)} ({paired._p(r.p_adj)}, {verdict})"


def _outcome(r) -> int:
    """+1 / -1: the first / the second beat the other beyond noise; 0: not supported."""
    return 0 if not r.significant() or r.estimate == 0 else (1 if r.estimate > 0 else -1)


def _figure(metric: str, x: float) -> str:
    return f"{100 * x:.1f}%" if metric in compare.CORRECTNESS else f"{x:.4g}"


def section(rep: Repeat | None) -> list[str]:
    if rep is None:
        return []
    v, m = rep.verdict, rep.verdict.metric
    est, low, high, n_eval, n_test = rep.optimism
    lines = ["", "## Held-out test split", "",
             f"Each complete trial also scored the held-out test split (data.test_size) once, after training, "
             f"{n_test:,} of its examples counting for {m}; the "
             "sampler, pruner, confirmation and recommendation never read them. The findings' comparisons of the "
             "search's runs, chosen and judged on validation, repeated on test (the same pairs, Holm over the same "
             "family):", "",
             "| Comparison | Validation | Test |", "|:--|--:|--:|"]
    for a, b in zip(v.results, rep.results):
        lines.append(f"| {v.levels[a.first].name} vs {v.levels[a.second].name} | {_cell(m, a, v.direction)} | "
                     f"{_cell(m, b, v.direction)} |")
    agree = [_outcome(a) == _outcome(b) for a, b in zip(v.results, rep.results)]
    same = all(agree)
    lines += ["", f"**The verdict {'holds' if same else 'does not fully hold'} on test**"
              + ("" if same else f" ({sum(not x for x in agree)} of {len(agree)} comparisons differ in outcome)")
              + f". The pick, {v.pick.ref}: {_figure(m, rep.pick_eval)} on validation, {_figure(m, rep.pick_test)} "
              f"on test; selection optimism (validation minus test) {paired.amount(m, est, signed=True)} "
              f"(95% CI {paired._bound(m, low)} to {paired._bound(m, high)}; a bootstrap resampling the "
              f"{n_eval:,} validation and {n_test:,} test examples apart)."]
    return lines


def summary_line(rep: Repeat | None) -> str:
    """One line for the sweep's closing summary."""
    if rep is None:
        return ""
    m = rep.verdict.metric
    est, low, high, n_eval, n_test = rep.optimism
    return (f"Held-out test ({n_test:,} examples nothing chose on): {rep.verdict.pick.name} scores "
            f"{_figure(m, rep.pick_test)} (validation {_figure(m, rep.pick_eval)}); selection optimism "
            f"{paired.amount(m, est, signed=True)} (95% CI {paired._bound(m, low)} to {paired._bound(m, high)})")
