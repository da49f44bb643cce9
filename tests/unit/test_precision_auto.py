"""train.mixed_precision=auto on a CPU: bf16 against fp32 timed once a study, at a small probe shape,
chosen at >= 1.3x, stored on the study, reused by every later start, recorded on each trial."""

from __future__ import annotations

import optuna
import pytest

from lora_sweep import record
from lora_sweep.run import sweep
from lora_sweep.trial import precision, train
from test_search_tiny import tiny_config  # noqa: F401  (whole tiny sweeps)
from test_trial_tiny import assets  # noqa: F401  (the tiny model and csv fixture)


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    """Each test its own per-machine precision cache (lora_sweep.trial.precision.cache_file)."""
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def probe(monkeypatch):
    """Replace the timing with fixed (fp32 s, bf16 s), a completed probe; counts its calls."""
    class Calls(list):
        times = (1.31, 1.0)

    calls = Calls()

    def fake(settings, planned=1, repeats=3):
        calls.append(settings)
        return {"fp32_s": calls.times[0], "bf16_s": calls.times[1], "spent_s": 1.0, "budget_s": 10.0,
                "expected_s": 1000.0, "complete": True}

    monkeypatch.setattr(precision, "time_steps", fake)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    return calls


@pytest.mark.parametrize("times, choice", [((1.29, 1.0), "fp32"), ((1.31, 1.0), "bf16"), ((0.7, 1.0), "fp32")])
def test_bf16_only_at_1_3x_faster(make_config, probe, times, choice):
    probe.times = times
    decision = precision.decide(make_config({}).base)
    assert decision["choice"] == choice and decision["speedup"] == round(times[0] / times[1], 3)
    assert (decision["fp32_s"], decision["bf16_s"], decision["threshold"]) == (*times, 1.3)
    assert precision.mixed_precision_value(decision) == ("bf16" if choice == "bf16" else "no")
    assert ("bf16 chosen" in precision.describe(decision)) == (choice == "bf16")


def test_emulated_bf16_is_fp32_without_timing(make_config, probe, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    decision = precision.decide(make_config({}).base)
    assert decision["choice"] == "fp32" and probe == [] and "emulated" in precision.describe(decision)


def test_decided_once_a_study_forced_values_and_gpus_never_probe(make_config, probe):
    study = optuna.create_study()
    for forced in ("no", "bf16"):
        config = make_config({}, train={"mixed_precision": forced})
        assert sweep._with_precision(config, study, "cpu") is config
    auto = make_config({}, train={"mixed_precision": "auto"})
    assert sweep._with_precision(auto, study, "cuda") is auto  # a GPU keeps its own rule
    assert probe == [] and record.precision(study) == {}
    first = sweep._with_precision(auto, study, "cpu")
    assert first.base.train.mixed_precision == "bf16" and len(probe) == 1
    assert record.precision(study)["choice"] == "bf16"
    probe.times = (1.0, 1.0)  # a resume that would decide otherwise still reads the stored decision
    again = sweep._with_precision(auto, study, "cpu")
    assert again.base.train.mixed_precision == "bf16" and len(probe) == 1


def test_a_sweep_stores_the_decision_and_records_it_per_trial_and_in_the_report(tiny_config, probe,  # noqa: F811
                                                                                  monkeypatch):
    monkeypatch.setattr(train, "cpu_bf16_speedup", lambda: 2.0)  # the forced-bf16 warning's own matmul timing
    config = tiny_config({"lora.r": "choice(2)"}, {"name": "prec", "sampler": "grid"},
                         train={"num_train_epochs": 1, "mixed_precision": "auto"})
    study = sweep.run_sweep(config)
    assert len(probe) == 1 and record.precision(study)["choice"] == "bf16"
    assert [record.TrialRecord.from_trial(t).precision for t in study.trials] == ["bf16"]
    device = next(line for line in (config.report_dir / "report.md").read_text().splitlines() if "Device" in line)
    assert "bf16 chosen: 1.31x faster than fp32 at 4x16" in device
    probe.times = (1.0, 1.0)  # a resume (any worker) reads the stored decision from the storage, no new timing
    stored = optuna.load_study(study_name=study.study_name, storage=config.storage_url)
    assert sweep._with_precision(config, stored, "cpu").base.train.mixed_precision == "bf16" and len(probe) == 1


def test_the_real_probe_times_a_training_step_of_the_tiny_model(tiny_config):  # noqa: F811
    settings = tiny_config({}, {"name": "probe"}).base
    m = precision.time_steps(settings, planned=10**6, repeats=1)  # a sweep large enough for the full budget
    assert m["complete"] and m["fp32_s"] > 0 and m["bf16_s"] > 0 and m["spent_s"] <= precision.BUDGET_S
