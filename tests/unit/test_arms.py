"""study.tune in the report: each configuration (arm) is compared at its own best candidate on validation.

Real in-memory Optuna studies of constructed trials (no training): arms r=4 and r=8, candidates
train.learning_rate in (3e-4, 1e-3, 3e-3), under seeds 1 and 2, some candidates stopped at a rung as a race
stops them. Each test's docstring names the bug it catches."""

from __future__ import annotations

import json
import re

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from lora_sweep.record import TrialRecord
from lora_sweep.report import arms, findings, heldout
from lora_sweep.report.frame import trials_frame

LR = "train.learning_rate"
CANDIDATES = (3e-4, 1e-3, 3e-3)
DISTS = {"lora.r": CategoricalDistribution([4, 8]), LR: CategoricalDistribution(list(CANDIDATES)),
         "train.seed": CategoricalDistribution([1, 2])}
N = 200  # eval examples per run


def right_on(k: int, shift: int = 0) -> np.ndarray:
    out = np.zeros(N, dtype=bool)
    out[(np.arange(k) + shift) % N] = True
    return out


def per_example(correct) -> pd.DataFrame:
    correct = pd.array(correct, dtype="boolean")
    return pd.DataFrame({"example_id": np.arange(len(correct)), "label": "pos",
                         "prediction": ["pos" if c else "neg" for c in correct], "correct": correct,
                         "loss": np.where(np.asarray(correct), 0.1, 2.0)})


def add(study, r, lr, seed, acc=None, test=None, rung=None, at_rung=None, run_id=""):
    """One trial of arm r, candidate lr, under seed: complete with eval accuracy `acc` (and test accuracy
    `test`), or (acc None) stopped at `rung` with `at_rung` there, as the race stores it."""
    label = f"r={r}, seed={seed}, learning_rate={lr:g}"  # the space's order, study.tune's paths last
    attrs = TrialRecord(label=label, config={"lora.r": r}, tuned={LR: lr}, trainable_params=1000 * r,
                        total_params=100_000, trainable_pct=r, epoch_time_s=1.0, params={"seed": seed},
                        eval_accuracy=acc, test_accuracy=test, test_n=N if test is not None else None,
                        rung_cap=rung if acc is None else None, mlflow_run_id=run_id,
                        pruned_at_step=rung if acc is None else None, pruned_at_unit="epoch" if acc is None else None,
                        pruned_at_epoch=rung if acc is None else None).to_user_attrs()
    params = {"lora.r": r, "train.seed": seed, LR: lr}
    steps = {1: at_rung if acc is None else (acc - 0.1 if at_rung is None else at_rung)}
    if acc is not None:
        steps[2] = acc
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions={k: DISTS[k] for k in params}, value=acc, user_attrs=attrs,
        intermediate_values=steps, state=TrialState.COMPLETE if acc is not None else TrialState.PRUNED))
    return len(study.trials) - 1


# (r, lr) -> eval accuracy under seeds 1 and 2 (None: stopped at rung 1 with that rung value), test accuracy.
# r=4's 3e-3 has the best single run (0.80) but not the best mean: its mean is 0.65, 1e-3's 0.69.
# r=8's 3e-4 stopped at the rung. The test split favours each arm's losing candidate.
TABLE = {
    (4, 3e-4): ((0.60, 0.62), 0.90),
    (4, 1e-3): ((0.70, 0.68), 0.50),
    (4, 3e-3): ((0.50, 0.80), 0.95),
    (8, 3e-4): ((None, None), 0.99),
    (8, 1e-3): ((0.72, 0.74), 0.97),
    (8, 3e-3): ((0.78, 0.76), 0.40),
}
CHOSEN = {"r=4": 1e-3, "r=8": 3e-3}


def tuned_study(test_favours_losers: bool = True) -> tuple[optuna.Study, dict, dict]:
    """The study, each trial's eval per-example results and its test ones."""
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("meta", {"eval_size": N, "sampler": "grid", "model": "m", "data": "d"})
    examples, tests = {}, {}
    for (r, lr), (accs, test) in TABLE.items():
        for seed, acc in zip((1, 2), accs):
            t = test if test_favours_losers else (0.5 if CHOSEN[f"r={r}"] != lr else 0.9)
            n = add(study, r, lr, seed, acc, t if acc is not None else None, rung=1 if acc is None else None,
                    at_rung=0.40 if acc is None else None, run_id=f"run-{r}-{lr:g}-{seed}")
            if acc is not None:
                examples[n] = per_example(right_on(round(acc * N), shift=seed))
                tests[n] = per_example(right_on(round(t * N), shift=seed))
    return study, examples, tests


def chosen_numbers(study) -> set[int]:
    return {t.number for t in study.trials if t.state == TrialState.COMPLETE
            and CHOSEN[f"r={t.params['lora.r']}"] == t.params[LR]}


def test_each_arm_is_represented_by_its_best_candidate_on_validation():
    """Bug: an arm shown at its best single run (r=4 at lr 3e-3's lucky 0.80) or at any candidate, not the
    candidate with the best mean over seeds; candidates tried miscounted without the stopped ones."""
    study, _, _ = tuned_study()
    df = trials_frame(study)
    done = df[df["status"] == "complete"]
    kept, choices = arms.choose(done, "eval_accuracy", "maximize", df)
    assert [c.arm for c in choices] == ["r=4", "r=8"]
    assert {c.arm: c.chosen for c in choices} == {arm: {LR: lr} for arm, lr in CHOSEN.items()}
    assert [(c.tried, c.completed) for c in choices] == [(3, 3), (3, 2)]
    r4 = choices[0]
    assert r4.values[json.dumps({LR: 1e-3})] == pytest.approx(0.69)
    assert r4.values[json.dumps({LR: 3e-3})] == pytest.approx(0.65)
    assert set(kept["trial"]) == chosen_numbers(study) == {t for c in choices for t in c.trials}
    assert kept["seed"].tolist().count(1) == kept["seed"].tolist().count(2) == 2  # both seeds of each choice

    # the noise band pools the seeds of one candidate, never two candidates of an arm (points, 5 pairs)
    pairs = [accs for accs, _ in TABLE.values() if accs[0] is not None]
    assert findings.noise(done, N).sd == pytest.approx(np.sqrt(sum(100 ** 2 * (a - b) ** 2 / 2 for a, b in pairs) / 5))

    # a metric to minimise chooses the lowest mean: eval_loss = 1 - accuracy
    _, picked = arms.choose(done.assign(eval_loss=1 - done["eval_accuracy"]), "eval_loss", "minimize", df)
    assert [c.chosen for c in picked] == [c.chosen for c in choices]

    # an untuned study passes through unchanged
    plain = done.assign(tuned="{}")
    same, none = arms.choose(plain, "eval_accuracy", "maximize")
    assert none == [] and same is plain


def test_the_test_split_cannot_change_the_choice():
    """Bug: the choice read the held-out test split (test_accuracy, or the test per-example results), which
    favours each arm's losing candidate here; the verdict's test repeat then compared other trials than the
    validation verdict did."""
    study, examples, tests = tuned_study(test_favours_losers=True)
    df = trials_frame(study)
    done = df[df["status"] == "complete"]
    kept, choices = arms.choose(done, "eval_accuracy", "maximize", df)
    assert {c.arm: c.chosen[LR] for c in choices} == CHOSEN
    # test figures turned around, or gone: the same choice
    flipped = done.assign(test_accuracy=1 - done["test_accuracy"])
    assert set(arms.choose(flipped, "eval_accuracy", "maximize")[0]["trial"]) == set(kept["trial"])
    bare = done.drop(columns=[c for c in done.columns if c.startswith("test_")])
    assert set(arms.choose(bare, "eval_accuracy", "maximize")[0]["trial"]) == set(kept["trial"])

    v = findings.verdict_of(df, examples)
    rep = heldout.repeat(v, df, tests)
    assert rep is not None and {t for x in rep.verdict.levels for t in x.trials} == chosen_numbers(study)
    arm = int(v.pick.name.removeprefix("r="))  # the pick's test figure is its chosen candidate's
    assert rep.pick_test == pytest.approx(TABLE[(arm, CHOSEN[v.pick.name])][1])


def test_the_paired_verdict_compares_arms_at_their_chosen_candidate():
    """Bug: the verdict grouped every candidate of an arm as if they were its seeds (or compared candidates
    as configurations), named levels 'r=8, learning_rate=0.003', or took learning_rate for the sweep's knob."""
    study, examples, _ = tuned_study()
    df = trials_frame(study)
    done = findings.compared(df)
    assert findings.varied(done) == ["param.lora.r"]
    assert findings.config_label("r=8, seed=2, learning_rate=0.003", {LR}) == "r=8"
    v = findings.verdict_of(df, examples)
    assert v.knob == "r" and [x.name for x in v.levels] == ["r=4", "r=8"]
    assert [set(x.trials) for x in v.levels] == [
        {t for t in chosen_numbers(study) if study.trials[t].params["lora.r"] == r} for r in (4, 8)]
    assert all(run.seeds == (1, 2) for run in v.runs)  # seeds paired within the chosen candidate
    assert v.best.name == "r=8" and v.best.value == pytest.approx(0.77)
    text = " ".join(findings.sweep_findings(df, N, examples=examples, verdict=v))
    assert "r=8 (trials" in text and "learning_rate=0.003 (trials" not in text


def test_the_report_shows_the_choice_only_for_a_tuned_study(make_config):
    """Bug: a tuned study's report hid what each arm was chosen from (or how its candidates fared at the
    rung), or an untuned study's report gained an empty section or column."""
    from lora_sweep.report.table import write_report
    from test_report import gfm_tables, rank_study

    config = make_config({"lora.r": "choice(4, 8)"}, study={"name": "fair", "tune": {LR: "choice(3e-4, 1e-3, 3e-3)"}})
    study, _, _ = tuned_study()
    text = write_report(config, study).read_text()
    assert "## Tuned per configuration" in text
    table = next(t for t in gfm_tables(text) if t[0][:2] == ["Configuration", "Chosen"])
    assert table[0] == ["Configuration", "Chosen", "Tried", "Completed", "Candidates on validation"]
    r4, r8 = table[1:]
    assert r4[:4] == ["r=4", "learning_rate=0.001", "3", "3"] and r8[:4] == ["r=8", "learning_rate=0.003", "3", "2"]
    # r=4 ran every candidate to the end (no rung); r=8 stopped one at epoch 1
    assert r4[4] == ("learning_rate=0.0003: 61.0 at the end, ran to the end, lost (#0, #1); "
                     "learning_rate=0.001: 69.0 at the end, chosen (#2, #3); "
                     "learning_rate=0.003: 65.0 at the end, ran to the end, lost (#4, #5)")
    assert r8[4] == ("learning_rate=0.0003: 40.0 at epoch 1, dropped at epoch 1 (#6, #7); "
                     "learning_rate=0.001: 63.0 at epoch 1, 73.0 at the end, ran to the end, lost (#8, #9); "
                     "learning_rate=0.003: 67.0 at epoch 1, 77.0 at the end, chosen (#10, #11)")
    assert "compared at its own best candidate of `train.learning_rate`" in text
    assert "the test split took no part in the choice" in text
    assert "- trial 6 (r=8, seed=1, learning_rate=0.0003): **pruned**: stopped after epoch 1 by its " \
           "configuration's race: dropped there" in text
    # a race: 3e-3 stopped at epoch 1, kept there and trained again from the start; 1e-3 dropped there
    race = optuna.create_study(direction="maximize")
    add(race, 8, 3e-3, 1, rung=1, at_rung=0.70)
    add(race, 8, 1e-3, 1, rung=1, at_rung=0.50)
    add(race, 8, 3e-3, 1, 0.78, at_rung=0.70)
    frame = trials_frame(race)
    why = {int(r["trial"]): arms.why_stopped(r, frame) for _, r in frame[frame["status"] == "pruned"].iterrows()}
    assert why == {0: "stopped after epoch 1 by its configuration's race: kept there, trained again from the start as #2",
                   1: "stopped after epoch 1 by its configuration's race: dropped there"}
    row = arms.section(findings.compared(frame), frame, "eval_accuracy", "maximize")[-1]
    assert row == ("| r=8 | learning_rate=0.003 | 2 | 1 | learning_rate=0.001: 50.0 at epoch 1, dropped at epoch 1 (#1); "
                   "learning_rate=0.003: 70.0 at epoch 1, 78.0 at the end, chosen (#0, #2) |")

    main = next(t for t in gfm_tables(text) if t[0][:2] == ["Configuration", "Tuned"])
    marked = {row[-1]: row[1] for row in main[1:]}
    assert {n for n, cell in marked.items() if cell} == {f"#{n}" for n in chosen_numbers(study)}
    assert marked[f"#{min(chosen_numbers(study))}"] == "learning_rate=0.001 (best of 3)"

    plain = make_config({"lora.r": "choice(4, 8, 16, 32)"}, study={"name": "rank"})
    untuned = write_report(plain, rank_study({4: 0.8, 8: 0.85, 16: 0.86, 32: 0.86})).read_text()
    assert "Tuned" not in untuned


def test_export_and_mlflow_name_the_chosen_candidate(make_config):
    """Bug: the recommendation (and so the export) took the best single run, a candidate its arm did not
    choose; the card and the MLflow tag did not say the value was tuned, nor out of how many, on validation."""
    from lora_sweep.report.card import render
    from lora_sweep.report.mlflow_view import TUNED_TAG, publish_view
    from lora_sweep.report.recommend import recommend

    config = make_config({"lora.r": "choice(4, 8)"}, study={"name": "fair", "tune": {LR: "choice(3e-4, 1e-3, 3e-3)"}})
    study, _, _ = tuned_study()
    # the best single run is r=4 at 3e-3 (0.80), which r=4 did not choose; no per-example results: best run
    pick = recommend(config, study, confirmed=False)
    assert pick.trial.number in chosen_numbers(study) and pick.trial.params == {"lora.r": 8, "train.seed": 1, LR: 3e-3}

    df = trials_frame(study)
    line = arms.card_line(df, pick.trial.number, "eval_accuracy", "maximize")
    assert line == ("Tuned within its configuration (r=8): train.learning_rate=0.003, the best of 3 candidates on the "
                    "validation (eval) split by eval_accuracy; the held-out test split took no part in the choice.")
    loser = next(t.number for t in study.trials if t.params == {"lora.r": 4, "train.seed": 2, LR: 3e-3})
    assert "is one of 3 candidates, not the one chosen" in arms.card_line(df, loser, "eval_accuracy", "maximize")
    data = {"name_or_path": "d", "text_column": "text", "label_column": "label", "train_size": 10, "eval_size": N,
            "seed": 0, "max_length": 16}
    card = render({"base": "b", "task_type": "SEQ_CLS", "labels": ["neg", "pos"], "sweep": "fair", "trial": 0,
                   "data": data, "auto_class": "AutoModelForSequenceClassification", "dest": "out", "gguf_file": None,
                   "tuned": line}, TrialRecord.from_trial(pick.trial), {}, {}, N, pick.how)
    assert line in card

    class Tracker:
        def __init__(self):
            self.tags = {}

        def set_tags(self, run_id, tags):
            self.tags[run_id] = dict(tags)

        def __getattr__(self, name):  # the series, figures, table and images: not asked here
            return lambda *a, **k: None

    tracker = Tracker()
    publish_view(config, study, config.report_dir / "report.md", tracker, "parent")
    assert tracker.tags["run-8-0.003-1"] == {TUNED_TAG: "train.learning_rate=0.003, best of 3 candidates on "
                                                        "validation (eval_accuracy)"}
    assert tracker.tags["run-4-0.003-2"][TUNED_TAG].startswith("not chosen: r=4 chose train.learning_rate=0.001")
    assert "run-8-0.0003-1" in tracker.tags  # a candidate stopped at the rung says so too


def test_the_confirmation_stage_repeats_each_arm_s_chosen_candidate(make_config):
    """Bug: the confirmation stage took each candidate for a configuration (top_k filled with one arm's
    learning rates), or could not be set up with study.tune (its sampler refuses tuned paths)."""
    from lora_sweep.search import confirm
    from lora_sweep.search.samplers import make_sampler

    config = make_config({"lora.r": "choice(4, 8)"}, study={"name": "fair", "confirm": {"top_k": 2, "seeds": 3},
                                                            "tune": {LR: "choice(3e-4, 1e-3, 3e-3)"}})
    study = optuna.create_study(direction="maximize")
    for (r, lr), (accs, _) in TABLE.items():  # one seed (confirmation adds the others)
        if accs[0] is not None:
            add(study, r, lr, 1, accs[0])
    top = confirm.top_trials(config, study)
    assert [(t.params["lora.r"], t.params[LR]) for t in top] == [(8, 3e-3), (4, 1e-3)]
    # a tie goes to the candidate study.tune lists first, here as in the report, whichever trial ran first
    tie = optuna.create_study(direction="maximize")
    add(tie, 4, 3e-3, 1, 0.70)
    add(tie, 4, 1e-3, 1, 0.70)
    assert [t.params[LR] for t in confirm.top_trials(config, tie)] == [1e-3]
    frame = trials_frame(tie)
    assert arms.choose(frame, "eval_accuracy", "maximize")[1][0].chosen == {LR: 1e-3}

    stage = confirm.stage_config(config)
    assert stage.study.tune is None and LR in stage.space
    make_sampler(stage, confirm.stage_space(config))


def test_pareto_marks_only_runs_of_a_chosen_candidate():
    """Bug: r=4's lucky 0.80 run (a candidate r=4 did not choose) marked Pareto-optimal for the arm."""
    study, _, _ = tuned_study()
    done = findings.complete(trials_frame(study))
    marked = set(done.loc[findings.pareto_mask(done), "trial"])
    assert marked and marked <= chosen_numbers(study)


def test_sample_generations_come_from_each_arms_chosen_candidate():
    """Bug: an arm's samples shown from its first run (r=4 at 3e-4), not the candidate it is compared at."""
    from lora_sweep.report.table import samples_section

    study, _, _ = tuned_study()
    df = trials_frame(study)
    done = df[df["status"] == "complete"]
    samples = {int(t): pd.DataFrame({"prompt": [f"p{t}"], "reference": ["a"], "output": ["a"]}) for t in done["trial"]}
    text = "\n".join(samples_section(df, samples, "eval_accuracy"))
    shown = {int(n) for n in re.findall(r"\(trial #(\d+)\)", text)}
    assert shown and shown <= chosen_numbers(study)


def test_a_choice_at_the_edge_of_its_candidates_is_flagged():
    """Bug: a configuration whose best rate is the largest (or smallest) tried shown as if its best were known:
    its own best may lie beyond, and a comparison at that rate may put it below its best."""
    study, _, _ = tuned_study()
    df = trials_frame(study)
    done = df[df["status"] == "complete"]
    _, choices = arms.choose(done, "eval_accuracy", "maximize", df)
    assert {c.arm: arms.at_edge(c) for c in choices} == {"r=4": [], "r=8": ["learning_rate=0.003, the largest of 3"]}
    text = "\n".join(arms.section(done, df, "eval_accuracy", "maximize"))
    assert "At the edge of the candidates: r=8 (learning_rate=0.003, the largest of 3)." in text
