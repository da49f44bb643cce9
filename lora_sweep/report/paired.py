"""Paired comparisons of configurations on the same eval examples (per-example results,
lora_sweep.record.read_examples), and the effective-scale warning; sentences for findings.py.

Which comparisons: each configuration against the most accurate one, plus, in a one-knob numeric
sweep, each adjacent step; Holm's adjustment runs over exactly that set. Accuracy: exact McNemar
test (stats.mcnemar); the difference's interval is a paired bootstrap over examples (the same
resampled examples for both sides, 2,000 resamples, percentile), as are those of macro F1 and
mean eval loss, each at its Holm step-down level (stats.holm_levels), so that an interval and its
adjusted p tell the same story. Runs of one configuration over several seeds are pooled, each example paired with
the same example of the same seed.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

import lora_sweep.report.stats as stats

SEED = "param.train.seed"
_SCALE_KNOBS = ("param.lora.lora_alpha", "param.lora.alpha_ratio")  # knobs that are the scale itself


def has_examples(done: pd.DataFrame, examples: dict) -> bool:
    """Every complete trial has per-example correctness (plain-text language models have none)."""
    return bool(len(done)) and all(
        int(t) in examples and examples[int(t)]["correct"].notna().any() for t in done["trial"])


def _pooled(level, done: pd.DataFrame, examples: dict) -> pd.DataFrame:
    parts = []
    for run, t in enumerate(level.trials):
        row = done[done["trial"] == t].iloc[0]
        seed = row[SEED] if SEED in done and pd.notna(row[SEED]) else run
        parts.append(examples[t].assign(_run=str(seed)))
    return pd.concat(parts, ignore_index=True)


def comparisons(lv: list, numeric: bool) -> list[tuple[int, int]]:
    """(i, j) pairs of levels to compare: each against the best (best first), then adjacent steps."""
    best = max(range(len(lv)), key=lambda i: (lv[i].acc, -lv[i].params))
    pairs = [(best, i) for i in range(len(lv)) if i != best]
    if numeric:  # a step next to the best is already one of those
        pairs += [(i + 1, i) for i in range(len(lv) - 1) if best not in (i, i + 1)]
    return pairs


def compare(first: pd.DataFrame, second: pd.DataFrame, seed: int = 0, level: float = stats.LEVEL) -> dict:
    """Accuracy (McNemar, paired bootstrap), macro F1 and loss (paired bootstrap) of first - second."""
    m = first.merge(second, on=["_run", "example_id"], suffixes=("_a", "_b"))
    m = m[m["correct_a"].notna() & m["correct_b"].notna()]
    ca, cb = m["correct_a"].astype(bool).to_numpy(), m["correct_b"].astype(bool).to_numpy()
    test = stats.mcnemar(ca, cb)
    acc = stats.paired_bootstrap(stats.mean, (ca,), (cb,), seed=seed, level=level)
    gold = m["label_a"].astype(str).to_numpy()
    classes = np.unique(gold)
    pa, pb = m["prediction_a"].astype(str).to_numpy(), m["prediction_b"].astype(str).to_numpy()
    f1 = stats.paired_bootstrap(lambda g, p: stats.macro_f1(g, p, classes), (gold, pa), (gold, pb), seed=seed,
                                level=level)
    la, lb = m["loss_a"].to_numpy(float), m["loss_b"].to_numpy(float)
    ok = np.isfinite(la) & np.isfinite(lb)
    loss = stats.paired_bootstrap(stats.mean, (la[ok],), (lb[ok],), seed=seed, level=level) if ok.any() else None
    return {"test": test, "acc": acc, "f1": f1, "loss": loss, "level": level}


def _pts(x: float) -> str:
    return f"{100 * x:.1f}".replace("-", "−")


def _num(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def sentence(a, b, c: dict, p_adj: float, alpha: float = 0.05) -> str:
    """One comparison, a against b: who beat whom, by how much, how sure."""
    d, test = c["acc"], c["test"]
    ci = f"{100 * c.get('level', stats.LEVEL):.4g}% CI"  # Holm's step-down level: agrees with the adjusted p
    detail = (f"{ci} {_pts(d.low)} to {_pts(d.high)}; McNemar {_p(p_adj)}, Holm-adjusted; "
              f"{test.n:,} paired examples; F1 {_num(c['f1'].estimate)} ({ci} {_num(c['f1'].low)} to "
              f"{_num(c['f1'].high)})")
    if c["loss"] is not None:
        detail += f", loss {_num(c['loss'].estimate)} ({ci} {_num(c['loss'].low)} to {_num(c['loss'].high)})"
    if p_adj < alpha and d.estimate != 0:
        win, lose = (a, b) if d.estimate > 0 else (b, a)
        return f"{win.name} beat {lose.name} by {_pts(abs(d.estimate))} points ({detail})"
    return f"not supported: {a.name} vs {b.name}, {_pts(d.estimate)} points ({detail})"


def pick(done: pd.DataFrame, lv: list, numeric: bool, examples: dict):
    """The level paired_lines recommends: the cheapest of the most accurate and those its Holm-adjusted
    McNemar tests cannot tell from it (the same family as the findings)."""
    pooled = [_pooled(x, done, examples) for x in lv]
    pairs = comparisons(lv, numeric)
    tests = [_mcnemar(pooled[i], pooled[j]).p for i, j in pairs]
    best = lv[pairs[0][0]] if pairs else lv[0]
    adjusted = stats.holm(tests)
    tied = [lv[j] for (i, j), p in zip(pairs[:len(lv) - 1], adjusted) if p >= 0.05]
    cheapest = min([best, *tied], key=lambda x: x.params)
    return cheapest if cheapest.params < CHEAPER * best.params else best


def _mcnemar(first: pd.DataFrame, second: pd.DataFrame) -> stats.McNemar:
    m = first.merge(second, on=["_run", "example_id"], suffixes=("_a", "_b"))
    m = m[m["correct_a"].notna() & m["correct_b"].notna()]
    return stats.mcnemar(m["correct_a"].astype(bool).to_numpy(), m["correct_b"].astype(bool).to_numpy())


CHEAPER = 0.95  # "cheaper" means 5% fewer trainable parameters at least: a budget sweep's rounding is not a saving


def paired_lines(done: pd.DataFrame, lv: list, name: str | None, numeric: bool, examples: dict) -> list[str]:
    """Findings from paired tests over the levels `lv` (findings.levels order); `name`: the swept knob,
    None when configurations are compared by label."""
    if name:  # "r=8", not "8"
        lv = [replace(x, name=f"{name}={x.name}") for x in lv]
    pooled = [_pooled(x, done, examples) for x in lv]
    pairs = comparisons(lv, numeric)
    tests = [_mcnemar(pooled[i], pooled[j]).p for i, j in pairs]
    levels = stats.holm_levels(tests)
    results = [compare(pooled[i], pooled[j], level=lv) for (i, j), lv in zip(pairs, levels)]
    adjusted = stats.holm([r["test"].p for r in results])
    best = lv[pairs[0][0]] if pairs else lv[0]
    n_best = len(lv) - 1
    lines = []
    if numeric and name and len(lv) > 2:  # two levels: the one step is the comparison with the best
        order = sorted(((min(i, j), k) for k, (i, j) in enumerate(pairs) if abs(i - j) == 1))
        steps = [sentence(lv[pairs[k][0]], lv[pairs[k][1]], results[k], adjusted[k]) for _, k in order]
        lines.append(f"Raising {name}, step by step, on the same eval examples: " + "; ".join(steps) + ".")
    against = [sentence(best, lv[j], r, p) for (i, j), r, p in zip(pairs[:n_best], results, adjusted)]
    head = f"Against the most accurate, {best.ref} at {best.acc:.1f}%: "
    lines.append(head + "; ".join(against) + "." if against else f"Only {best.ref} completed.")
    tied = [lv[j] for (i, j), p in zip(pairs[:n_best], adjusted) if p >= 0.05]
    text = f"Best configuration: {best.ref}, {best.acc:.1f}% accuracy with {best.pct:.2f}% of parameters trainable."
    if tied:
        cheapest = min([best, *tied], key=lambda x: x.params)
        cheapest = cheapest if cheapest.params < CHEAPER * best.params else best
        text += (f" Not distinguishable from it (Holm-adjusted McNemar p≥0.05): {', '.join(x.name for x in tied)}"
                 + (f"; the cheapest of these is {cheapest.ref}, {cheapest.pct:.2f}% trainable."
                    if cheapest is not best else "; none trains 5% fewer parameters or more."))
    lines.append(text)
    lines.append(f"Statistics: {len(pairs)} paired comparison(s) on the same eval examples (each configuration "
                 "against the most accurate" + (", plus adjacent steps" if numeric and name else "")
                 + "); accuracy by an exact McNemar test on the discordant pairs, p-values Holm-adjusted over "
                 "these comparisons; intervals of differences (accuracy points, macro F1, eval loss) from a "
                 "paired bootstrap over examples (2,000 resamples, percentile), each at its Holm step-down level "
                 "(the i-th smallest p of m at 1 - 0.05/(m - i)), so an interval excludes 0 about when the "
                 "adjusted p is below 0.05; accuracy intervals in the table "
                 "are Wilson 95% intervals. Training noise between seeds is not in these tests: they ask whether "
                 "these trained models differ on these examples.")
    return lines


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
