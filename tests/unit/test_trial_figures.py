"""The timing and training figures a trial stores, each against a measurement the test makes itself,
on the tiny random BERT of test_trial_tiny: evaluations inside an epoch (train.eval_steps) made
artificially slow (each evaluation's metrics take SLEEP_S longer) must not reach epoch_time_s or
train_seconds, and must reach eval_seconds;
train_loss is the mean of the training losses the model returned; batch_shapes counts the training
batches the model saw, and only those."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter

import pytest

from lora_sweep.trial import data, models, runner
from lora_sweep.trial.tasks import SequenceClassification
from test_trial_tiny import assets, settings  # noqa: F401  (the tiny model, csv and settings)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches")]

SLEEP_S = 0.5  # each evaluation is made this much slower
REAL_TRAIN, REAL_METRICS = runner.train, SequenceClassification.epoch_metrics  # before any test wraps them


def spied_run(settings, monkeypatch, slow: bool):  # noqa: F811
    """run_trial, with train() wrapped: its wall time, and what the model saw while training."""
    seen = {"losses": [], "shapes": Counter(), "wall": None}

    def train(model, *args, **kwargs):
        def hook(module, args, kwargs, output):
            if module.training:
                seen["losses"].append(float(output.loss))
                seen["shapes"]["x".join(map(str, kwargs["input_ids"].shape))] += 1

        handle = model.register_forward_hook(hook, with_kwargs=True)
        t0 = time.perf_counter()
        try:
            return REAL_TRAIN(model, *args, **kwargs)
        finally:
            seen["wall"] = time.perf_counter() - t0
            handle.remove()

    monkeypatch.setattr(runner, "train", train)
    def epoch_metrics(self, *args, **kwargs):  # part of every evaluation (lora_sweep.trial.train)
        time.sleep(SLEEP_S if slow else 0)
        return REAL_METRICS(self, *args, **kwargs)

    monkeypatch.setattr(SequenceClassification, "epoch_metrics", epoch_metrics)
    result = runner.run_trial(settings, "cpu", lambda step, metrics: None)
    models.clear_cache()
    data.clear_cache()
    return result, seen


def test_mid_epoch_evaluations_count_as_evaluation_not_training(settings, monkeypatch):  # noqa: F811
    # 80 examples in batches of 16: 5 steps an epoch, 2 epochs; an evaluation every 2 steps (2, 4 | 6, 8, 10)
    # runs inside the epochs, the last one just before the second epoch ends.
    settings = dataclasses.replace(settings, train=dataclasses.replace(settings.train, eval_steps=2))
    epochs, steps = settings.train.num_train_epochs, 10
    fast, fast_seen = spied_run(settings, monkeypatch, slow=False)
    slow, slow_seen = spied_run(settings, monkeypatch, slow=True)
    assert slow.steps == fast.steps == [2, 4, 6, 8, 10]
    slept = SLEEP_S * len(slow.steps)
    f, s = fast.metrics, slow.metrics

    # the sleeps are evaluation time ...
    assert s["eval_seconds"] >= slept
    # ... and not training time: each epoch slept 1-1.5 s, far more than the tiny model trains
    assert s["epoch_time_s"] < f["epoch_time_s"] + 0.5 * slept / epochs
    assert s["train_seconds"] < f["train_seconds"] + 0.5 * slept
    for m, seen in ((f, fast_seen), (s, slow_seen)):
        # train_seconds: train()'s wall time less its evaluations, as the test timed it
        assert m["train_seconds"] == pytest.approx(seen["wall"] - m["eval_seconds"], abs=0.05)
        # the epochs are inside training: their sum cannot exceed it
        assert 0 < m["epoch_time_s"] * epochs <= m["train_seconds"] + 0.05
        # train_loss: the Trainer's mean over the optimizer steps of the losses the model returned
        assert len(seen["losses"]) == steps
        assert m["train_loss"] == pytest.approx(statistics.fmean(seen["losses"]), rel=1e-5)

    # batch_shapes: exactly the batches the model trained on, none of the evaluation's (40 examples)
    for result, seen in ((fast, fast_seen), (slow, slow_seen)):
        assert result.batch_shapes == dict(seen["shapes"])
        assert sum(result.batch_shapes.values()) == steps
        assert all(k.startswith("16x") for k in result.batch_shapes)
