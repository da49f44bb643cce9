"""Per-example results and the paired statistics: hand-computed values, a tiny sweep's files, findings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

from lora_sweep import record
from lora_sweep.report import findings, stats


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_pairs():
    first = np.array([1] * 10 + [0] * 2 + [1] * 30 + [0] * 8, dtype=bool)   # b=10, c=2, 30 both right, 8 both wrong
    second = np.array([0] * 10 + [1] * 2 + [1] * 30 + [0] * 8, dtype=bool)
    t = stats.mcnemar(first, second)
    assert (t.b, t.c, t.n) == (10, 2, 50)
    assert t.p == pytest.approx(2 * binom.cdf(2, 12, 0.5))   # 0.03857...
    assert stats.mcnemar(first, first).p == 1.0


def test_wilson_interval_of_87_of_100():
    # (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.959964, by hand:
    z, n, p = 1.959963985, 100, 0.87
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = stats.wilson(87, 100)
    assert (low, high) == pytest.approx(((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)))
    assert (round(low, 4), round(high, 4)) == (0.7902, 0.9224)


def test_holm_adjusts_step_down_and_keeps_the_order():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_paired_bootstrap_interval_holds_the_paired_difference():
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.8
    b = a.copy()
    b[np.flatnonzero(a)[:24]] = False                        # b loses 24 examples a gets right: a - b = 6 points
    d = stats.paired_bootstrap(stats.mean, (a,), (b,))
    assert d.estimate == pytest.approx(0.06) and d.low < 0.06 < d.high
    assert d.low > 0.03 and d.high < 0.09                    # paired: far narrower than the unpaired ±5.5 points
    gold = np.array(list("xy") * 200)
    f1 = stats.macro_f1(gold, gold)
    assert f1 == pytest.approx(1.0)


def frame(correct, ids=None, label="pos"):
    correct = np.asarray(correct, dtype=bool)
    ids = np.arange(len(correct)) if ids is None else ids
    return pd.DataFrame({"example_id": ids, "label": label, "prediction": np.where(correct, label, "neg"),
                         "correct": correct, "loss": np.where(correct, 0.1, 2.0)})


def done_frame(rows):
    return pd.DataFrame([{"trial": t, "label": f"r={r}", "status": "complete", "eval_accuracy": acc,
                          "trainable_pct": 0.1 * r, "trainable_params": 1000 * r, "param.lora.r": r,
                          "lora_scale": scale, "epoch_time_s": 1.0, "peak_memory_mb": 10.0}
                         for t, r, acc, scale in rows])


def test_findings_sentence_from_paired_examples(tmp_path):
    n = 500
    base = np.zeros(n, dtype=bool)
    base[:400] = True                                         # r=4: 80.0%
    r8 = base.copy()
    r8[400:402] = True                                        # r=8: +2 examples (not supported)
    r16 = r8.copy()
    r16[402:430] = True                                       # r=16: +28 over r=8, b=28, c=0
    examples = {0: frame(base), 1: frame(r8), 2: frame(r16)}
    # the files round-trip with their ids
    for t, f in examples.items():
        record.write_examples(record.examples_path(tmp_path, t), f.sample(frac=1, random_state=t))
    back = {t: record.read_examples(record.examples_path(tmp_path, t)) for t in examples}
    assert all(list(b.columns) == list(record.EXAMPLE_COLUMNS) for b in back.values())
    assert back[2]["correct"].sum() == 430 and back[0]["example_id"].tolist() == list(range(n))
    df = done_frame([(0, 4, 0.800, 2.0), (1, 8, 0.804, 2.0), (2, 16, 0.860, 2.0)])
    lines = findings.sweep_findings(df, 500, examples=back)
    text = " ".join(lines)
    # 3 comparisons: r=16 vs r=4, r=16 vs r=8 (best), r=8 vs r=4 (step); Holm over exactly these
    p_16_8 = 2 * binom.cdf(0, 28, 0.5)
    p_16_4 = 2 * binom.cdf(0, 30, 0.5)
    p_8_4 = 1.0 * min(1, 2 * binom.cdf(0, 2, 0.5))
    adj = stats.holm([p_16_4, p_16_8, p_8_4])
    assert "r=16 beat r=8 by 5.6 points" in text and "McNemar p<0.001, Holm-adjusted; 500 paired examples" in text
    assert f"not supported: r=8 vs r=4, 0.4 points" in text and f"McNemar p={adj[2]:.2f}, Holm-adjusted" in text
    assert "Effective scale" not in text                      # alpha tied to 2r: the scale is 2 throughout
    assert "Paired tests" not in text and lines[-1].startswith("Statistics: 3 paired comparison(s)")
    # A different effective scale is called out.
    warned = findings.sweep_findings(done_frame([(0, 4, 0.800, 4.0), (1, 8, 0.804, 2.0), (2, 16, 0.860, 1.0)]),
                                     500, examples=back)
    assert any("r=4 (scale 4) vs r=16 (scale 1): a 4× larger step" in x for x in warned)
    # Without examples: today's findings, and a line saying why.
    old = findings.sweep_findings(df, 500)
    assert any(x.startswith("Paired tests") for x in old) and old[-1].startswith("Noise band")


def test_holm_decides_when_each_comparison_alone_would_pass():
    # A categorical sweep (each level against the best only): two comparisons, each b=6, c=0, so
    # McNemar p = 2 * 0.5**6 = 0.031 alone, but 0.062 after Holm over the two: not supported.
    n = 100
    best, other = np.arange(n) < 90, np.arange(n) < 84
    examples = {0: frame(best), 1: frame(other), 2: frame(other)}
    df = pd.DataFrame([{"trial": t, "label": f"target_modules={m}", "status": "complete", "eval_accuracy": acc,
                        "trainable_pct": 0.1, "trainable_params": 1000, "param.lora.target_modules": m,
                        "lora_scale": 2.0, "epoch_time_s": 1.0, "peak_memory_mb": 10.0}
                       for t, m, acc in ((0, "qkvo", 0.90), (1, "query", 0.84), (2, "value", 0.84))])
    text = " ".join(findings.sweep_findings(df, n, examples=examples))
    assert stats.mcnemar(best, other).p == pytest.approx(0.03125)
    assert text.count("not supported: target_modules=qkvo vs") == 2 and " beat " not in text
    assert text.count("McNemar p=0.06, Holm-adjusted; 100 paired examples") == 2
    assert "Statistics: 2 paired comparison(s)" in text and "adjacent steps" not in text
    # intervals at Holm's step-down levels: the first of two at 97.5%, the second at 95%
    assert text.count("points (97.5% CI") == 1 and text.count("points (95% CI") == 1
