"""Published claims (`claims:`) checked with verdicts: the config refuses a claim that cannot be checked, and the
report's verdicts (report/claims.py) match hand computations on constructed per-example results.

Real in-memory Optuna studies of constructed trials (no training), variants a, b, c searched in space.variant,
all under one seed, so each accuracy comparison is an exact McNemar test whose p-value the tests compute with
math.comb. Each test's docstring names the bug it catches."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from lora_sweep import record
from lora_sweep.config import Claim, ConfigError, Variant, from_mapping
from lora_sweep.config.load import from_stored, to_stored
from lora_sweep.record import TrialRecord
from lora_sweep.report import claims, table
from lora_sweep.report.claims import Verdict
from lora_sweep.report.frame import trials_frame

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
N = 200                   # examples per split
BASE = 100                # the reference run (b) is right on the first BASE examples
LR = "train.learning_rate"
LABELS = {"a": "qv r=4", "b": "query r=8", "c": "qkvo r=2"}
VARIANTS = {k: Variant(label=v, overrides={}) for k, v in LABELS.items()}
DISTS = {"variant": CategoricalDistribution(list(LABELS)), LR: CategoricalDistribution([1e-3, 3e-3, 1e-2])}


def reference() -> np.ndarray:
    out = np.zeros(N, dtype=bool)
    out[:BASE] = True
    return out


def against(b: int, c: int, shift: int = 0) -> np.ndarray:
    """A run that, against reference(), is right on b examples the reference gets wrong and wrong on c it gets
    right (McNemar's b and c), the rest as the reference."""
    out = reference()
    out[BASE + shift: BASE + shift + b] = True
    out[shift: shift + c] = False
    return out


def per_example(correct) -> pd.DataFrame:
    correct = pd.array(np.asarray(correct), dtype="boolean")
    return pd.DataFrame({"example_id": np.arange(len(correct)), "label": "pos",
                         "prediction": ["pos" if c else "neg" for c in correct], "correct": correct,
                         "loss": np.where(np.asarray(correct), 0.1, 2.0)})


def mcnemar_p(b: int, c: int) -> float:
    """The exact two-sided McNemar p-value by hand: 2 P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)


def study_of(runs) -> tuple[optuna.Study, dict, dict]:
    """runs: (variant, eval correctness or None for a failed trial, test correctness or None, lr or None).
    -> the study, each complete trial's eval per-example results and its test ones."""
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("meta", {"eval_size": N, "sampler": "grid", "model": "m", "data": "d"})
    examples, tests = {}, {}
    for variant, ev, te, lr in runs:
        params = {"variant": variant, **({LR: lr} if lr else {})}
        acc = float(np.mean(ev)) if ev is not None else None
        attrs = TrialRecord(label=LABELS[variant] + (f", learning_rate={lr:g}" if lr else ""),
                            config={"variant": variant}, tuned={LR: lr} if lr else {}, trainable_params=1000,
                            total_params=100_000, trainable_pct=1.0, epoch_time_s=1.0, params={"seed": 1},
                            eval_accuracy=acc, test_accuracy=float(np.mean(te)) if te is not None else None,
                            test_n=N if te is not None else None).to_user_attrs()
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: DISTS[k] for k in params}, value=acc, user_attrs=attrs,
            state=TrialState.COMPLETE if ev is not None else TrialState.FAIL))
        if ev is not None:
            examples[len(study.trials) - 1] = per_example(ev)
            if te is not None:
                tests[len(study.trials) - 1] = per_example(te)
    return study, examples, tests


def check(claim: Claim, runs) -> claims.ClaimResult:
    study, examples, tests = study_of(runs)
    (result,) = claims.check([claim], VARIANTS, trials_frame(study), examples, tests)
    return result


def directional(better=("a",), than=("b",)) -> Claim:
    return Claim("table5", "LoRA (Hu et al., 2021), Table 5", "several weight types beat one",
                 better=tuple(better), than=tuple(than))


def within(margin: float, members=("a", "b")) -> Claim:
    return Claim("table6", "LoRA (Hu et al., 2021), Table 6", "a small rank suffices", within=tuple(members),
                 margin=margin)


def text_of(result) -> str:
    return "\n".join(claims.section([result]))


def test_a_directional_verdict_and_its_p_match_a_hand_computation():
    """Bug: the verdict read the wrong sign (a claim that loses called holding), a p-value that is not exact
    McNemar's, or called a comparison the test cannot settle either way instead of 'cannot tell'."""
    runs = [("a", against(30, 10), None, None), ("b", reference(), None, None)]
    r = check(directional(), runs)
    (e,) = r.validation.evidence
    x = e.comparison
    assert (x.b, x.c, x.method) == (30, 10, "McNemar")
    assert x.p == pytest.approx(mcnemar_p(30, 10)) and x.p_adj == pytest.approx(x.p)  # a family of one
    assert x.estimate == pytest.approx(20 / N) and x.low > 0
    assert e.first_value == pytest.approx(120 / N) and e.second_value == pytest.approx(BASE / N)
    assert r.verdict == r.validation.verdict == e.verdict == Verdict.HOLDS
    assert (r.name, r.source, r.statement) == ("table5", "LoRA (Hu et al., 2021), Table 5",
                                               "several weight types beat one")

    swapped = check(directional(better=("b",), than=("a",)), runs)
    assert swapped.verdict == Verdict.DOES_NOT_HOLD
    assert swapped.validation.evidence[0].comparison.p_adj == pytest.approx(mcnemar_p(30, 10))

    close = check(directional(), [("a", against(12, 10), None, None), ("b", reference(), None, None)])
    (e,) = close.validation.evidence
    assert e.comparison.p_adj == pytest.approx(mcnemar_p(12, 10)) and close.verdict == Verdict.CANNOT_TELL
    assert 0 < e.comparison.mde < 1
    text = text_of(close)
    assert f"could have detected {100 * e.comparison.mde:.1f} points" in text
    assert "**Verdict: cannot tell** (validation: cannot tell)" in text


def test_a_metric_to_minimise_reads_lower_as_better():
    """Bug: 'better' read as a larger figure whatever study.metric, so a claim checked on eval_loss came out
    backwards."""
    study, examples, _ = study_of([("a", against(30, 10), None, None), ("b", reference(), None, None)])
    (r,) = claims.check([directional()], VARIANTS, trials_frame(study), examples, {}, "eval_loss", "minimize")
    (e,) = r.validation.evidence
    assert e.comparison.method == "paired bootstrap" and e.comparison.estimate < 0  # a's loss is lower
    assert r.verdict == Verdict.HOLDS and "A − B (per-example loss)" in text_of(r)


def test_holm_runs_over_the_claims_comparisons():
    """Bug: each comparison of a claim judged at its own p (no Holm), so two comparisons each near p=0.04 made a
    claim 'hold' that one family of two cannot support."""
    b1, c1, b2, c2 = 20, 8, 21, 9
    p1, p2 = mcnemar_p(b1, c1), mcnemar_p(b2, c2)
    assert 0.025 < p1 < p2 < 0.05  # each alone beyond noise; not after Holm over two
    runs = [("a", against(b1, c1), None, None), ("c", against(b2, c2, shift=40), None, None),
            ("b", reference(), None, None)]
    r = check(directional(better=("a", "c")), runs)
    ps = [e.comparison.p_adj for e in r.validation.evidence]
    assert ps == pytest.approx([max(2 * p1, p2), max(2 * p1, p2)])  # Holm: 2 * smallest, then monotone
    assert [(e.first.variant, e.second.variant) for e in r.validation.evidence] == [("a", "b"), ("c", "b")]
    assert r.verdict == Verdict.CANNOT_TELL
    alone = check(directional(), runs)  # the same a-vs-b comparison as a family of one
    assert alone.verdict == Verdict.HOLDS


def test_an_equivalence_claim_holds_only_inside_its_margin():
    """Bug: an equivalence read 'not significant' as 'equivalent' whatever the interval's width, or let a pair
    that differs beyond noise pass."""
    near = [("a", against(3, 3), None, None), ("b", reference(), None, None)]  # the same accuracy, 6 disagree
    wide, tiny = check(within(5.0), near), check(within(0.5), near)
    assert wide.verdict == Verdict.HOLDS and tiny.verdict == Verdict.CANNOT_TELL
    (e,) = tiny.validation.evidence
    bound = 100 * max(abs(e.comparison.low), abs(e.comparison.high))
    assert 0.5 < bound < 5.0
    assert f"the widest interval bound is ±{bound:.1f} and they could have detected" in text_of(tiny)
    # inside the margin but a test too weak to see the margin (6 disagreements of 200: it could detect 3.4 points)
    weak = check(within(3.0), near)
    assert 100 * bound <= 300 and 100 * weak.validation.evidence[0].comparison.mde > 3.0
    assert weak.verdict == Verdict.CANNOT_TELL and "but the test could only have detected 3.4 points" in text_of(weak)

    # identical runs: no example tells them apart, so |difference| <= 3/n = 1.5 points (the rule of three)
    same = [("a", reference(), None, None), ("b", reference(), None, None), ("c", reference(), None, None)]
    r = check(within(2.0, ("a", "b", "c")), same)
    assert r.verdict == Verdict.HOLDS and len(r.validation.evidence) == 3  # every pair
    assert check(within(1.0, ("a", "b", "c")), same).verdict == Verdict.CANNOT_TELL

    apart = [("a", against(30, 10), None, None), ("b", reference(), None, None)]
    assert check(within(50.0), apart).verdict == Verdict.DOES_NOT_HOLD  # beyond noise, whatever the margin


def test_the_test_split_repeats_the_verdict_and_a_disagreement_cannot_tell():
    """Bug: the held-out test split ignored (the validation verdict reported as if repeated), or a verdict the
    test split does not repeat reported as holding."""
    agree = check(directional(), [("a", against(30, 10), against(30, 10), None), ("b", reference(), reference(), None)])
    assert agree.verdict == agree.test.verdict == Verdict.HOLDS and agree.unrepeated is None

    r = check(directional(), [("a", against(30, 10), against(12, 10), None), ("b", reference(), reference(), None)])
    assert (r.validation.verdict, r.test.verdict) == (Verdict.HOLDS, Verdict.CANNOT_TELL)
    assert r.verdict == Verdict.CANNOT_TELL
    assert r.test.evidence[0].comparison.p_adj == pytest.approx(mcnemar_p(12, 10))
    text = text_of(r)
    assert "**Verdict: cannot tell** (validation: holds, test: cannot tell; the splits disagree)" in text
    rows = [line for line in text.splitlines() if line.startswith("| validation |") or line.startswith("| test |")]
    assert [row.split(" | ")[8] for row in rows] == ["30 / 10", "12 / 10"]  # b / c on each split

    unrepeated = check(directional(), [("a", against(30, 10), None, None), ("b", reference(), None, None)])
    assert unrepeated.verdict == Verdict.HOLDS and unrepeated.test is None
    assert "Not repeated on held-out data" in text_of(unrepeated)


def test_a_variant_without_a_result_cannot_tell_and_says_which():
    """Bug: a variant that never completed was dropped from the claim (the rest 'holding'), or crashed it."""
    r = check(directional(better=("a", "c")), [("a", against(30, 10), None, None), ("c", None, None, None),
                                               ("b", reference(), None, None)])
    assert r.verdict == Verdict.CANNOT_TELL and dict(r.missing) == {"c": "no complete run"} and r.validation is None
    assert "c has no result to compare (no complete run)" in text_of(r)


def test_each_variant_is_compared_at_its_chosen_learning_rate():
    """Bug: a tuned variant's candidates pooled as if seeds (or its losing candidate compared), so the claim
    read runs the validation choice had set aside."""
    runs = [("a", against(30, 10), None, 1e-3), ("a", against(0, 40), None, 3e-3),
            ("b", reference(), None, 1e-3), ("b", against(0, 60), None, 3e-3)]
    r = check(directional(), runs)
    a, b = r.sides
    assert (a.tuned, a.trials, b.tuned, b.trials) == ({LR: 1e-3}, (0,), {LR: 1e-3}, (2,))
    assert r.validation.evidence[0].comparison.method == "McNemar" and r.verdict == Verdict.HOLDS
    assert "| validation | qv r=4 at learning_rate=0.001 | 60.0 | query r=8 at learning_rate=0.001 | 50.0 | +10.0 |" \
        in text_of(r)


# -- the config ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw_claims(tmp_path_factory):
    """+sweep=claims composed once, as plain data, its paths under a temporary folder."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = OmegaConf.to_container(compose("config", overrides=["+sweep=claims"]), resolve=True)
    tmp = tmp_path_factory.mktemp("claims")
    raw["paths"] = {"sweeps_dir": str(tmp / "sweeps"), "reports_dir": str(tmp / "reports")}
    return raw


def with_claims(raw, claims_block):
    raw = copy.deepcopy(raw)
    if claims_block is None:
        raw.pop("claims", None)
    else:
        raw["claims"] = claims_block
    return raw


def test_the_shipped_claims_load_and_a_sweep_without_claims_has_none(raw_claims):
    config = from_mapping(raw_claims)
    assert [(c.name, c.kind, c.variants) for c in config.claims] == [
        ("table5", "directional", ("qv_r4", "qkvo_r2", "query_r8")),
        ("all_linear", "directional", ("all_linear_budget", "attention_budget")),
        ("table6", "equivalence", ("qv_r4", "qv_r16", "qv_r64"))]
    assert config.claims[2].margin == 2.0 and config.claims[0].pairs == ((0, 2), (1, 2))
    assert from_mapping(with_claims(raw_claims, None)).claims == ()


GOOD = {"source": "s", "statement": "t", "better": ["qv_r4"], "than": ["query_r8"]}


@pytest.mark.parametrize("claim, field", [
    ({**GOOD, "better": ["qv_r3"]}, "claims.x.better"),                             # unknown variant
    ({**GOOD, "within": ["qv_r4", "qv_r16"], "margin": 2}, "claims.x"),             # both shapes
    ({**GOOD, "margin": 2.0}, "claims.x.margin"),                                    # margin on a directional claim
    ({**GOOD, "sources": "s"}, "claims.x.sources"),                                  # unknown key
    ({"source": "s", "statement": "t", "within": ["qv_r4", "qv_r16"]}, "claims.x.margin"),  # margin required
    ({"source": "s", "statement": "t", "within": ["qv_r4"], "margin": 2}, "claims.x.within"),  # one member
    ({"source": "s", "statement": "t", "within": ["qv_r4", "qv_r16"], "margin": -1}, "claims.x.margin"),
    ({**GOOD, "than": ["qv_r4"]}, "claims.x.than"),                                  # a variant on both sides
    ({**GOOD, "statement": " "}, "claims.x.statement"),
    ({**GOOD, "better": []}, "claims.x.better"),
    ({"source": "s", "statement": "t", "better": ["qv_r4"]}, "claims.x"),           # better without than
])
def test_a_claim_that_cannot_be_checked_is_refused_naming_its_field(raw_claims, claim, field):
    """Bug: a claim naming no variant, of both shapes, with a margin it cannot use, or a misspelt key, accepted
    (and a report checking something other than what was written)."""
    with pytest.raises(ConfigError, match=re.escape(field)) as e:
        from_mapping(with_claims(raw_claims, {"x": claim}))
    assert "\n" not in str(e.value)


def test_a_variant_the_space_does_not_search_is_refused(raw_claims):
    """Bug: a claim on a defined variant the sweep never trains passed the config and could never be told."""
    raw = with_claims(raw_claims, {"x": GOOD})
    raw["space"] = {"variant": "choice(qv_r4, qv_r16)"}
    with pytest.raises(ConfigError, match=r"claims\.x\.than.*'query_r8' is not searched in space\.variant"):
        from_mapping(raw)


def test_a_report_states_claims_the_sweep_ran_without(raw_claims):
    """Bug: claims read from the sweep's stored settings only, so `report +sweep=claims` could not check claims
    added after the sweep ran (claims are a reading of stored results, not how the trials were computed)."""
    then = from_mapping(with_claims(raw_claims, None))
    now = from_mapping({**raw_claims, "mode": "report"}, overrides=["claims.table6.margin=2.0"])
    rebuilt, ignored = from_stored(now, to_stored(then))
    assert rebuilt.claims == now.claims and len(rebuilt.claims) == 3 and ignored == []


# -- the report ------------------------------------------------------------------------------------------------

def test_the_report_has_the_section_only_with_claims(raw_claims):
    """Bug: a sweep without claims gained a section (its report no longer what it was), or the claims
    section was missing, or did not read the test results stored beside the study."""
    raw = with_claims(raw_claims, {"table5": {"source": "LoRA", "statement": "a beats b", "better": ["a"],
                                              "than": ["b"]}})
    raw["variants"] = {k: {"label": v, "set": {"lora.r": 4}} for k, v in LABELS.items()}
    raw["space"] = {"variant": "choice(a, b, c)"}
    raw["study"] = {k: v for k, v in raw["study"].items() if k != "tune"}
    with_, without = from_mapping(raw), from_mapping(with_claims(raw, None))
    study, examples, tests = study_of([("a", against(30, 10), against(30, 10), None),
                                       ("b", reference(), reference(), None)])
    for number, frame in tests.items():
        record.write_examples(record.examples_path(with_.study_dir, number, split="test"), frame)
    df = trials_frame(study)
    plain = table.markdown(without, study, df, examples=examples, samples={})
    checked = table.markdown(with_, study, df, examples=examples, samples={})
    assert "## Claims" not in plain and "## Claims" in checked
    section = "\n".join(claims.report_section(with_, df, examples))
    assert section and checked.replace("\n" + section, "", 1) == plain  # the rest of the report untouched
    assert "**Verdict: holds** (validation: holds, test: holds)" in section
    assert "| test | qv r=4 | 60.0 | query r=8 | 50.0 | +10.0 |" in section


def test_a_side_chosen_at_the_edge_of_its_candidates_is_named():
    """Bug: a claim compared a variant whose best rate was the smallest (or largest) of its candidates without
    saying so: its own best may lie beyond them, so the claim may read it below its best."""
    runs = [("a", against(30, 10), None, 1e-3), ("a", against(0, 40), None, 3e-3), ("a", against(0, 50), None, 1e-2),
            ("b", against(0, 60), None, 1e-3), ("b", reference(), None, 3e-3), ("b", against(0, 60), None, 1e-2)]
    r = check(directional(), runs)
    a, b = r.sides
    assert (a.tuned, a.edge, b.tuned, b.edge) == ({LR: 1e-3}, ("learning_rate=0.001, the smallest of 3",), {LR: 3e-3}, ())
    assert ("- qv r=4 at learning_rate=0.001: at the edge of its candidates (learning_rate=0.001, the smallest of 3)"
            in text_of(r)) and "query r=8 at learning_rate=0.003: at the edge" not in text_of(r)
