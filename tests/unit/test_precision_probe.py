"""train.mixed_precision=auto's CPU probe, with injected step timings: it stays within
min(BUDGET_S, SHARE x the sweep's expected training time), decides fp32 when that runs out, and its
decision is cached per machine and model (not per study) under $LORA_SWEEP_CACHE_DIR."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lora_sweep.trial import precision

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeSteps(list):
    """precision.training_step's stand-in: step(bf16) 'takes' seconds[bf16] and records each call."""

    def __init__(self, fp32_s: float, bf16_s: float):
        super().__init__()
        self.seconds = {False: fp32_s, True: bf16_s}

    def training_step(self, settings, shape):
        def step(bf16: bool) -> float:
            self.append(bf16)
            return self.seconds[bf16]
        return step


@pytest.fixture
def steps(monkeypatch, tmp_path):
    fake = FakeSteps(2.0, 1.0)
    monkeypatch.setattr(precision, "training_step", fake.training_step)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "cache"))
    return fake


def _settings(make_config, train_size=2000, epochs=2, name=None):
    base = make_config({}).base
    data = dataclasses.replace(base.data, train_size=train_size)
    train = dataclasses.replace(base.train, num_train_epochs=epochs)
    model = base.model if name is None else dataclasses.replace(base.model, name_or_path=name)
    return dataclasses.replace(base, data=data, train=train, model=model)


def test_the_probe_is_small_and_stops_within_its_budget_when_steps_are_slow(make_config, steps):
    settings = _settings(make_config)
    batch, tokens = precision.probe_shape(settings)
    assert batch * tokens < settings.train.per_device_train_batch_size * settings.data.max_length
    steps.seconds = {False: precision.BUDGET_S / 4, True: precision.BUDGET_S / 3}  # a 10 s budget fits 3-4
    decision = precision.decide(settings, planned=50)
    spent = sum(steps.seconds[bf16] for bf16 in steps)
    assert decision["budget_s"] == precision.BUDGET_S and spent <= precision.BUDGET_S
    assert decision["probe_s"] == pytest.approx(spent, abs=1e-3)  # rounded to ms
    assert len(steps) < 2 + 2 * precision.REPEATS  # stopped before the planned steps
    assert decision["choice"] == "fp32" and decision["budget_out"]
    assert "budget" in precision.describe(decision) and precision.mixed_precision_value(decision) == "no"


def test_fast_steps_finish_the_probe_and_decide_on_the_measured_speedup(make_config, steps):
    steps.seconds = {False: 0.02, True: 0.01}
    decision = precision.decide(_settings(make_config), planned=50)
    assert len(steps) == 2 + 2 * precision.REPEATS and decision["speedup"] == 2.0
    assert decision["choice"] == "bf16" and not decision.get("budget_out")


def _sweep_of(make_config, steps_worth: float):
    """Settings whose one planned trial's SHARE is `steps_worth` probe steps (any step time)."""
    base = make_config({}).base
    batch, tokens = precision.probe_shape(base)
    size = round(steps_worth / precision.SHARE * batch * tokens / base.data.max_length)  # one epoch
    return _settings(make_config, train_size=size, epochs=1)


def test_the_two_percent_rule_picks_the_smaller_budget(make_config, steps):
    settings, step = _sweep_of(make_config, 3.5), 0.05
    share = precision.SHARE * precision.expected_training_s(step, settings, planned=1)
    assert share == pytest.approx(3.5 * step, rel=0.05) and share < precision.BUDGET_S
    assert precision.budget_s(step, settings, 1) == share  # one trial: 2% is the smaller
    many = 10 * precision.BUDGET_S / share
    assert precision.budget_s(step, settings, many) == precision.BUDGET_S  # many trials: the ceiling is
    steps.seconds = {False: step, True: step}  # the same steps: the one-trial sweep's probe stops sooner
    cut = precision.decide(settings, planned=1)
    assert cut["budget_out"] and sum(steps.seconds[b] for b in steps) <= share
    assert len(steps) == 3
    steps.clear()
    assert not precision.decide(settings, planned=many).get("budget_out")
    assert len(steps) == 2 + 2 * precision.REPEATS


def test_the_cache_is_hit_for_the_same_machine_and_model_and_missed_when_they_change(make_config, steps):
    settings = _settings(make_config)
    steps.seconds = {False: 0.02, True: 0.01}
    first = precision.choose(settings, planned=50)
    assert steps and not first.get("cached")
    assert json.loads(precision.cache_file().read_text())  # written where LORA_SWEEP_CACHE_DIR says
    steps.clear()
    again = precision.choose(settings, planned=1)  # another study, another size: the same machine and model
    assert steps == [] and again["cached"] and again["choice"] == first["choice"]
    assert "cached" in precision.describe(again)

    torch.set_num_threads(torch.get_num_threads() + 1)  # the one_thread fixture restores it
    precision.choose(settings, planned=50)
    assert steps, "a different thread count must be timed again"
    torch.set_num_threads(torch.get_num_threads() - 1)
    steps.clear()
    precision.choose(_settings(make_config, name="another/model"), planned=50)
    assert steps, "a different model must be timed again"


def test_a_decision_cut_short_by_its_budget_is_not_cached(make_config, steps):
    settings = _sweep_of(make_config, 3.5)
    assert precision.choose(settings, planned=1)["budget_out"]
    steps.clear()
    precision.choose(settings, planned=1)
    assert steps, "a cut-short decision must not be reused"
