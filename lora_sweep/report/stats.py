"""The statistics the report uses, as pure functions on arrays (no Optuna, no files).

- wilson: a 95% Wilson score interval for one accuracy (k right out of n).
- mcnemar: the exact McNemar test of two configurations scored on the same examples: of the
  discordant pairs (one right, the other wrong), b went to the first and c to the second; under
  "no difference" b ~ Binomial(b + c, 1/2), and the p-value is that binomial test's two-sided one.
- holm: Holm's step-down adjustment of a family of p-values.
- paired_bootstrap: a paired bootstrap over examples (the same resampled examples for both
  configurations): the difference of a statistic (accuracy, macro F1, mean loss) with a percentile
  interval. Seeded, so a rebuilt report reads the same.
- two_level_bootstrap: the same for configurations run under several seeds (the confirmation
  stage): seeds resampled per configuration, examples resampled in pairs; a percentile interval
  and a two-sided bootstrap p-value; holm_levels gives each interval its Holm step-down level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n (scipy's binomtest(...).proportion_ci)."""
    from scipy.stats import binomtest

    if n <= 0:
        return float("nan"), float("nan")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class McNemar:
    b: int      # examples the first got right and the second wrong
    c: int      # examples the first got wrong and the second right
    n: int      # paired examples
    p: float    # exact two-sided p-value


def mcnemar(first_correct, second_correct) -> McNemar:
    """Exact McNemar test on paired correctness (boolean arrays over the same examples, same order)."""
    from scipy.stats import binomtest

    a = np.asarray(first_correct, dtype=bool)
    s = np.asarray(second_correct, dtype=bool)
    if a.shape != s.shape:
        raise ValueError(f"paired arrays differ in shape: {a.shape} vs {s.shape}")
    b, c = int((a & ~s).sum()), int((~a & s).sum())
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return McNemar(b, c, int(a.size), p)


def holm(pvalues) -> list[float]:
    """Holm-adjusted p-values, in the order given: the i-th smallest of m is multiplied by m - i
    (i from 0), made non-decreasing in that order, and capped at 1."""
    p = np.asarray(list(pvalues), dtype=float)
    m = p.size
    out = np.empty(m)
    running = 0.0
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


@dataclass(frozen=True)
class Difference:
    estimate: float   # statistic(first) - statistic(second) on all paired examples
    low: float        # percentile interval of the bootstrapped difference
    high: float


def paired_bootstrap(statistic, first: tuple, second: tuple, *, resamples: int = RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> Difference:
    """statistic(*first) - statistic(*second), with a percentile interval from resampling the
    examples (one index draw serves both configurations: the pairs stay together).

    `first`, `second`: tuples of arrays over the same n examples; `statistic` takes arrays whose
    last axis runs over examples (a leading resample axis may come first) and reduces that axis."""
    first = tuple(np.asarray(x) for x in first)
    if first[0].shape[0] == 0:
        return Difference(float("nan"), float("nan"), float("nan"))
    d = paired_samples(statistic, first, second, resamples=resamples, seed=seed)
    low, high = d.interval(level)
    return Difference(d.estimate, low, high)


def paired_samples(statistic, first: tuple, second: tuple, *, resamples: int = RESAMPLES,
                   seed: int = 0) -> "SeedDifference":
    """paired_bootstrap's distribution itself (one run a side): the estimate and the bootstrapped
    differences, whose interval and two-sided p SeedDifference gives. Arrays' first axis runs over
    the n examples (a statistic of summed per-example vectors, chrF's, takes (n, k) arrays)."""
    first = tuple(np.asarray(x) for x in first)
    second = tuple(np.asarray(x) for x in second)
    n = first[0].shape[0]
    if n == 0 or any(x.shape[0] != n for x in first + second):
        raise ValueError(f"a paired comparison needs the same examples on both sides, at least one; got "
                         f"{[x.shape[0] for x in first + second]}")
    estimate = float(statistic(*first) - statistic(*second))
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, 500):  # 500 resamples at a time bounds the memory
        idx = rng.integers(0, n, size=(min(500, resamples - start), n))
        diffs.append(statistic(*(x[idx] for x in first)) - statistic(*(x[idx] for x in second)))
    return SeedDifference(estimate, np.concatenate(diffs))


def mean(x):
    return np.asarray(x, dtype=float).mean(axis=-1)


def macro_f1(gold, predicted, classes=None):
    """Macro F1 over `classes` (default: the gold labels present), along the last axis; a class
    with no gold and no predicted example scores 0, as sklearn's zero_division=0 does."""
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    classes = np.unique(gold) if classes is None else classes
    scores = []
    for k in classes:
        g, p = gold == k, predicted == k
        tp = (g & p).sum(axis=-1)
        denom = g.sum(axis=-1) + p.sum(axis=-1)
        scores.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
    return np.mean(scores, axis=0)


@dataclass(frozen=True)
class SeedDifference:
    """A difference of means over seeds, with its two-level bootstrap distribution."""
    estimate: float         # mean over first's seeds - mean over second's seeds, on all paired examples
    samples: np.ndarray     # the bootstrapped differences

    def interval(self, level: float = LEVEL) -> tuple[float, float]:
        tail = 100 * (1 - level) / 2
        return float(np.percentile(self.samples, tail)), float(np.percentile(self.samples, 100 - tail))

    @property
    def p(self) -> float:
        """Two-sided bootstrap p-value of "no difference": twice the smaller tail beyond 0, with the
        (k + 1) / (B + 1) correction, so it is never 0."""
        b = self.samples.size
        tail = min(int((self.samples <= 0).sum()), int((self.samples >= 0).sum()))
        return float(min(1.0, 2 * (tail + 1) / (b + 1)))


def two_level_bootstrap(statistic, first: list, second: list, *, resamples: int = 4000,
                        seed: int = 0) -> SeedDifference:
    """Two configurations, each run under several seeds and scored on the same n examples: the
    difference of statistic averaged over seeds, resampled at both levels at once. Each resample
    draws seeds with replacement for each configuration (training noise) and one set of examples
    shared by both (sampling noise, paired). `first`, `second`: one tuple of arrays per seed,
    like paired_bootstrap's; `statistic` as there."""
    first = [tuple(np.asarray(x) for x in run) for run in first]
    second = [tuple(np.asarray(x) for x in run) for run in second]
    n = first[0][0].shape[0]
    if n == 0 or any(x.shape[0] != n for run in first + second for x in run):
        raise ValueError("every run must be scored on the same examples, at least one")
    estimate = float(np.mean([statistic(*r) for r in first]) - np.mean([statistic(*r) for r in second]))
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, 500):  # 500 resamples at a time bounds the memory
        size = min(500, resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        sides = []
        for runs in (first, second):
            per_seed = np.stack([statistic(*(x[idx] for x in run)) for run in runs])  # (seeds, size)
            pick = rng.integers(0, len(runs), size=(size, len(runs)))                  # seeds drawn
            sides.append(np.take_along_axis(per_seed.T, pick, axis=1).mean(axis=1))
        diffs.append(sides[0] - sides[1])
    return SeedDifference(estimate, np.concatenate(diffs))


def holm_levels(pvalues, level: float = LEVEL) -> list[float]:
    """The confidence level of each comparison's interval under Holm's step-down: the i-th smallest
    p of m is tested at alpha / (m - i), so its interval is a 1 - alpha / (m - i) one."""
    p = np.asarray(list(pvalues), dtype=float)
    out = np.empty(p.size)
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        out[i] = 1 - (1 - level) / (p.size - rank)
    return out.tolist()


def split_difference(statistic, first: list, second: list, *, resamples: int = RESAMPLES,
                     seed: int = 0) -> SeedDifference:
    """The same models scored on two independent sets of examples (validation and test): the
    difference of statistic averaged over the runs, resampling each set's examples apart (one draw
    a set, shared by its runs, since the runs are the same models on both sides)."""
    first = [tuple(np.asarray(x) for x in run) for run in first]
    second = [tuple(np.asarray(x) for x in run) for run in second]
    estimate = float(np.mean([statistic(*r) for r in first]) - np.mean([statistic(*r) for r in second]))
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, 500):
        size = min(500, resamples - start)
        sides = []
        for runs in (first, second):
            n = runs[0][0].shape[0]
            idx = rng.integers(0, n, size=(size, n))
            sides.append(np.mean([statistic(*(x[idx] for x in run)) for run in runs], axis=0))
        diffs.append(sides[0] - sides[1])
    return SeedDifference(estimate, np.concatenate(diffs))
