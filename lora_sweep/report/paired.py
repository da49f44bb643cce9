"""Paired comparisons of configurations on the same examples (per-example results,
lora_sweep.record.read_examples) for the findings and the one-seed recommendation, and the
effective-scale warning; sentences for findings.py. The statistics are report/compare.py's.

Which comparisons: each configuration against the best by study.metric, plus, in a one-knob numeric
sweep, each adjacent step; Holm's adjustment runs over exactly that set, and the recommendation reads
the same adjusted p-values as the sentences (one PairedVerdict serves both). A configuration is its
searched values without the seed: its runs under several seeds are its seeds, never separate
configurations. One run a side under one seed: exact McNemar on correctness (paired bootstrap for
other metrics); anything else: the two-level bootstrap. With accuracy, each one-seed comparison also
gets paired-bootstrap intervals of macro F1 and eval loss at its Holm level.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

import lora_sweep.report.compare as compare
import lora_sweep.report.stats as stats

SEED = "param.train.seed"
_SCALE_KNOBS = ("param.lora.lora_alpha", "param.lora.alpha_ratio")  # knobs that are the scale itself
CHEAPER = 0.95  # "cheaper" means 5% fewer trainable parameters at least: a budget sweep's rounding is not a saving


def has_examples(done: pd.DataFrame, examples: dict, metric: str = "eval_accuracy") -> bool:
    """Every complete trial has per-example results that `metric` can be scored on."""
    return bool(len(done)) and all(
        int(t) in examples and compare.scored(metric, examples[int(t)]).any() for t in done["trial"])


def seed_of(row) -> object:
    """A trial's training seed: the searched one, else the one its params recorded (None if unknown)."""
    for key in ("seed", SEED):
        if key in row and row[key] is not None and not (isinstance(row[key], float) and math.isnan(row[key])):
            return row[key]
    params = row.get("params") if hasattr(row, "get") else None
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except ValueError:
            params = None
    return params.get("seed") if isinstance(params, dict) else None


def runs_of(level, done: pd.DataFrame, examples: dict) -> compare.Runs:
    """A level's runs, each under its own seed (never its position among the level's trials)."""
    rows = [done[done["trial"] == t].iloc[0] for t in level.trials]
    return compare.Runs(tuple(seed_of(r) for r in rows), tuple(examples[int(t)] for t in level.trials))


def comparisons(lv: list, numeric: bool, sign: int = 1) -> list[tuple[int, int]]:
    """(i, j) pairs of levels to compare: each against the best (best first), then adjacent steps.
    The best: the best value (sign 1: highest), a tie to fewer trainable parameters."""
    best = max(range(len(lv)), key=lambda i: (sign * _value(lv[i]), -lv[i].params))
    pairs = [(best, i) for i in range(len(lv)) if i != best]
    if numeric:  # a step next to the best is already one of those
        pairs += [(i + 1, i) for i in range(len(lv) - 1) if best not in (i, i + 1)]
    return pairs


def _value(level) -> float:
    v = getattr(level, "value", None)
    return level.acc if v is None or (isinstance(v, float) and math.isnan(v)) else v


@dataclass(frozen=True)
class PairedVerdict:
    metric: str
    direction: str
    levels: list           # findings.Level, table order
    pairs: list            # (i, j) compared
    results: list          # compare.Comparison per pair (Holm over all of them)
    best: object           # the best level by the metric
    tied: list             # levels the best cannot be told from (Holm-adjusted p >= 0.05)
    pick: object           # the cheapest of best + tied (5% fewer parameters at least), else the best
    extras: list           # per pair: {"f1": Difference, "loss": Difference} (accuracy, one seed), else {}
    runs: list             # compare.Runs per level
    knob: str | None = None  # the one knob a one-knob sweep varies (level names read "knob=value")

    @property
    def n_best(self) -> int:
        return len(self.levels) - 1


def paired_verdict(done: pd.DataFrame, lv: list, numeric: bool, examples: dict, metric: str = "eval_accuracy",
                   direction: str = "maximize", knob: str | None = None) -> PairedVerdict:
    sign = 1 if direction == "maximize" else -1
    runs = [runs_of(x, done, examples) for x in lv]
    pairs = comparisons(lv, numeric, sign)
    results = compare.family(metric, runs, pairs)
    best = lv[pairs[0][0]] if pairs else lv[0]
    tied = [lv[r.second] for r in results[:len(lv) - 1] if not (r.significant() and sign * r.estimate > 0)]
    cheapest = min([best, *tied], key=lambda x: x.params)
    pick = cheapest if cheapest.params < CHEAPER * best.params else best
    extras = [_extras(runs[r.first], runs[r.second], r) if metric == "eval_accuracy" else {} for r in results]
    return PairedVerdict(metric, direction, lv, pairs, results, best, tied, pick, extras, runs, knob)


def _extras(first: compare.Runs, second: compare.Runs, r: compare.Comparison) -> dict:
    """Macro F1 and eval loss of a one-seed accuracy comparison, paired bootstrap at its Holm level."""
    if r.method != "McNemar":
        return {}
    ids = compare.shared_ids("eval_accuracy", first, second)
    a = first.frames[0].set_index("example_id").loc[ids]
    b = second.frames[0].set_index("example_id").loc[ids]
    gold, pa, pb = compare.codes(a["label"], a["prediction"], b["prediction"])
    classes = np.unique(gold)
    f1 = stats.paired_bootstrap(lambda g, p: stats.macro_f1(g, p, classes), (gold, pa), (gold, pb), level=r.level)
    la, lb = a["loss"].to_numpy(float), b["loss"].to_numpy(float)
    ok = np.isfinite(la) & np.isfinite(lb)
    loss = stats.paired_bootstrap(stats.mean, (la[ok],), (lb[ok],), level=r.level) if ok.any() else None
    return {"f1": f1, "loss": loss}


def _pts(x: float) -> str:
    return f"{100 * x:.1f}".replace("-", "−")


def _num(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def amount(metric: str, x: float, signed: bool = False) -> str:
    """A difference in the metric's units: accuracy points, chrF points, else the raw figure."""
    if metric in compare.CORRECTNESS:
        return (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}").replace("-", "−") + " points"
    if metric == "eval_chrf":
        return (f"{x:+.1f}" if signed else f"{x:.1f}").replace("-", "−") + " chrF"
    short = {"eval_loss": "eval loss", "eval_perplexity": "per-example mean loss", "eval_f1": "macro F1"}[metric]
    return (f"{x:+.3f}" if signed else f"{x:.3f}").replace("-", "−") + f" {short}"


def _bound(metric: str, x: float) -> str:
    return _pts(x) if metric in compare.CORRECTNESS else (f"{x:.1f}" if metric == "eval_chrf" else _num(x))


def detectable(metric: str, r: compare.Comparison) -> str:
    if math.isnan(r.mde):  # every resample gave the same difference: no example tells the two apart
        return "no example tells them apart, so no detectable difference can be estimated"
    return f"it could detect about {amount(metric, r.mde)} at 80% power"


def sentence(a, b, r: compare.Comparison, metric: str = "eval_accuracy", extras: dict | None = None,
             direction: str = "maximize") -> str:
    """One comparison, a against b: who beat whom, by how much, how sure; if not, what it could have seen."""
    ci = f"{100 * r.level:.4g}% CI"  # Holm's step-down level: agrees with the adjusted p
    if r.method == "McNemar":
        how = f"McNemar {_p(r.p_adj)}, Holm-adjusted; {r.n:,} paired examples"
    elif r.method == "paired bootstrap":
        how = f"paired bootstrap {_p(r.p_adj)}, Holm-adjusted; {r.n:,} paired examples"
    else:
        seeds = " vs ".join(", ".join(map(str, s)) for s in r.seeds)
        how = (f"two-level bootstrap {_p(r.p_adj)}, Holm-adjusted; seeds {seeds} resampled, "
               f"{r.n:,} shared examples")
    detail = f"{ci} {_bound(metric, r.low)} to {_bound(metric, r.high)}; {how}"
    extras = extras or {}
    if extras.get("f1") is not None:
        f1 = extras["f1"]
        detail += f"; F1 {_num(f1.estimate)} ({ci} {_num(f1.low)} to {_num(f1.high)})"
    if extras.get("loss") is not None:
        loss = extras["loss"]
        detail += f", loss {_num(loss.estimate)} ({ci} {_num(loss.low)} to {_num(loss.high)})"
    sign = 1 if direction == "maximize" else -1
    if r.significant() and r.estimate != 0:
        win, lose = (a, b) if sign * r.estimate > 0 else (b, a)
        return f"{win.name} beat {lose.name} by {amount(metric, abs(r.estimate))} ({detail})"
    return (f"not supported: {a.name} vs {b.name}, {amount(metric, r.estimate, signed=metric not in compare.CORRECTNESS)}"
            f" ({detail}; {detectable(metric, r)})")


def _could(metric: str, r: compare.Comparison) -> str:
    return "no example tells them apart" if math.isnan(r.mde) else f"could detect about {amount(metric, r.mde)}"


def _shown(metric: str, level) -> str:
    v = _value(level)
    return f"{100 * v:.1f}%" if metric in compare.CORRECTNESS else f"{v:.1f}" if metric == "eval_chrf" else f"{v:.4g}"


def paired_lines(v: PairedVerdict, numeric: bool, split: str = "eval") -> list[str]:
    """Findings from a PairedVerdict (its levels named as they are to be shown)."""
    m, name, lv = v.metric, v.knob, list(v.levels)
    best, pick, tied = v.best, v.pick, list(v.tied)
    lines = []
    sentences = [sentence(lv[r.first], lv[r.second], r, m, e, v.direction) for r, e in zip(v.results, v.extras)]
    if numeric and name and len(lv) > 2:  # two levels: the one step is the comparison with the best
        order = sorted((min(r.first, r.second), k) for k, r in enumerate(v.results) if abs(r.first - r.second) == 1)
        lines.append(f"Raising {name}, step by step, on the same examples: " + "; ".join(sentences[k] for _, k in order)
                     + ".")
    what = "most accurate" if m == "eval_accuracy" else f"best by {m}"
    head = f"Against the {what}, {best.ref} at {_shown(m, best)}: "
    against = sentences[:v.n_best]
    lines.append(head + "; ".join(against) + "." if against else f"Only {best.ref} completed.")
    value = (f"{_shown(m, best)} accuracy" if m == "eval_accuracy" else f"{m} {_shown(m, best)}")
    text = f"Best configuration: {best.ref}, {value} with {best.pct:.2f}% of parameters trainable."
    if tied:
        could = {r.second: r for r in v.results[:v.n_best]}
        shown = ", ".join(f"{x.name} ({_could(m, could[v.levels.index(x)])})" for x in tied)
        text += (f" Not distinguishable from it (Holm-adjusted p≥0.05): {shown}"
                 + (f"; the cheapest of these is {pick.ref}, {pick.pct:.2f}% trainable."
                    if pick is not best else "; none trains 5% fewer parameters or more."))
    lines.append(text)
    methods = sorted({r.method for r in v.results})
    lines.append(f"Statistics: {len(v.pairs)} paired comparison(s) on the same {'test' if split == 'test' else 'eval'} "
                 "examples (each configuration against the best" + (", plus adjacent steps" if numeric and name else "")
                 + f"), on {compare.STATISTIC[m]}: " + "; ".join(_METHOD[x] for x in methods)
                 + "; p-values Holm-adjusted over these comparisons; each interval at its Holm step-down level "
                 "(the i-th smallest p of m at 1 - 0.05/(m - i)), so an interval excludes 0 about when the adjusted "
                 "p is below 0.05; 'could detect' is the difference the test would find with 80% power at that level "
                 "(normal approximation from the bootstrap spread)"
                 + ("; accuracy intervals in the table are Wilson 95% intervals" if m == "eval_accuracy" else "")
                 + ("." if "two-level bootstrap" in methods else ". Training noise between seeds is not in these "
                    "tests: they ask whether these trained models differ on these examples."))
    return lines


_METHOD = {"McNemar": "one seed a side: an exact McNemar test on the discordant pairs, intervals from a paired "
                      "bootstrap over examples (2,000 resamples, percentile)",
           "paired bootstrap": "one seed a side: a paired bootstrap over examples (2,000 resamples, percentile; "
                               "two-sided p)",
           "two-level bootstrap": "several seeds (or different ones): a two-level bootstrap (2,000 resamples: each "
                                  "configuration's seeds drawn with replacement, one draw of examples shared by "
                                  "both; two-sided p)"}


def disagreements(best: compare.Runs, pick: compare.Runs, limit: int = 5) -> pd.DataFrame:
    """Up to `limit` examples two configurations answer differently (their first shared seed, else each
    one's first run): example_id (the row in the source data), label, each one's prediction."""
    shared = [s for s in best.seeds if s in pick.seeds]
    fa = best.frames[best.seeds.index(shared[0])] if shared else best.frames[0]
    fb = pick.frames[pick.seeds.index(shared[0])] if shared else pick.frames[0]
    m = fa.merge(fb, on="example_id", suffixes=("_best", "_pick"))
    m = m[m["prediction_best"].notna() & m["prediction_pick"].notna()
          & (m["prediction_best"].astype(str) != m["prediction_pick"].astype(str))]
    return m[["example_id", "label_best", "prediction_best", "prediction_pick"]].rename(
        columns={"label_best": "label"}).head(limit).reset_index(drop=True)


def disagreement_lines(best_name: str, pick_name: str, best: compare.Runs, pick: compare.Runs,
                       free_text: bool = False) -> list[str]:
    """The report's few examples on which the pick and the best differ, as a markdown table (free_text:
    generated answers to a reference, escaped and cut as text_cell does)."""
    table = disagreements(best, pick)
    if not len(table):
        return []
    def cell(x) -> str:
        if free_text:
            return text_cell(x)
        missing = x is None or (isinstance(x, float) and math.isnan(x))
        return "" if missing else str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["", f"Examples {pick_name} and {best_name} answer differently (up to five; Example = the row in the "
             "source data):", "", f"| Example | {'Reference' if free_text else 'Label'} | {cell(best_name)} | "
             f"{cell(pick_name)} |", "|--:|:--|:--|:--|"]
    lines += [f"| {int(r.example_id)} | {cell(r.label)} | {cell(r.prediction_best)} | {cell(r.prediction_pick)} |"
              for r in table.itertuples()]
    return lines + [""]


TEXT_LIMIT = 200  # characters of free text a table cell shows


_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")  # what GFM would read as markup (a pipe: a new cell)


def text_cell(x, limit: int = TEXT_LIMIT, keep_end: bool = False) -> str:
    """Free text (a prompt, a generated answer) as one GFM table cell: whitespace runs, newlines too, as one
    space; cut to `limit` characters with an ellipsis (keep_end: its end, where a chat prompt's last turn is);
    markup characters backslash-escaped, so the text shows as written and a pipe never splits the cell."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA:
        return ""
    text = " ".join(str(x).split())
    if len(text) > limit:
        text = "…" + text[-(limit - 1):].lstrip() if keep_end else text[:limit - 1].rstrip() + "…"
    return _SPECIAL.sub(r"\\\1", text)


def scale_warning(done: pd.DataFrame, lv: list, column: str | None, numeric: bool) -> str | None:
    """A warning when compared configurations differ in effective scale as well as in the knob."""
    if "lora_scale" not in done or column in _SCALE_KNOBS or len(lv) < 2:
        return None
    scales = []
    for x in lv:
        s = done[done["trial"].isin(x.trials)]["lora_scale"].astype(float)
        scales.append(float(s.iloc[0]) if len(s) and s.notna().all() and s.nunique() == 1 else None)
    if column and column != "param.variant":
        knob = column.removeprefix("param.").split(".")[-1]
        lv = [replace(x, name=f"{knob}={x.name}") for x in lv]
    flagged = []
    for i, j in comparisons(lv, numeric):
        si, sj = scales[i], scales[j]
        if si is None or sj is None or np.isclose(si, sj):
            continue
        hi, lo = (i, j) if si > sj else (j, i)
        flagged.append(f"{lv[hi].name} (scale {scales[hi]:g}) vs {lv[lo].name} (scale {scales[lo]:g}): "
                       f"a {scales[hi] / scales[lo]:.3g}× larger step")
    if not flagged:
        return None
    return ("Effective scale differs as well as the compared setting, so part of these differences may be the "
            "adapter's step size (lora_alpha/r, or lora_alpha/√r with rsLoRA), not the setting itself: "
            + "; ".join(flagged) + ".")
