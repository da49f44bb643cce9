"""data.test_size: a held-out test split drawn from the rows train and eval leave (those unchanged),
stratified and seeded; each complete trial scores it once and stores it apart from eval, and nothing
that chooses (the objective's value, Optuna's reports) reads it."""

from __future__ import annotations

import copy
import csv
import random
from collections import Counter
from dataclasses import replace

import optuna
import pandas as pd
import pytest

from lora_sweep import record
from lora_sweep.config import ConfigError, DataConfig, from_mapping
from lora_sweep.trial import data
from test_trial_tiny import NEGATIVE, POSITIVE, assets  # noqa: F401  (the tiny model and csv fixture)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches")]


@pytest.fixture
def skewed_csv(tmp_path):
    """200 rows, one positive in four; each text starts with its row number (r17 ...) and varies in length."""
    rng = random.Random(3)
    path = tmp_path / "skewed.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(200):
            pos = i % 4 == 0
            writer.writerow([f"r{i} " + " ".join(rng.choices(POSITIVE if pos else NEGATIVE, k=1 + i % 7)),
                             "pos" if pos else "neg"])
    return path


def _row(text: str) -> int:
    return int(text.split()[0][1:])


def _config(path, **kw):
    return DataConfig(name_or_path=str(path), encoding=None, label_column="label", labels=None,
                      **{"train_size": 80, "eval_size": 40, "max_length": 16, **kw})


def test_the_test_split_leaves_train_and_eval_as_they_were_and_is_stratified(skewed_csv, assets):  # noqa: F811
    from transformers import AutoTokenizer

    without, with_test = data.load_splits(_config(skewed_csv)), data.load_splits(_config(skewed_csv, test_size=40))
    assert without.test is None and without.test_ids is None
    # today's split, byte for byte: the same eval ids in the same order, the same train rows
    assert with_test.eval_ids == without.eval_ids
    assert with_test.train.to_dict() == without.train.to_dict() and with_test.eval.to_dict() == without.eval.to_dict()

    test_ids, train_ids = with_test.test_ids, [_row(t) for t in with_test.train["text"]]
    assert len(test_ids) == len(set(test_ids)) == 40
    assert test_ids == [_row(t) for t in with_test.test["text"]]  # ids in the test set's order
    assert not set(test_ids) & set(with_test.eval_ids) and not set(test_ids) & set(train_ids)
    # stratified like train and eval: 1 in 4 positive, exactly
    names = with_test.labels
    assert Counter(names[y] for y in with_test.test["labels"]) == {"neg": 30, "pos": 10}
    assert Counter(names[y] for y in with_test.eval["labels"]) == {"neg": 30, "pos": 10}

    # tokenized as eval is: shortest first, the ids permuted with the rows
    tokenizer = AutoTokenizer.from_pretrained(assets[0])
    splits = data.tokenized(_config(skewed_csv, test_size=40), tokenizer, "tiny")
    assert sorted(splits.test_ids) == sorted(test_ids) and splits.test_ids != test_ids
    texts = dict(zip(test_ids, with_test.test["text"]))
    for k, row in enumerate(splits.test_ids):
        assert splits.test[k]["input_ids"] == tokenizer(texts[row], truncation=True, max_length=16)["input_ids"]
    lengths = [len(x) for x in splits.test["input_ids"]]
    assert lengths == sorted(lengths) and splits.test_generate is None  # a classifier generates nothing


def test_plain_text_gets_a_seeded_random_test_split_outside_train_and_eval(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"r{i} the day was {POSITIVE[i % 8]}\n" for i in range(100)))
    config = DataConfig(name_or_path=str(path), label_column=None, train_size=50, eval_size=20, test_size=20)
    splits, without = data.load_splits(config), data.load_splits(replace(config, test_size=None))
    assert splits.eval_ids == without.eval_ids and splits.train.to_dict() == without.train.to_dict()
    train_ids = {_row(t) for t in splits.train["text"]}
    assert splits.test_ids == [_row(t) for t in splits.test["text"]] and len(set(splits.test_ids)) == 20
    assert not set(splits.test_ids) & (train_ids | set(splits.eval_ids))
    assert data.load_splits(replace(config, seed=1)).test_ids != splits.test_ids  # seeded


def test_too_few_rows_left_for_the_test_split_is_a_config_error(skewed_csv):
    with pytest.raises(ConfigError, match=r"data.test_size=81: only 80 of the 200 examples with labels .* remain "
                                          r"outside data.train_size \+ data.eval_size = 80 \+ 40\. Lower data.test_size"):
        data.load_splits(_config(skewed_csv, test_size=81))
    assert len(data.load_splits(_config(skewed_csv, test_size=80)).test) == 80  # every row left


def test_a_trial_scores_its_test_split_once_and_stores_it_apart(raw_config, assets):  # noqa: F811
    from lora_sweep.run.objective import Objective
    from lora_sweep.search.space import SearchSpace

    model_dir, csv_path = assets
    raw = copy.deepcopy(raw_config)
    raw["model"]["name_or_path"] = str(model_dir)
    raw["data"].update(name_or_path=str(csv_path), encoding=None, label_column="label", labels=None,
                       train_size=80, eval_size=20, test_size=20, max_length=16)
    raw["train"].update(num_train_epochs=2, device="cpu", learning_rate=5e-2, per_device_train_batch_size=16,
                        save_adapter=False)
    raw["lora"].update(r=4, lora_alpha=8)
    raw["study"] = {**raw["study"], "name": "held_out", "sampler": "grid"}
    raw["space"] = {"lora.r": "choice(4)"}
    config = from_mapping(raw)

    calls = []

    class Tracker:  # records what would reach MLflow
        def start_trial(self, parent, name, params, tags):
            return "run0"

        def __getattr__(self, name):
            return lambda *a, **k: calls.append((name, a, k))

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.GridSampler({"lora.r": [4]}))
    study.optimize(Objective(config, SearchSpace(config), Tracker(), "parent", "cpu", {}, planned=1), n_trials=1)
    trial = study.trials[0]
    rec = record.TrialRecord.from_trial(trial)
    assert trial.state == optuna.trial.TrialState.COMPLETE, rec.error

    test = record.read_examples(record.examples_path(config.study_dir, 0, split="test"))
    assert record.examples_path(config.study_dir, 0, split="test").parent.name == "examples-test"
    evals = record.read_examples(record.examples_path(config.study_dir, 0))
    assert len(test) == 20 and len(evals) == 20 and test["correct"].notna().all()
    assert not set(test["example_id"]) & set(evals["example_id"])
    # each frame is its own split's: the eval rows are still the last evaluation's, the labels each id's
    assert evals["correct"].mean() == pytest.approx(rec.eval_accuracy)
    source = pd.read_csv(csv_path)
    for frame in (test, evals):
        assert frame["label"].tolist() == source.loc[frame["example_id"], "label"].tolist()
    raw_splits = data.load_splits(config.base.data)
    assert sorted(test["example_id"]) == sorted(raw_splits.test_ids)
    assert Counter(test["label"]) == {"neg": 10, "pos": 10}  # the 20 rows train and eval left, 10 of each
    # the figures are the frame's
    assert rec.test_accuracy == pytest.approx(test["correct"].mean()) and rec.test_n == 20
    assert rec.test_loss == pytest.approx(test["loss"].mean()) and 0 <= rec.test_f1 <= 1
    assert rec.test_seconds > 0 and rec.test_exact_match is None
    # only eval steers: the objective's value and Optuna's reports are eval_accuracy; MLflow gets both
    assert trial.value == rec.eval_accuracy and list(trial.intermediate_values.values()) == [
        e["eval_accuracy"] for e in rec.epochs]
    logged = {k for name, a, _ in calls if name == "log_metrics" for k in a[1]}
    assert {"test_accuracy", "test_f1", "test_loss", "test_n"} <= logged
    assert not any(k.startswith("test_") for e in rec.epochs for k in e)
    assert ("log_artifact", ("run0", record.examples_path(config.study_dir, 0, split="test"), "examples-test"), {}) \
        in calls


def test_test_figures_count_only_what_was_scored():
    from lora_sweep.trial.runner import TEST_KEYS, held_out_figures

    frame = pd.DataFrame({"example_id": [1, 2, 3, 4], "label": pd.array(["a", "b", None, None], dtype="string"),
                          "prediction": pd.array(["a", "a", None, None], dtype="string"),
                          "correct": pd.array([True, False, None, None], dtype="boolean"),
                          "loss": [0.5, 1.5, float("nan"), 1.0]})
    labelled = held_out_figures(frame, "labelled", ("a", "b"), 2.0)
    assert labelled == {"test_loss": 1.0, "test_accuracy": 0.5, "test_f1": pytest.approx(1 / 3), "test_n": 2,
                        "test_seconds": 2.0}
    chat = held_out_figures(frame, "messages", (), 2.0)
    assert (chat["test_exact_match"], chat["test_n"]) == (0.5, 2) and "test_accuracy" not in chat
    text = held_out_figures(frame.assign(correct=pd.array([None] * 4, dtype="boolean")), "text", (), 1.0)
    assert text == {"test_loss": 1.0, "test_n": 3, "test_seconds": 1.0}  # rows with a finite loss
    assert set(labelled) | set(chat) <= set(TEST_KEYS)
