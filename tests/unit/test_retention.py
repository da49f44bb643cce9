"""Forgetting (lora_sweep/trial/retention.py, lora_sweep/report/forgetting.py) on a tiny random LLaMA:
fixed hashed passages, base losses once per process, zero for an identity adapter and positive for a
perturbed model, the cached base untouched by bias=all training, the report's paired test."""

from __future__ import annotations

import copy
from dataclasses import replace
import hashlib
import math
import os
import subprocess
import sys

import lm_assets
import numpy as np
import pandas as pd
import pytest
import torch

from lora_sweep import record
from lora_sweep.config import ConfigError, from_mapping
from lora_sweep.report import forgetting
from lora_sweep.trial import models, retention
from lora_sweep.trial.adapters import apply_lora
from lora_sweep.trial.runner import run_trial

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches", "fresh_retention")]

SIZE = 6  # passages: enough for a bootstrap, few enough for seconds


@pytest.fixture
def fresh_retention():
    retention.clear_cache()
    yield
    retention.clear_cache()


@pytest.fixture(scope="module")
def tok():
    return lm_assets.tokenizer()


def _fit(model, tok, texts, steps: int = 40):
    """A few Adam steps on the passages: a base that knows them, so that damage shows as forgetting."""
    batch = tok(list(texts), truncation=True, max_length=model.config.max_position_embeddings, padding=True,
                return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("retention")
    texts = retention.passages(SIZE).texts
    biased = lm_assets.tiny_llama_causal(tok, attention_bias=True, mlp_bias=True)  # bias=all has weights to train
    return {"llama": lm_assets.save(_fit(lm_assets.tiny_llama_causal(tok), tok, texts), tok, root / "llama"),
            "biased": lm_assets.save(biased, tok, root / "biased"),
            "txt": lm_assets.plain_text(root / "corpus.txt")}


def settings_for(raw_config, model_dir, text, **lora):
    raw = copy.deepcopy(raw_config)
    raw["model"]["name_or_path"] = str(model_dir)
    raw["data"].update(name_or_path=str(text), encoding=None, label_column=None, labels=None, train_size=24,
                       eval_size=8, max_length=16, retention_size=SIZE)
    raw["train"].update(num_train_epochs=1, device="cpu", learning_rate=3e-2, per_device_train_batch_size=8,
                        per_device_eval_batch_size=4)  # 4 < SIZE: the passages go in two batches
    raw["lora"].update({"r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
                        "target_modules": "all-linear", **lora})
    raw["study"] = {**raw["study"], "metric": "eval_loss", "direction": "minimize"}
    return from_mapping(raw).base


# -- passages -------------------------------------------------------------------------------------

def test_passages_are_fixed_hashed_and_the_same_in_another_process():
    first = retention.passages(SIZE)
    retention.passages.cache_clear()
    again = retention.passages(SIZE)
    assert again == first and len(first.texts) == SIZE == len(set(first.texts))
    assert first.hashes == tuple(hashlib.sha256(t.encode()).hexdigest() for t in first.texts)
    assert first.set_hash == retention.set_hash(first.hashes)
    assert all(0 < len(t) <= retention.PASSAGE_CHARS and not any(c.isdigit() for c in t) for t in first.texts)
    code = f"from lora_sweep.trial.retention import passages; print(passages({SIZE}).set_hash)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert other.stdout.strip() == first.set_hash


def test_too_many_passages_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data\.retention_size=1000000: .*allowed: 0 \(off\) to \d+"):
        retention.passages(1_000_000)


# -- losses ---------------------------------------------------------------------------------------

def _base(settings):
    return models.load_base(settings.model, (), settings.train.seed, "CAUSAL_LM")


def test_an_identity_adapter_forgets_nothing_and_a_perturbed_model_forgets(raw_config, assets):
    s = settings_for(raw_config, assets["llama"], assets["txt"])
    base = _base(s)
    before = retention.base_losses(base, s, "cpu")
    peft_model, _ = apply_lora(models.fresh_copy(base), s.lora)  # B = 0: the adapter adds exactly nothing
    same = retention.measure(peft_model, base.tokenizer, s, "cpu", before).figures
    assert same["forgetting"] == 0 and same["forgetting_low"] <= 0 <= same["forgetting_high"]
    assert same["retention_n"] == SIZE and same["retention_loss"] == same["base_retention_loss"]

    damaged = models.fresh_copy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in damaged.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    worse = retention.measure(damaged, base.tokenizer, s, "cpu", before)
    assert worse.figures["forgetting"] > 0 and worse.figures["forgetting_low"] > 0
    frame = worse.examples
    assert list(frame.columns) == list(record.EXAMPLE_COLUMNS)
    assert list(frame["label"]) == list(retention.passages(SIZE).hashes)
    assert np.allclose(frame["loss"].mean(), worse.figures["retention_loss"])
    assert np.allclose(np.mean(frame.attrs["base_loss"]), worse.figures["base_retention_loss"])


def test_base_losses_are_computed_once_for_two_trials(raw_config, assets, monkeypatch, tmp_path):
    calls = []
    real = retention._score_base
    monkeypatch.setattr(retention, "_score_base", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = [run_trial(settings_for(raw_config, assets["llama"], assets["txt"], r=r), "cpu", lambda *_: None)
               for r in (2, 4)]
    assert len(calls) == 1
    first, second = (r.figures for r in results)
    assert first.base_retention_loss == second.base_retention_loss and first.retention_n == SIZE
    assert first.retention_loss != second.retention_loss  # two adapters, each scored itself
    for r in results:
        assert r.figures.forgetting == pytest.approx(r.figures.retention_loss - r.figures.base_retention_loss)
        assert r.retention_examples["label"].tolist() == list(retention.passages(SIZE).hashes)
    written = retention.write_base(tmp_path, results[0].retention_examples)
    assert retention.read_base(tmp_path)["loss"].mean() == pytest.approx(first.base_retention_loss)
    assert written == retention.base_path(tmp_path)


def test_bias_all_training_leaves_the_cached_base_and_its_losses_untouched(raw_config, assets, tmp_path):
    from safetensors.torch import load_file

    s = settings_for(raw_config, assets["biased"], assets["txt"], bias="all")
    base = _base(s)
    pristine = {k: v.clone() for k, v in base.model.state_dict().items()}
    result = run_trial(s, "cpu", lambda *_: None, adapter_dir=tmp_path / "adapter")
    trained = {k: v for k, v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items()
               if k.endswith(".bias")}
    assert trained and any(not torch.equal(v, pristine[k.replace("base_model.model.", "").replace(".base_layer", "")])
                           for k, v in trained.items())  # the trial did train base weights
    assert all(torch.equal(v, pristine[k]) for k, v in base.model.state_dict().items())
    retention.clear_cache()
    models.clear_cache()
    fresh = retention.base_losses(_base(s), s, "cpu")  # from the checkpoint again
    assert result.retention_examples.attrs["base_loss"] == [float(x) for x in fresh]  # exactly, passage by passage


def test_other_task_types_measure_no_forgetting(raw_config, assets):
    s = settings_for(raw_config, assets["llama"], assets["txt"])
    assert retention.applies(s)
    assert not retention.applies(replace(s, lora=replace(s.lora, task_type="SEQ_CLS")))
    assert not retention.applies(replace(s, data=replace(s.data, retention_size=0)))


# -- report ---------------------------------------------------------------------------------------

def _study(tmp_path, adapted: dict, base: np.ndarray):
    """A study folder with per-passage results for trials {number: losses} and the frame rows for them."""
    hashes = [f"h{i}" for i in range(len(base))]
    rows = []
    for number, (name, losses) in adapted.items():
        frame = pd.DataFrame({"example_id": range(len(losses)), "label": hashes, "prediction": None,
                              "correct": None, "loss": losses})
        record.write_examples(record.examples_path(tmp_path, number, split="retention"), frame)
        f = retention.figures(losses, base)
        rows.append({"trial": number, "label": name, "config": name, "status": "complete", "eval_loss": 1.0 + number,
                     **f})
    return pd.DataFrame(rows)


def _hand_p(a, b) -> float:
    from scipy.stats import t

    d = np.asarray(a) - np.asarray(b)
    stat = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    return float(2 * t.sf(abs(stat), d.size - 1))


def test_report_section_names_the_paired_holm_adjusted_p(tmp_path):
    rng = np.random.default_rng(0)
    n, sd = 32, 0.1
    base = rng.uniform(3, 4, n)
    least = base + rng.normal(0.05, 0.05, n)

    def shifted(t_value):  # per-passage differences whose paired t statistic is exactly t_value
        z = rng.normal(size=n)
        return least + t_value * sd / math.sqrt(n) + sd * (z - z.mean()) / z.std(ddof=1)

    far, close = shifted(2.6), shifted(1.0)  # p ~ 0.014: beyond noise only after Holm doubles it; p ~ 0.33
    df = _study(tmp_path, {0: ("r=4", least), 1: ("r=8", close), 2: ("r=16", far)}, base)
    text = "\n".join(forgetting.lines(df, tmp_path))
    p_close, p_far = _hand_p(close, least), _hand_p(far, least)
    assert p_far < p_close
    adj_far, adj_close = min(1.0, 2 * p_far), min(1.0, max(2 * p_far, p_close))  # Holm over two comparisons
    assert adj_far < forgetting.ALPHA < adj_close
    assert f"r=16 forgets {float((far - least).mean()):.3f} nats/token more than r=4 ({forgetting._p(adj_far)})" in text
    assert f"r=8 not measurably ({forgetting._signed(float((close - least).mean()))}, {forgetting._p(adj_close)})" in text
    assert "| r=8 | " + forgetting._signed(float((close - base).mean())) in text
    assert "One run per configuration: the test covers which passages were drawn, not training noise" in text

    assert forgetting.plot(df, tmp_path / "plots").exists()


def test_report_compares_nothing_without_a_test(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.uniform(3, 4, 16)
    a = base + rng.normal(0.05, 0.2, 16)
    b = a + rng.normal(0.0, 0.2, 16)
    df = _study(tmp_path, {0: ("r=4", a), 1: ("r=8", b)}, base)
    text = "\n".join(forgetting.lines(df, tmp_path))
    p = _hand_p(a, b)  # one comparison: Holm leaves it as it is
    assert "No configuration forgets measurably more than" in text and forgetting._p(p) in text
    record.examples_path(tmp_path, 1, split="retention").unlink()
    assert "**Not compared**: trial #1 stored no per-passage results" in "\n".join(forgetting.lines(df, tmp_path))


def _two_runs_of_r4(tmp_path, seed: int, labels: tuple):
    """Two runs of one configuration (r=4) labelled `labels`, their per-passage losses and the base's."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(3, 4, 16)
    a, b = base + rng.normal(0.1, 0.2, 16), base + rng.normal(0.3, 0.2, 16)
    df = _study(tmp_path, {0: (labels[0], a), 1: (labels[1], b)}, base)
    df["config"] = "r=4"
    return df, a, b, base


def test_a_configuration_run_under_two_seeds_counts_as_their_mean_per_passage(tmp_path):
    df, a, b, base = _two_runs_of_r4(tmp_path, 2, ("r=4, seed=1", "r=4, seed=2"))
    frame = record.read_examples(record.examples_path(tmp_path, 0, split="retention"))
    record.write_examples(retention.base_path(tmp_path), frame.assign(loss=base))
    row = next(line for line in forgetting.lines(df, tmp_path) if line.startswith("| r=4 |"))
    d = retention.figures((a + b) / 2, base)
    assert row.startswith(f"| r=4 | {forgetting._signed(d['forgetting'])} | "
                          f"{forgetting._signed(d['forgetting_low'])} to {forgetting._signed(d['forgetting_high'])} |")
    assert row.endswith("| #0, #1 |")


def test_forgetting_interval_draws_as_the_reports_paired_bootstrap():
    from lora_sweep.report.stats import mean, paired_bootstrap

    rng = np.random.default_rng(5)
    base = rng.uniform(3, 4, 20)
    adapted = base + rng.normal(0.05, 0.1, 20)
    d = paired_bootstrap(mean, (adapted,), (base,), seed=0)
    got = retention.figures(adapted, base)
    assert (got["forgetting"], got["forgetting_low"], got["forgetting_high"]) == pytest.approx((d.estimate, d.low, d.high))


def test_tuned_candidates_of_one_configuration_are_not_pooled_as_seeds(tmp_path):
    df, _, _, _ = _two_runs_of_r4(tmp_path, 3, ("r=4, learning_rate=0.001", "r=4, learning_rate=0.003"))
    df["tuned"] = ['{"train.learning_rate": 0.001}', '{"train.learning_rate": 0.003}']
    rows = [line for line in forgetting.lines(df, tmp_path) if line.startswith("| r=4")]
    assert [r.split(" | ")[0] for r in rows] == ["| r=4, learning_rate=0.001", "| r=4, learning_rate=0.003"]
