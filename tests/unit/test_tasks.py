"""lora.task_type CAUSAL_LM and SEQ_2_SEQ_LM on tiny random models: encoding (loss on the answer only),
generated-label accuracy, perplexity, plain-text language modelling, config errors, the report."""

from __future__ import annotations

import copy
import math

import datasets
import lm_assets
import numpy as np
import pandas as pd
import pytest
import torch

from lora_sweep import record, report
from lora_sweep.trial import models
from lora_sweep.trial.adapters import apply_lora, parameter_counts, resolve_targets
from lora_sweep.config import ConfigError, DataConfig, LoraSettings, ModelConfig, from_mapping
from lora_sweep.trial.models import TrialError
from lora_sweep.run.objective import run_trial
from lora_sweep.config.names import metric_names
from lora_sweep.trial.tasks import IGNORE, CausalLM, Seq2SeqLM, get_task, label_scores

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches")]


@pytest.fixture(scope="module")
def tok():
    return lm_assets.tokenizer()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("lm")
    return {
        # initializer_range 0.3: the frozen tied embeddings of a tiny random model are otherwise too small
        # for any adapter to make a confident next-token prediction through the final norm.
        "llama": lm_assets.save(lm_assets.tiny_llama_causal(tok, initializer_range=0.3), tok, root / "llama"),
        "t5": lm_assets.save(lm_assets.tiny_t5(tok), tok, root / "t5"),
        "csv": lm_assets.sentiment_csv(root / "sentiment.csv"),
        "txt": lm_assets.plain_text(root / "corpus.txt"),
    }


def settings_for(raw_config, model_dir, task_type, source, **data_overrides):
    raw = copy.deepcopy(raw_config)
    raw["model"]["name_or_path"] = str(model_dir)
    raw["data"].update({"name_or_path": str(source), "encoding": None, "label_column": "label", "labels": None,
                        "train_size": 80, "eval_size": 40, "max_length": 24, **data_overrides})
    raw["train"].update(num_train_epochs=3, device="cpu", learning_rate=3e-2, per_device_train_batch_size=8)
    raw["lora"].update(r=8, lora_alpha=16, task_type=task_type, lora_dropout=0.0, target_modules="all-linear")
    if data_overrides.get("label_column", "label") is None:
        raw["study"] = {**raw["study"], "metric": "eval_loss", "direction": "minimize"}
    return from_mapping(raw).base


def _split(texts, labels):
    return datasets.Dataset.from_dict({"text": texts, "labels": labels})


# -- encoding -------------------------------------------------------------------------------------

def test_causal_lm_loss_is_on_the_answer_tokens_only(tok):
    task = CausalLM(DataConfig(name_or_path="x", max_length=32))
    enc = task.encode(_split(["good day", "bad day"], [1, 0]), tok, ("negative", "positive"))
    for row, label in zip(enc, ("positive", "negative")):
        prompt = tok(f"Sentiment of: {'good' if label == 'positive' else 'bad'} day ->")["input_ids"]
        answer = tok(f" {label}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row["input_ids"] == prompt + answer
        assert row["labels"] == [IGNORE] * len(prompt) + answer
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        assert tok.decode([t for t in row["labels"] if t != IGNORE]) == f"{label} </s>"


def test_long_text_is_cut_but_the_template_and_answer_stay(tok):
    task = CausalLM(DataConfig(name_or_path="x", max_length=12))
    enc = task.encode(_split([" ".join(["good"] * 40)], [1]), tok, ("negative", "positive"))[0]
    assert len(enc["input_ids"]) == 12
    text = tok.decode(enc["input_ids"])
    assert text.startswith("<s> Sentiment of : good") and text.endswith("good -> positive </s>")
    gen = task.generation_set(_split([" ".join(["good"] * 40)], [1]), tok, ("negative", "positive"))
    assert gen["prompt_ids"][0] == enc["input_ids"][:-2] and gen["max_new_tokens"] == 2


def test_plain_text_language_modelling_labels_every_token(tok):
    task = CausalLM(DataConfig(name_or_path="x", label_column=None, max_length=4))
    enc = task.encode(datasets.Dataset.from_dict({"text": ["the day was good", "bad"]}), tok, ())
    assert enc[0]["input_ids"] == tok("the day was good", truncation=True, max_length=4)["input_ids"]
    assert len(enc[0]["input_ids"]) == 4
    assert [row["labels"] for row in enc] == [row["input_ids"] for row in enc]
    assert task.generation_set(enc, tok, ()) is None


def test_seq2seq_reads_the_prompt_and_writes_the_label(tok):
    task = Seq2SeqLM(DataConfig(name_or_path="x", max_length=32, generate_size=1))
    split = _split(["good day", "bad day"], [1, 0])
    enc = task.encode(split, tok, ("negative", "positive"))
    assert enc[0]["input_ids"] == tok("Sentiment of: good day ->")["input_ids"]
    assert enc[0]["labels"] == tok("positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    gen = task.generation_set(split, tok, ("negative", "positive"))
    assert gen["labels"] == [1] and gen["prompt_ids"] == [enc[0]["input_ids"]]  # generate_size=1


def test_label_scores_are_exact_match_accuracy_and_macro_f1():
    scores = label_scores(["positive", "negative", "positive is it", "negative"],
                          ["positive", "negative", "positive", "positive"], ("negative", "positive"))
    assert scores["eval_accuracy"] == 0.5
    # positive: P=1/1, R=1/3 -> F1 0.5; negative: P=1/2, R=1 -> 2/3
    assert scores["eval_f1"] == pytest.approx((0.5 + 2 / 3) / 2)


# -- training -------------------------------------------------------------------------------------

def test_causal_lm_trial_learns_to_generate_the_label(raw_config, assets, tmp_path):
    calls = []
    s = settings_for(raw_config, assets["llama"], "CAUSAL_LM", assets["csv"], generate_size=20)
    result = run_trial(s, "cpu", lambda epoch, metrics: calls.append(dict(metrics)))
    assert [set(m) for m in calls] == [set(metric_names("CAUSAL_LM"))] * 3
    for m in calls:
        assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
        assert 0.0 <= m["eval_accuracy"] <= 1.0
    assert calls[-1]["eval_loss"] < calls[0]["eval_loss"]
    # a learnable task: the generated answers are the labels (a broken prompt, mask or decode gives 0)
    assert calls[-1]["eval_accuracy"] >= 0.9
    assert result.metrics["eval_accuracy"] == calls[-1]["eval_accuracy"]
    # per example: every eval example's loss; the generated answer and exact match on the first 20
    ex = result.examples
    assert len(ex) == 40 and ex["example_id"].is_unique and np.isfinite(ex["loss"].astype(float)).all()
    answered = ex[ex["correct"].notna()]
    assert len(answered) == 20 and (answered["correct"] == (answered["prediction"] == answered["label"])).all()
    assert answered["correct"].astype(bool).mean() == pytest.approx(result.metrics["eval_accuracy"])
    assert ex.loc[ex["correct"].isna(), "prediction"].isna().all()
    assert set(answered["example_id"]) < set(ex["example_id"])
    source = pd.read_csv(assets["csv"])                      # the id is the example's row in the source csv
    assert answered["label"].tolist() == source.loc[answered["example_id"], "label"].astype(str).tolist()
    back = record.read_examples(record.write_examples(tmp_path / "ex.parquet", ex))
    assert back["correct"].sum() == answered["correct"].astype(bool).sum() and back["correct"].isna().sum() == 20
    assert result.target_modules == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    # no head is trained for a causal LM: LoRA A and B only, 2 layers x 7 modules
    shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
              "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
    assert result.metrics["trainable_params"] == 2 * sum(8 * (i + o) for i, o in shapes.values())


def test_seq2seq_trial_reports_the_same_metrics(raw_config, assets):
    calls = []
    s = settings_for(raw_config, assets["t5"], "SEQ_2_SEQ_LM", assets["csv"])
    result = run_trial(s, "cpu", lambda epoch, metrics: calls.append(dict(metrics)))
    assert set(result.metrics) >= set(metric_names("SEQ_2_SEQ_LM"))
    assert calls[-1]["eval_loss"] < calls[0]["eval_loss"]
    assert calls[-1]["eval_accuracy"] >= 0.9
    assert "layer.1.EncDecAttention.q" in result.target_modules  # all-linear reaches cross-attention too
    ex = result.examples                                   # generate_size null: every eval example answered
    assert len(ex) == 40 and ex["correct"].notna().all() and np.isfinite(ex["loss"].astype(float)).all()
    assert ex["correct"].astype(bool).mean() == pytest.approx(result.metrics["eval_accuracy"])


def test_plain_text_trial_reports_loss_and_perplexity_only(raw_config, assets, tmp_path):
    calls = []
    s = settings_for(raw_config, assets["llama"], "CAUSAL_LM", assets["txt"], label_column=None,
                     train_size=40, eval_size=20, max_length=16)
    result = run_trial(s, "cpu", lambda epoch, metrics: calls.append(dict(metrics)))
    assert [set(m) for m in calls] == [{"eval_loss", "eval_perplexity"}] * 3
    assert "eval_accuracy" not in result.metrics
    assert calls[-1]["eval_loss"] < calls[0]["eval_loss"]
    # per example: a loss only (no label, nothing predicted, no correctness)
    ex = result.examples
    assert len(ex) == 20 and ex["example_id"].is_unique
    assert ex["correct"].isna().all() and ex["prediction"].isna().all() and ex["label"].isna().all()
    assert np.isfinite(ex["loss"].astype(float)).all()
    back = record.read_examples(record.write_examples(tmp_path / "ex.parquet", ex))
    assert back["correct"].isna().all() and back["loss"].tolist() == pytest.approx(ex.sort_values("example_id")["loss"].tolist())



def test_causal_lm_test_split_generates_its_first_generate_size_answers_only(raw_config, assets):
    """data.test_size with a language model: the test answers are generated once, after training, for
    the first data.generate_size test examples; the others have a loss and no correctness."""
    from lora_sweep.trial import data
    from lora_sweep.trial.runner import TEST_KEYS

    calls = []
    s = settings_for(raw_config, assets["llama"], "CAUSAL_LM", assets["csv"], train_size=40, eval_size=20,
                     test_size=30, generate_size=8, max_length=16)
    s = s.with_overrides({"train.num_train_epochs": 1})
    result = run_trial(s, "cpu", lambda epoch, metrics: calls.append(dict(metrics)))
    test = result.test_examples
    splits = data.load_splits(s.data)
    assert len(test) == 30 and sorted(test["example_id"]) == sorted(splits.test_ids)
    assert not set(test["example_id"]) & set(result.examples["example_id"])
    generated = test[test["prediction"].notna()]
    assert len(generated) == 8 and test["correct"].notna().sum() == 8  # null beyond data.generate_size
    assert sorted(generated["example_id"]) == sorted(splits.test_ids[:8])  # the first 8 raw test rows
    assert set(generated["label"]) <= {"negative", "positive"} and np.isfinite(test["loss"].astype(float)).all()
    m = result.test_metrics
    assert set(m) == set(TEST_KEYS) - {"test_exact_match"} and m["test_n"] == 8
    assert m["test_accuracy"] == pytest.approx(generated["correct"].astype(bool).mean())
    assert all(not k.startswith("test_") for c in calls for k in c)


# -- models, presets, QLoRA -----------------------------------------------------------------------

@pytest.mark.parametrize("preset, names", [
    ("qkvo", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]),
    ("mlp", ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    ("all-linear", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
])
def test_presets_on_a_llama_causal_lm_leave_the_lm_head_alone(tok, preset, names):
    model = lm_assets.tiny_llama_causal(tok)
    targets = resolve_targets(preset, model)
    assert list(targets.names) == names and len(targets.modules) == 2 * len(names)
    assert "lm_head" not in targets.modules
    peft_model, _ = apply_lora(model, LoraSettings(r=4, lora_alpha=8, target_modules=preset, task_type="CAUSAL_LM"))
    trainable, _ = parameter_counts(peft_model)
    assert trainable == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def test_gguf_file_in_a_package_is_split_into_folder_and_file_name(tmp_path):
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert models.model_location(ModelConfig(name_or_path=str(gguf))) == (str(tmp_path), {"gguf_file": gguf.name})
    named = ModelConfig(name_or_path="org/repo", gguf_file="m.gguf")
    assert models.model_location(named) == ("org/repo", {"gguf_file": "m.gguf"})
    assert models.model_location(ModelConfig(name_or_path=str(tmp_path))) == (str(tmp_path), {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no CUDA GPU")
def test_qlora_causal_lm_without_cuda_says_it_needs_a_gpu(assets):
    config = ModelConfig(name_or_path=str(assets["llama"]), load_in_4bit=True)
    with pytest.raises(TrialError, match="QLoRA .* needs a CUDA GPU"):
        models.load_base(config, (), 0, "CAUSAL_LM")


def test_get_task_maps_every_task_type_to_its_model_class():
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    assert get_task("SEQ_CLS").model_class() is AutoModelForSequenceClassification
    assert get_task("CAUSAL_LM").model_class() is AutoModelForCausalLM
    assert get_task("SEQ_2_SEQ_LM").model_class() is AutoModelForSeq2SeqLM


# -- configuration errors -------------------------------------------------------------------------

@pytest.mark.parametrize("group, values, shown", [
    ("data", {"label_column": None}, "data.label_column=None (plain text) works only with lora.task_type=CAUSAL_LM"),
    ("data", {"prompt": "Sentiment:"}, "data.prompt must be a template that contains {text}"),
    ("data", {"generate_size": 0}, "data.generate_size must be an integer > 0, but got data.generate_size=0"),
    ("model", {"gguf_file": "model.bin"}, "model.gguf_file must be null or the name of a .gguf file"),
    ("lora", {"task_type": "TOKEN_CLS"}, "lora.task_type must be one of SEQ_CLS, CAUSAL_LM, SEQ_2_SEQ_LM"),
])
def test_bad_task_settings_name_field_value_and_allowed(raw_config, group, values, shown):
    raw = copy.deepcopy(raw_config)
    raw[group].update(values)
    with pytest.raises(ConfigError) as err:
        from_mapping(raw)
    assert shown in str(err.value)


def test_plain_text_with_an_accuracy_metric_is_refused(raw_config):
    raw = copy.deepcopy(raw_config)
    raw["data"]["label_column"] = None
    raw["lora"]["task_type"] = "CAUSAL_LM"
    with pytest.raises(ConfigError) as err:
        from_mapping(raw)
    assert ("study.metric must be one of eval_loss, eval_perplexity (what lora.task_type=CAUSAL_LM measures on "
            "plain text), but got study.metric='eval_accuracy'") in str(err.value)
    raw["study"]["metric"] = "eval_perplexity"
    raw["study"]["direction"] = "minimize"
    assert from_mapping(raw).study.metric == "eval_perplexity"


# -- report ---------------------------------------------------------------------------------------

def test_report_table_adds_perplexity_and_shows_na_without_labels():
    import pandas as pd

    df = pd.DataFrame([
        {"trial": 0, "status": "complete", "label": "r=8", "eval_accuracy": 0.875, "eval_perplexity": 1.234,
         "trainable_params": 100, "trainable_pct": 0.5, "peak_memory_mb": 10.0, "epoch_time_s": 2.0},
        {"trial": 1, "status": "complete", "label": "plain", "eval_accuracy": float("nan"), "eval_perplexity": 30.0,
         "trainable_params": 200, "trainable_pct": 1.0, "peak_memory_mb": 20.0, "epoch_time_s": 3.0},
        {"trial": 2, "status": "failed", "label": "QLoRA", "eval_accuracy": None, "eval_perplexity": None,
         "trainable_params": None, "trainable_pct": None, "peak_memory_mb": None, "epoch_time_s": None},
    ])
    table = report.guide_table(df)
    assert list(table.columns)[:4] == ["Configuration", "Accuracy (%)", "95% CI", "Perplexity"]
    assert table["Accuracy (%)"].tolist() == ["87.5", "n/a"]
    assert table["Perplexity"].tolist() == ["1.23", "30.00"]
    assert "Perplexity" not in report.guide_table(df.drop(columns=["eval_perplexity"])).columns
    notes = " ".join(report.notes_lines(df))
    assert "generated answer is exactly the label" in notes and "Perplexity: exp(eval_loss)" in notes
    assert "generated" not in " ".join(report.notes_lines(df.drop(columns=["eval_perplexity"])))
