"""Verdicts on every sweep shape, on constructed per-example results: configurations keyed by their
searched values (never the label text), seeds paired by value, the statistic the metric ranks by,
scored examples only, Holm read by the recommendation as by the findings, and the two-level bootstrap
drawing one set of examples for both sides. Each test's docstring names the bug it catches."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import pytest

import lora_sweep.report.compare as compare
import lora_sweep.report.stats as stats
from lora_sweep import record
from lora_sweep.report import findings
from lora_sweep.report.frame import load_examples, trials_frame
from test_trial_tiny import assets  # noqa: F401  (the tiny model and csv fixture)


def frame(correct, ids=None, loss=None, label="pos"):
    correct = pd.array(correct, dtype="boolean")
    ids = np.arange(len(correct)) if ids is None else np.asarray(ids)
    loss = np.where(np.asarray(correct.fillna(False)), 0.1, 2.0) if loss is None else np.asarray(loss, float)
    prediction = [None if pd.isna(c) else (label if c else "neg") for c in correct]
    return pd.DataFrame({"example_id": ids, "label": label, "prediction": prediction, "correct": correct,
                         "loss": loss})


def right_on(n, k, shift=0):
    """n examples, the k from `shift` on right (wrapping): runs that agree on most examples."""
    out = np.zeros(n, dtype=bool)
    out[(np.arange(k) + shift) % n] = True
    return out


def _study(rows, dists):
    """An in-memory study of complete trials: rows of (params, user_attrs)."""
    study = optuna.create_study(direction="maximize")
    for params, attrs in rows:
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=attrs["eval_accuracy"], user_attrs=attrs))
    return study


def test_two_settings_plus_seeds_compare_configurations_not_labels():
    """Bug: findings grouped configurations by their label text, which names the seed, so with two knobs
    plus train.seed every run was its own 'configuration', comparisons paired runs of different seeds on no
    shared example ('nan points ... 0 paired examples', p=1.00) and the cheapest (r=4 at 70%) was
    recommended over r=16 at 90%."""
    dists = {"lora.r": optuna.distributions.CategoricalDistribution([4, 16]),
             "lora.lora_dropout": optuna.distributions.CategoricalDistribution([0.0, 0.1]),
             "train.seed": optuna.distributions.CategoricalDistribution([1, 2])}
    n, rows, examples = 200, [], {}
    for r in (4, 16):
        for dropout in (0.0, 0.1):
            for seed in (1, 2):
                k = 140 if r == 4 else 180
                number = len(rows)
                examples[number] = frame(right_on(n, k, shift=seed))
                rows.append(({"lora.r": r, "lora.lora_dropout": dropout, "train.seed": seed},
                             {"label": f"r={r}, lora_dropout={dropout}, seed={seed}", "eval_accuracy": k / n,
                              "trainable_params": 1000 * r, "trainable_pct": 0.1 * r, "epoch_time_s": 1.0,
                              "params": {"seed": seed}}))
    df = trials_frame(_study(rows, dists))
    v = findings.verdict_of(df, examples)
    assert len(v.levels) == 4 and all(x.runs == 2 for x in v.levels)     # seeds pooled per configuration
    assert {x.name for x in v.levels} == {f"r={r}, lora_dropout={d}" for r in (4, 16) for d in (0.0, 0.1)}
    assert {r.method for r in v.results} == {"two-level bootstrap"} and all(r.n == n for r in v.results)
    assert v.pick.name.startswith("r=16")                              # never the cheap, worse r=4
    text = " ".join(findings.sweep_findings(df, None, examples=examples))
    assert "nan" not in text and "0 paired" not in text and "r=16, lora_dropout" in text


def test_a_comparison_with_no_shared_examples_is_an_error():
    """Bug: a comparison whose sides share no scored example returned p=1.0 (a tie) instead of failing."""
    a = compare.Runs((1,), (frame([True] * 10, ids=range(10)),))
    b = compare.Runs((1,), (frame([False] * 10, ids=range(10, 20)),))
    with pytest.raises(compare.NoSharedExamples):
        compare.family("eval_accuracy", [a, b], [(0, 1)])
    unscored = compare.Runs((1,), (frame([None] * 10, ids=range(10)),))   # nothing generated: nothing scored
    with pytest.raises(compare.NoSharedExamples):
        compare.family("eval_accuracy", [a, unscored], [(0, 1)])


def test_seeds_pair_by_their_value_not_by_run_order():
    """Bug: runs were paired by their position among a configuration's runs, so one run under seed 1 and
    one under seed 2 were McNemar-paired as if they were the same seed."""
    same, other = frame(right_on(100, 90)), frame(right_on(100, 80))
    by_seed = compare.family("eval_accuracy", [compare.Runs((1,), (same,)), compare.Runs((2,), (other,))], [(0, 1)])
    assert by_seed[0].method == "two-level bootstrap"
    paired = compare.family("eval_accuracy", [compare.Runs((1,), (same,)), compare.Runs((1,), (other,))], [(0, 1)])
    assert paired[0].method == "McNemar" and (paired[0].b, paired[0].c) == (10, 0)
    # through the frame: the seed each trial recorded, whatever its trial order
    dists = {"lora.r": optuna.distributions.CategoricalDistribution([4, 16])}
    rows = [({"lora.r": 16}, {"label": "r=16", "eval_accuracy": 0.9, "trainable_params": 16, "trainable_pct": 1.6,
                              "params": {"seed": 7}}),
            ({"lora.r": 4}, {"label": "r=4", "eval_accuracy": 0.8, "trainable_params": 4, "trainable_pct": 0.4,
                             "params": {"seed": 8}})]
    v = findings.verdict_of(trials_frame(_study(rows, dists)), {0: same, 1: other})
    assert v.results[0].method == "two-level bootstrap" and v.results[0].seeds == ((7,), (8,))


def test_the_recommendation_reads_the_holm_adjusted_p_the_findings_print():
    """Bug: the recommendation's pick used unadjusted p-values while the findings used Holm's, so the two
    could disagree: here each cheaper configuration loses by b=6, c=0 (p=0.031 alone, 0.062 after Holm)."""
    dists = {"lora.target_modules": optuna.distributions.CategoricalDistribution(["qkvo", "query", "value"])}
    rows = [({"lora.target_modules": m}, {"label": f"target_modules={m}", "eval_accuracy": acc,
                                          "trainable_params": p, "trainable_pct": p / 1e4})
            for m, acc, p in (("qkvo", 0.90, 4000), ("query", 0.84, 1000), ("value", 0.84, 1000))]
    best, other = np.arange(100) < 90, np.arange(100) < 84
    examples = {0: frame(best), 1: frame(other), 2: frame(other)}
    df = trials_frame(_study(rows, dists))
    v = findings.verdict_of(df, examples)
    assert [r.p for r in v.results] == pytest.approx([0.03125, 0.03125])
    assert [r.p_adj for r in v.results] == pytest.approx([0.0625, 0.0625])
    assert v.pick.name == "target_modules=query"                      # tied after Holm: the cheapest
    text = " ".join(findings.sweep_findings(df, None, examples=examples))
    assert "Not distinguishable from it" in text and "the cheapest of these is target_modules=query" in text
    assert "could detect about" in text                               # what the test could have seen


def test_the_two_level_bootstrap_draws_one_set_of_examples_for_both_sides():
    """Bug: drawing the examples independently for the two sides lost the pairing: a 4-point gap over 3
    seeds that the same examples carry went from p=0.0005 to p=0.12."""
    n = 500
    first = [(right_on(n, 420, shift=s).astype(float),) for s in (0, 1, 2)]
    second = [(right_on(n, 400, shift=s).astype(float),) for s in (0, 1, 2)]
    d = stats.two_level_bootstrap(stats.mean, first, second, resamples=4000)
    assert d.estimate == pytest.approx(0.04)
    assert d.p < 0.002                                                 # unpaired draws: p about 0.1


def _confirmed(make_config, tmp_path, metric, runs, tests=None):
    """A search study of two configurations, each confirmed under 3 seeds (companion study), their
    per-example results on disk; runs: r -> (trainable params, [frame per seed 1, 2, 3])."""
    config = make_config({"lora": {"r": "choice(4, 16)"}},
                         study={"name": "v", "metric": metric, "confirm": {"top_k": 2, "seeds": 3}})
    storage = optuna.storages.InMemoryStorage()
    direction = "maximize" if metric in ("eval_accuracy", "eval_exact_match") else "minimize"
    search = optuna.create_study(study_name="v", storage=storage, direction=direction)
    stage = optuna.create_study(study_name="v.confirm", storage=storage, direction=direction)
    dist = {"lora.r": optuna.distributions.CategoricalDistribution([4, 16]),
            "train.seed": optuna.distributions.CategoricalDistribution([42, 1, 2])}
    for r, (params, frames) in runs.items():
        def attrs(f):
            scored = f["correct"].dropna()
            return {"label": f"r={r}", "eval_accuracy": float(scored.mean()), "eval_loss": float(f["loss"].mean()),
                    "trainable_params": params, "epoch_time_s": 1.0}
        own = attrs(frames[0])
        search.add_trial(optuna.trial.create_trial(params={"lora.r": r}, distributions={"lora.r": dist["lora.r"]},
                                                   value=own[metric], user_attrs={**own, "params": {"seed": 42}}))
        record.write_examples(record.examples_path(config.study_dir, search.trials[-1].number), frames[0])
        if tests:
            record.write_examples(record.examples_path(config.study_dir, search.trials[-1].number, split="test"),
                                  tests[r][0])
        for seed, f, k in zip((1, 2), frames[1:], (1, 2)):
            a = attrs(f)
            stage.add_trial(optuna.trial.create_trial(
                params={"lora.r": r, "train.seed": seed}, distributions=dist, value=a[metric],
                user_attrs={**a, "stage": "confirm", "confirms": search.trials[-1].number}))
            record.write_examples(record.examples_path(config.study_dir, stage.trials[-1].number, "confirm"), f)
            if tests:
                record.write_examples(record.examples_path(config.study_dir, stage.trials[-1].number, "confirm",
                                                           split="test"), tests[r][k])
    return config, search


def test_confirmation_counts_only_the_examples_a_language_model_generated(make_config, tmp_path):
    """Bug: examples beyond data.generate_size (never generated, correct=null) entered the two-level
    bootstrap as NaN; its p became 2/(B+1), nothing was beaten, and the cheaper configuration at 50% was
    recommended over the one at 90%."""
    from lora_sweep.report.confirm import verdict

    def lm(k, shift):  # 100 eval examples, the first 40 generated
        c = [None] * 100
        for i in range(40):
            c[i] = bool(right_on(40, k, shift)[i])
        return frame(c)

    config, search = _confirmed(make_config, tmp_path, "eval_accuracy", {
        16: (16000, [lm(36, s) for s in range(3)]), 4: (4000, [lm(20, s) for s in range(3)])})
    v = verdict(config, search)
    assert v.complete and v.n_examples == 40
    assert v.best.label == "r=16" and v.winner is v.best and v.recommended.label == "r=16"
    assert v.comparisons[0].diff.estimate == pytest.approx(0.4)


def test_confirmation_of_a_loss_sweep_tests_the_loss(make_config, tmp_path):
    """Bug: with study.metric=eval_loss the verdict ranked by loss but bootstrapped correctness, so two
    configurations equally often right but far apart in loss were 'tied' and the cheaper, worse one won."""
    from lora_sweep.report.confirm import verdict

    rng = np.random.default_rng(0)
    correct = right_on(200, 160)

    def run(level):
        return frame(correct, loss=level + 0.05 * rng.standard_normal(200))

    config, search = _confirmed(make_config, tmp_path, "eval_loss", {
        16: (16000, [run(0.30) for _ in range(3)]), 4: (4000, [run(0.60) for _ in range(3)])})
    v = verdict(config, search)
    assert v.best.label == "r=16" and v.winner is v.best and v.recommended.label == "r=16"
    assert v.comparisons[0].diff.estimate == pytest.approx(-0.30, abs=0.02)


def test_chrf_from_summed_sentence_statistics_is_the_corpus_score():
    """The chrF test's statistic: summing sacrebleu's per-sentence statistics gives its corpus chrF."""
    import sacrebleu

    hyps, refs = ["the cat sat", "a dog", "hello there"], ["the cat sat down", "one dog", "hello there"]
    per = compare.chrf_statistics(hyps, refs)
    assert compare.chrf_of_sums(per) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    f = pd.DataFrame({"example_id": range(3), "label": refs, "prediction": hyps, "correct": [False, False, True],
                      "loss": [1.0, 1.0, 0.1]})
    assert compare.value("eval_chrf", compare.Runs((1,), (f,))) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)


def test_intervals_and_the_noise_band_count_the_scored_examples(make_config):
    """Bug: the MLflow view's interval and the fallback noise band used data.eval_size, where a language
    model's accuracy counts only the examples it generated answers for (data.generate_size)."""
    from lora_sweep.report import mlflow_view
    from lora_sweep.report.frame import load_examples, with_intervals

    config = make_config({"lora": {"r": "choice(4)"}}, study={"name": "n"})
    study = optuna.create_study(direction="maximize")
    record.set_meta(study, {"task_type": "CAUSAL_LM", "eval_size": 100})
    study.add_trial(optuna.trial.create_trial(
        params={"lora.r": 4}, distributions={"lora.r": optuna.distributions.CategoricalDistribution([4])},
        value=0.75, user_attrs={"label": "r=4", "eval_accuracy": 0.75, "trainable_params": 4, "trainable_pct": 0.1}))
    record.write_examples(record.examples_path(config.study_dir, 0), frame([True] * 30 + [False] * 10 + [None] * 60))
    figures = mlflow_view.recommended_figures(config, study)
    assert (figures["recommended/eval_accuracy_ci_low"], figures["recommended/eval_accuracy_ci_high"]) == \
        pytest.approx(stats.wilson(30, 40))
    df = trials_frame(study)
    df = with_intervals(df, load_examples(config.study_dir, df))
    assert int(df["eval_n"].iloc[0]) == 40
    nz = findings.noise(findings.complete(df), 100)
    assert nz.sd == pytest.approx(100 * (0.75 * 0.25 / 40) ** 0.5)


def _search_with_test(config, scramble: bool):
    """Three ranks, one seed, validation and test per-example results on disk; scramble: the test
    results (files and test_* figures) turned upside down."""
    rng = np.random.default_rng(1)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    dist = {"lora.r": optuna.distributions.CategoricalDistribution([4, 8, 16])}
    for number, (r, k) in enumerate(((4, 160), (8, 170), (16, 185))):
        val = frame(right_on(200, k, shift=r))
        test = frame(right_on(150, k * 3 // 4, shift=r), ids=np.arange(1000, 1150))
        if scramble:
            test = test.assign(correct=rng.permutation(~test["correct"].astype(bool).to_numpy()),
                               loss=rng.random(150) * 5)
        attrs = {"label": f"r={r}", "eval_accuracy": k / 200, "trainable_params": 1000 * r, "trainable_pct": r / 10,
                 "epoch_time_s": 1.0, "params": {"seed": 42}, "test_accuracy": float(test["correct"].mean()),
                 "test_n": 150}
        study.add_trial(optuna.trial.create_trial(params={"lora.r": r}, distributions=dist, value=k / 200,
                                                  user_attrs=attrs, intermediate_values={1: k / 200 - 0.05}))
        record.write_examples(record.examples_path(config.study_dir, number), val)
        record.write_examples(record.examples_path(config.study_dir, number, split="test"), test)
    return study


def test_scrambled_test_results_change_no_choice(make_config, tmp_path):
    """Nothing that chooses reads the test split: with its stored results scrambled, the sampled parameters,
    the pruning decision, the confirmation queue and the recommendation stay the same (only the report's
    held-out section, which reads them, changes)."""
    from lora_sweep.report.recommend import recommend, search_verdict
    from lora_sweep.report.table import held_out
    from lora_sweep.search import confirm

    seen = []
    for scramble in (False, True):
        config = make_config({"lora": {"r": "choice(4, 8, 16)"}},
                             study={"name": "scramble", "confirm": {"top_k": 2, "seeds": 3}})
        study = _search_with_test(config, scramble)
        asked = study.ask({"lora.r": optuna.distributions.CategoricalDistribution([4, 8, 16])})
        running = optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, intermediate_values={1: 0.78})
        pruned = study.pruner.prune(study, running)
        stage = optuna.create_study(direction="maximize")
        queued = confirm.plan(config, study, stage, also=(recommend(config, study, confirmed=False).trial.number,))
        queue = sorted((t.user_attrs["confirms"], t.system_attrs["fixed_params"]["train.seed"]) for t in stage.get_trials())
        rep = held_out(config, trials_frame(study), search_verdict(config, study))
        seen.append(((asked.params, pruned, queued, queue, recommend(config, study).trial.number),
                     (rep.pick_test, rep.results[0].estimate)))
    (kept, report), (kept_scrambled, report_scrambled) = seen
    assert kept == kept_scrambled
    assert report != report_scrambled                                  # the test split was read, where it may be


def test_the_confirmation_is_repeated_on_the_test_split(make_config, tmp_path):
    """The confirmation's verdict (on validation) repeated on test, with the recommended configuration's
    selection optimism: validation minus test, over its seeds."""
    from lora_sweep.report.confirm import test_lines, test_summary, verdict

    val = {16: (16000, [frame(right_on(100, 90, s)) for s in range(3)]),
           4: (4000, [frame(right_on(100, 70, s)) for s in range(3)])}
    test = {16: [frame(right_on(80, 64, s), ids=range(500, 580)) for s in range(3)],
            4: [frame(right_on(80, 56, s), ids=range(500, 580)) for s in range(3)]}
    config, search = _confirmed(make_config, tmp_path, "eval_accuracy", val, test)
    v = verdict(config, search)
    text = "\n".join(test_lines(v))
    assert v.recommended.label == "r=16" and "held-out test split (80 examples" in text
    assert "(validation minus test): +10.0 points" in text                # 90% on validation, 80% on test
    assert "| r=4 | +20.0 points (p <0.001, beyond noise) | +10.0 points (p " in text
    assert test_summary(v).startswith("Held-out test (80 examples nothing chose on): r=16 over its 3 seeds scores "
                                      "80.0% (validation 90.0%); selection optimism +10.0 points")


@pytest.mark.usefixtures("one_thread", "fresh_caches")
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_a_tiny_sweep_over_two_settings_and_two_seeds_recommends_a_configuration_that_learns(raw_config, assets):  # noqa: F811
    """End to end on a tiny BERT: lora.r x train.learning_rate x train.seed (8 trials) with a held-out test
    split; lr 1e-6 cannot learn in two epochs. Bug: with two settings plus seeds the configurations were told
    apart by label text (so by seed), nothing was paired, and the cheapest was recommended whatever it learned."""
    import copy

    from lora_sweep.config import from_mapping
    from lora_sweep.report.recommend import recommend
    from lora_sweep.run.sweep import run_sweep

    model_dir, csv_path = assets
    raw = copy.deepcopy(raw_config)
    raw["model"]["name_or_path"] = str(model_dir)
    raw["data"].update(name_or_path=str(csv_path), encoding=None, label_column="label", labels=None,
                       train_size=60, eval_size=30, test_size=30, max_length=16)
    raw["train"].update({"num_train_epochs": 2, "device": "cpu", "per_device_train_batch_size": 8,
                         "save_adapter": False})
    raw["lora"].update(r=4, lora_alpha=8)
    raw["study"].update(name="shape", sampler="grid")
    raw["space"] = {"lora": {"r": "choice(2, 4)"}, "train": {"learning_rate": "choice(0.05, 1e-6)",
                                                             "seed": "choice(1, 2)"}}
    config = from_mapping(raw)
    study = run_sweep(config)
    assert len(study.trials) == 8 and all(t.state.name == "COMPLETE" for t in study.trials)
    chosen = recommend(config, study).trial
    assert chosen.params["train.learning_rate"] == 0.05
    df = trials_frame(study)
    v = findings.verdict_of(df, load_examples(config.study_dir, df))
    assert len(v.levels) == 4 and all(x.runs == 2 for x in v.levels)
    assert all(r.method == "two-level bootstrap" and r.n == 30 for r in v.results)
    report = (config.report_dir / "report.md").read_text()
    assert "## Held-out test split" in report and "selection optimism" in report and "Test (%)" in report
    assert all(record.examples_path(config.study_dir, t.number, split="test").exists() for t in study.trials)
    assert "One seed only" not in report                              # the pick rests on 2 seeds, and says so


def test_the_model_card_counts_the_examples_the_accuracy_counts(make_config):
    """Bug: the exported model card's k/n and Wilson interval used the whole eval split (data.eval_size) where
    a language model's accuracy counts only the examples it generated answers for."""
    from lora_sweep.record import TrialRecord
    from lora_sweep.report.card import render
    from lora_sweep.report.export import _scored

    config = make_config({"lora": {"r": "choice(4)"}}, study={"name": "card"})
    record.write_examples(record.examples_path(config.study_dir, 0), frame([True] * 30 + [False] * 10 + [None] * 60))
    trial = optuna.trial.create_trial(params={}, distributions={}, value=0.75)
    trial.number = 0
    n = _scored(config, trial, config.base, 100)
    assert n == 40
    rec = TrialRecord(label="r=4", eval_accuracy=0.75, test_accuracy=0.5, test_n=20)
    import dataclasses

    data = dataclasses.asdict(dataclasses.replace(config.base.data, eval_size=100))
    card = render({"base": "b", "task_type": "CAUSAL_LM", "labels": [], "sweep": "card", "trial": 0, "data": data,
                   "auto_class": "AutoModelForCausalLM", "dest": "out", "gguf_file": None},
                  rec, {}, {}, n, "chosen")
    low, high = stats.wilson(30, 40)
    assert f"75.0% (30/40); 95% Wilson interval {100 * low:.1f}–{100 * high:.1f}%" in card
    assert "held-out test accuracy | 50.0% (10/20)" in card
    assert "100 eval examples (40 of them generated and scored)" in card


def test_configurations_no_example_tells_apart_get_no_detectable_difference():
    """Bug: two configurations right and wrong on the very same examples (b = c = 0) have a bootstrap spread
    of 0, and the finding said 'it could detect about 0.0 points', as if any difference would have shown."""
    from lora_sweep.report import paired

    same = frame(right_on(50, 30))
    r = compare.family("eval_accuracy", [compare.Runs((1,), (same,)), compare.Runs((1,), (same.copy(),))], [(0, 1)])[0]
    assert (r.b, r.c, r.p) == (0, 0, 1.0) and np.isnan(r.mde)
    a, b = (findings.Level(n, 60.0, 1.0, 1.0, 1, (i,)) for i, n in enumerate(("a", "b")))
    text = paired.sentence(a, b, r)
    assert "no example tells them apart" in text and "0.0 points at 80% power" not in text
