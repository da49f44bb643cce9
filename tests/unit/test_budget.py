"""lora.param_budget: r from the model's own layer sizes, its refusals, and a tiny budgeted sweep end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from omegaconf import OmegaConf
from test_adapters import tiny_bert
from test_cli import assert_nothing_written
from test_search_tiny import tiny_config  # noqa: F401  (a whole sweep on the tiny model)
from test_trial_tiny import assets, settings  # noqa: F401

from lora_sweep.config import ConfigError, LoraSettings, resolve_path
from lora_sweep.search.space import SearchSpace
from lora_sweep.trial.adapters import (
    PRESETS,
    apply_budget,
    apply_lora,
    lora_parameter_count,
    rank_cost,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

# Tiny BERT: hidden 32, intermediate 64, 2 layers; one rank of a Linear(in, out) costs in + out.
PER_RANK = {"query": 2 * 64, "qv": 2 * 2 * 64, "qkvo": 2 * 4 * 64, "mlp": 2 * (96 + 96),
            "all-linear": 2 * (4 * 64 + 2 * 96) + 64}  # all-linear adds the pooler's dense (32 -> 32)
R_AT_1000 = {"query": 7, "qv": 3, "qkvo": 1, "mlp": 2, "all-linear": 1}


@pytest.mark.parametrize("preset", PER_RANK)
def test_r_is_the_largest_rank_within_the_budget_and_peft_trains_that_many(preset):
    model = tiny_bert()
    lora = LoraSettings(target_modules=preset, alpha_ratio=2, param_budget=1000)
    assert rank_cost(lora, model) == (PER_RANK[preset], 0)
    resolved = apply_budget(lora, model)
    assert resolved.r == R_AT_1000[preset] and resolved.effective_alpha == 2 * resolved.r
    peft_model, _ = apply_lora(model, resolved)
    assert lora_parameter_count(peft_model) == PER_RANK[preset] * resolved.r <= 1000


def test_dora_magnitudes_count_against_the_budget():
    model = tiny_bert()
    lora = LoraSettings(target_modules="qv", use_dora=True, param_budget=1000)
    assert rank_cost(lora, model) == (256, 4 * 32)  # one magnitude per output feature of 4 modules
    resolved = apply_budget(lora, model)
    assert resolved.r == (1000 - 128) // 256 == 3
    assert lora_parameter_count(apply_lora(model, resolved)[0]) == 3 * 256 + 128


def test_no_budget_leaves_the_settings_alone():
    lora = LoraSettings(r=5)
    assert apply_budget(lora, tiny_bert()) is lora


def test_a_budget_below_one_rank_is_refused():
    with pytest.raises(ConfigError, match=r"lora.param_budget=900 gives r=0 for lora.target_modules='all-linear'"
                                          r".*integer >= 960"):
        apply_budget(LoraSettings(target_modules="all-linear", param_budget=900), tiny_bert())


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "big"])
def test_a_budget_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match=r"lora.param_budget must be null or an integer > 0"):
        replace(LoraSettings(), param_budget=value).validate()


@pytest.mark.parametrize("space", [{"lora.r": "choice(4, 8)"},
                                   {"lora.r": "choice(4, 8)", "lora.param_budget": "choice(1000, 2000)"}])
def test_a_budget_with_a_searched_r_is_refused(make_config, space):
    lora = {"param_budget": None if "lora.param_budget" in space else 5000}
    with pytest.raises(ConfigError, match=r"lora.param_budget=.* sets r .* space.lora.r cannot be searched"):
        SearchSpace(make_config(space, lora=lora))


def test_a_budget_on_a_4bit_base_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"lora.param_budget must be null with model.load_in_4bit=true"):
        make_config({}, model={"load_in_4bit": True}, lora={"param_budget": 5000}).base.validate()


def test_the_shipped_budget_leaves_every_preset_within_5_percent_on_minilm(compose_cfg):
    from transformers import AutoModelForSequenceClassification

    cfg = OmegaConf.to_container(compose_cfg(["+sweep=target_modules_matched"]), resolve=True)
    budget = cfg["lora"]["param_budget"]
    model = AutoModelForSequenceClassification.from_pretrained(resolve_path(cfg["model"]["name_or_path"]), num_labels=2)
    presets = [p.strip() for p in cfg["space"]["lora"]["target_modules"][len("choice("):-1].split(",")]
    assert set(presets) == set(PRESETS) - {"qkv"}
    for preset in presets:
        lora = apply_budget(LoraSettings(target_modules=preset, param_budget=budget), model)
        count = rank_cost(lora, model)[0] * lora.r
        assert 0.95 * budget <= count <= budget, preset


@pytest.mark.usefixtures("fresh_caches")
def test_the_preflight_refuses_a_budget_below_one_rank_before_anything_is_written(tiny_config, tmp_path):  # noqa: F811
    from lora_sweep.run.sweep import run_sweep

    config = tiny_config({"lora.target_modules": "choice(query, all-linear)"}, {"name": "small", "sampler": "grid"})
    config = replace(config, base=replace(config.base, lora=replace(config.base.lora, param_budget=900)))
    with pytest.raises(ConfigError, match=r"lora.param_budget=900 gives r=0 for lora.target_modules='all-linear'.*"
                                          r"\(in the search space, at \{'lora.target_modules': 'all-linear'\}\)"):
        run_sweep(config)
    assert_nothing_written(tmp_path)


@pytest.mark.usefixtures("one_thread", "fresh_caches")
def test_run_trial_alone_trains_at_the_budgeted_rank(settings):  # noqa: F811
    from lora_sweep.trial.runner import run_trial

    lora = replace(settings.lora, target_modules="qv", param_budget=1000)
    result = run_trial(replace(settings, lora=lora, train=replace(settings.train, num_train_epochs=1)), "cpu",
                       lambda step, metrics: None)
    assert result.metrics["lora_params"] == 3 * PER_RANK["qv"]


@pytest.mark.usefixtures("one_thread", "fresh_caches")
def test_a_budgeted_sweep_trains_and_records_the_resolved_rank(tiny_config, monkeypatch):  # noqa: F811
    """Also: a trial resolves its budget once (runner.prepare), for what the objective records and what it
    trains, not once for each."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from lora_sweep import record
    from lora_sweep.run.sweep import run_sweep
    from lora_sweep.trial import adapters

    import sys

    calls = []
    resolve = adapters.apply_budget
    monkeypatch.setattr(adapters, "apply_budget", lambda *a, **k: calls.append(sys._getframe(1).f_globals["__name__"])
                        or resolve(*a, **k))

    config = tiny_config({"lora.target_modules": "choice(query, all-linear)"}, {"name": "budget", "sampler": "grid"},
                         train={"num_train_epochs": 1})
    lora = replace(config.base.lora, param_budget=1000, alpha_ratio=2)
    config = replace(config, base=replace(config.base, lora=lora))
    study = run_sweep(config)
    assert calls.count("lora_sweep.trial.runner") == len(study.trials)  # preflight's calls aside
    records = {r.params["target_modules_preset"]: r for r in map(record.TrialRecord.from_trial, study.trials)}
    assert {p: (r.params["r"], r.lora_params, r.label) for p, r in records.items()} == {
        "query": (7, 7 * 128, "target_modules=query, r=7"), "all-linear": (1, 960, "target_modules=all-linear, r=1")}
    client = MlflowClient(tracking_uri=config.tracking_uri)
    runs = [client.get_run(r.mlflow_run_id) for r in records.values()]
    assert sorted((run.data.params["r"], run.info.run_name.split(" a=")[0]) for run in runs) == [("1", "r=1"), ("7", "r=7")]
    csv = pd.read_csv(config.report_dir / "report.csv")
    assert sorted(csv["lora_params"]) == [896, 960]
    assert all(json.loads(p)["param_budget"] == 1000 for p in csv["params"])
    report = (config.report_dir / "report.md").read_text()
    assert "LoRA params (budget 1,000)" in report and " 896 (-10.4%) |" in report and " 960 (-4.0%) |" in report
