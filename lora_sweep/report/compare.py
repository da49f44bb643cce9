"""Configurations compared on their per-example results: the one engine behind the paired findings,
the confirmation verdict and the recommendation, for every metric and every shape of sweep.

A configuration is its runs (`Runs`): one per seed, each a per-example frame (lora_sweep.record
EXAMPLE_COLUMNS). Each metric is tested through its own per-example statistic:

- eval_accuracy, eval_exact_match: `correct`, over the examples scored (a language model's examples
  beyond data.generate_size are not scored, and do not count);
- eval_loss, eval_perplexity: each example's mean loss over its answer tokens, averaged over examples
  (per-example mean; perplexity is exp of a token-weighted mean, which this tests in the same direction);
- eval_f1: macro F1 of prediction against label;
- eval_chrf: sacrebleu's chrF of the summed per-sentence character statistics, which is exactly the
  corpus chrF, so resampling examples resamples the corpus score.

Two configurations of one run each under the same seed pair on their shared examples: an exact McNemar
test for correctness, a paired bootstrap otherwise. Any other pair (several seeds on a side, or runs
under different seeds) goes through the two-level bootstrap (seeds resampled per configuration,
examples resampled in pairs). A comparison with no shared scored example is an error, never p=1.
Holm's adjustment runs over the family given; each interval is at its Holm step-down level, and each
comparison carries the smallest difference it could have detected at 80% power at that level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

import lora_sweep.report.stats as stats

CORRECTNESS = ("eval_accuracy", "eval_exact_match")
LOSSES = ("eval_loss", "eval_perplexity")
METRICS = CORRECTNESS + LOSSES + ("eval_f1", "eval_chrf")
ALPHA = 0.05
POWER = 0.8
RESAMPLES = 2000

# What each metric's test reads, in words (the reports' procedure notes).
STATISTIC = {"eval_accuracy": "per-example correctness", "eval_exact_match": "per-example exact match",
             "eval_loss": "per-example mean loss", "eval_perplexity": "per-example mean loss",
             "eval_f1": "macro F1 over the examples", "eval_chrf": "corpus chrF from summed per-example statistics"}


class NoSharedExamples(ValueError):
    """Two configurations with no scored example in common: a comparison of nothing."""


@dataclass(frozen=True)
class Runs:
    """One configuration's runs: each run's seed and its per-example results, in the same order."""
    seeds: tuple
    frames: tuple

    def __post_init__(self):
        if len(self.seeds) != len(self.frames) or not self.frames:
            raise ValueError(f"Runs needs one seed per frame and at least one run; got {len(self.seeds)} seeds "
                             f"and {len(self.frames)} frames")


@dataclass(frozen=True)
class Comparison:
    """first against second (indices into the configurations compared), in the metric's own units."""
    first: int
    second: int
    estimate: float      # statistic(first) - statistic(second), averaged over each side's seeds
    p: float             # two-sided, unadjusted
    p_adj: float         # Holm-adjusted over the family
    level: float         # the interval's confidence level (Holm's step-down level of this comparison)
    low: float
    high: float
    n: int               # examples both sides were scored on
    method: str          # "McNemar" | "paired bootstrap" | "two-level bootstrap"
    seeds: tuple         # (seeds of first, seeds of second)
    mde: float           # the smallest |difference| detectable at 80% power at `level` (detectable(); NaN: none)
    b: int | None = None  # McNemar: examples first got right and second wrong ...
    c: int | None = None  # ... and the other way round

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p_adj < alpha


def scored(metric: str, frame: pd.DataFrame) -> pd.Series:
    """The rows of a per-example frame that `metric` counts."""
    if metric in CORRECTNESS:
        return frame["correct"].notna()
    if metric in LOSSES:
        loss = pd.to_numeric(frame["loss"], errors="coerce")
        return loss.notna() & np.isfinite(loss.fillna(0.0))
    if metric in ("eval_f1", "eval_chrf"):
        return frame["label"].notna() & frame["prediction"].notna()
    raise KeyError(f"no per-example statistic for {metric!r}; one of {', '.join(METRICS)}")


def scored_ids(metric: str, frame: pd.DataFrame) -> set:
    return set(frame.loc[scored(metric, frame), "example_id"].astype(int))


def arrays(metric: str, frame: pd.DataFrame, ids) -> tuple:
    """The statistic's inputs for these example ids, in this order (the first axis runs over examples)."""
    e = frame.set_index("example_id").loc[list(ids)]
    if metric in CORRECTNESS:
        return (e["correct"].astype(bool).to_numpy(float),)
    if metric in LOSSES:
        return (e["loss"].to_numpy(float),)
    if metric == "eval_f1":
        return (e["label"].astype(str).to_numpy(), e["prediction"].astype(str).to_numpy())
    if metric == "eval_chrf":
        return (chrf_statistics(e["prediction"].astype(str).tolist(), e["label"].astype(str).tolist()),)
    raise KeyError(f"no per-example statistic for {metric!r}; one of {', '.join(METRICS)}")


def codes(*columns) -> tuple:
    """Label texts as integer codes, one code per distinct text across these columns (so only codes from one
    call compare): macro F1 over them equals it over the texts, and integers compare much faster."""
    texts = [pd.Series(c).astype(str).to_numpy() for c in columns]
    _, inverse = np.unique(np.concatenate(texts), return_inverse=True)
    return tuple(np.split(inverse, np.cumsum([len(t) for t in texts])[:-1]))


def statistic(metric: str, classes=None):
    """The function of arrays() that reduces the examples axis (a leading resample axis may come first)."""
    if metric == "eval_f1":
        return lambda gold, predicted: stats.macro_f1(gold, predicted, classes)
    if metric == "eval_chrf":
        return chrf_of_sums
    return stats.mean


def chrf_statistics(predictions: list[str], references: list[str]) -> np.ndarray:
    """sacrebleu's chrF statistics of each (prediction, reference): an (n, k) array whose column sums
    score the corpus (metrics.generation_scores uses the same CHRF defaults)."""
    from sacrebleu.metrics import CHRF

    return np.asarray(CHRF()._extract_corpus_statistics(predictions, [references]), dtype=np.int64)


def chrf_of_sums(per_example: np.ndarray) -> np.ndarray | float:
    """Corpus chrF of per-example statistics: their sum over the examples axis (-2), then sacrebleu's score."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    sums = np.asarray(per_example).sum(axis=-2)
    if sums.ndim == 1:
        return float(chrf._compute_f_score(sums.tolist()))
    return np.apply_along_axis(lambda s: chrf._compute_f_score(s.tolist()), -1, sums)


def value(metric: str, runs: Runs, ids=None, classes=None) -> float:
    """The configuration's statistic, averaged over its runs (on `ids`, default each run's scored examples)."""
    stat = statistic(metric, classes)
    out = []
    for frame in runs.frames:
        use = sorted(scored_ids(metric, frame)) if ids is None else list(ids)
        out.append(float(stat(*arrays(metric, frame, use))) if use else float("nan"))
    return float(np.mean(out))


def shared_ids(metric: str, *runs: Runs) -> list:
    """The examples every run of every configuration scored."""
    sets = [scored_ids(metric, f) for r in runs for f in r.frames]
    return sorted(set.intersection(*sets)) if sets else []


def classes_of(runs: list[Runs]) -> np.ndarray:
    return np.unique(np.concatenate([f["label"].dropna().astype(str).to_numpy() for r in runs for f in r.frames]))


def _pair(metric: str, first: Runs, second: Runs, classes, resamples: int, seed: int):
    ids = shared_ids(metric, first, second)
    if not ids:
        raise NoSharedExamples(f"no example scored ({STATISTIC[metric]}) by both configurations (seeds "
                               f"{first.seeds} and {second.seeds}): nothing to compare them on")
    stat = statistic(metric, classes)
    one_seed = len(first.frames) == 1 and len(second.frames) == 1 and first.seeds[0] == second.seeds[0]
    if one_seed:  # the same seed on both sides: pair example by example
        xa, xb = arrays(metric, first.frames[0], ids), arrays(metric, second.frames[0], ids)
        d = stats.paired_samples(stat, xa, xb, resamples=resamples, seed=seed)
        if metric in CORRECTNESS:
            m = stats.mcnemar(xa[0].astype(bool), xb[0].astype(bool))
            return d, m.p, "McNemar", len(ids), m
        return d, d.p, "paired bootstrap", len(ids), None
    d = stats.two_level_bootstrap(stat, [arrays(metric, f, ids) for f in first.frames],
                                  [arrays(metric, f, ids) for f in second.frames], resamples=resamples, seed=seed)
    return d, d.p, "two-level bootstrap", len(ids), None


def detectable(level: float, samples) -> float:
    """The smallest |difference| a two-sided test at confidence `level` finds with 80% power (normal
    approximation from the bootstrap spread); NaN where no resample differs (nothing to estimate it from)."""
    from scipy.stats import norm

    spread = float(np.std(samples, ddof=1)) if np.size(samples) > 1 else 0.0
    return float((norm.ppf(1 - (1 - level) / 2) + norm.ppf(POWER)) * spread) if spread > 0 else float("nan")


def family(metric: str, configs: list[Runs], pairs: list[tuple[int, int]], *, resamples: int = RESAMPLES,
           seed: int = 0, alpha: float = ALPHA) -> list[Comparison]:
    """Each (i, j) of `pairs` compared (configs[i] - configs[j]), Holm over exactly these comparisons."""
    if not pairs:
        return []
    classes = classes_of(configs) if metric == "eval_f1" else None
    raw = [_pair(metric, configs[i], configs[j], classes, resamples, seed) for i, j in pairs]
    ps = [r[1] for r in raw]
    adjusted = stats.holm(ps)
    levels = stats.holm_levels(ps, 1 - alpha)
    out = []
    for (i, j), (d, p, method, n, m), p_adj, level in zip(pairs, raw, adjusted, levels):
        low, high = d.interval(level)
        out.append(Comparison(i, j, d.estimate, p, p_adj, level, low, high, n, method,
                              (configs[i].seeds, configs[j].seeds), detectable(level, d.samples),
                              m.b if m is not None else None, m.c if m is not None else None))
    return out


def optimism(metric: str, eval_runs: Runs, test_runs: Runs, *, resamples: int = RESAMPLES,
             seed: int = 0, level: float = stats.LEVEL) -> tuple[float, float, float, int, int]:
    """Selection optimism of a configuration: its statistic on validation minus on test (same models,
    two independent sets of examples), with a bootstrap interval resampling each set apart.
    Returns (estimate, low, high, n_eval, n_test)."""
    classes = classes_of([eval_runs, test_runs]) if metric == "eval_f1" else None
    ids_e, ids_t = shared_ids(metric, eval_runs), shared_ids(metric, test_runs)
    if not ids_e or not ids_t:
        raise NoSharedExamples(f"selection optimism needs scored examples on both splits; got {len(ids_e)} "
                               f"validation and {len(ids_t)} test")
    d = stats.split_difference(statistic(metric, classes), [arrays(metric, f, ids_e) for f in eval_runs.frames],
                               [arrays(metric, f, ids_t) for f in test_runs.frames], resamples=resamples, seed=seed)
    low, high = d.interval(level)
    return d.estimate, low, high, len(ids_e), len(ids_t)


def config_key(values: dict) -> str:
    """A configuration's identity as text (for grouping): its searched values, sorted, JSON."""
    return json.dumps({k: values[k] for k in sorted(values)}, default=str)
