"""Which precision a trial trains in, and the warning for bf16 on a CPU that would emulate it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lora_sweep.trial import environment
from lora_sweep.trial import train
from lora_sweep.config import ConfigError, TrainConfig


def test_auto_is_fp32_on_a_cpu_and_fp16_needs_cuda():
    assert train.mixed_precision(TrainConfig(mixed_precision="auto"), "cpu") == {"bf16": False, "fp16": False}
    assert train.mixed_precision(TrainConfig(mixed_precision="no"), "cpu") == {"bf16": False, "fp16": False}
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train.mixed_precision(TrainConfig(mixed_precision="fp16"), "cpu")


def test_the_device_description_says_bf16_in_hardware_exactly_where_the_cpu_flags_say_so():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("needs Linux's /proc/cpuinfo to know the CPU's flags independently of torch")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert environment.cpu_has_native_bf16() == native
    assert ("bf16 in hardware" in environment.device_description("cpu")) == native


def test_bf16_on_a_cpu_warns_once_exactly_where_it_measured_slower_than_fp32(caplog):
    speedup = environment.cpu_bf16_speedup()  # cached: the measurement mixed_precision() uses
    assert speedup > 0
    if not environment.cpu_has_native_bf16():  # emulated bf16 is never the faster one
        assert speedup < 1

    train._warn_slow_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="lora_sweep"):
        for _ in range(3):  # three trials
            assert train.mixed_precision(TrainConfig(mixed_precision="bf16"), "cpu") == {"bf16": True, "fp16": False}
    warnings = [r.getMessage() for r in caplog.records if "bf16 matmul measured" in r.getMessage()]
    assert len(warnings) == (1 if speedup < 1 else 0)
    if warnings:
        assert f"{1 / round(speedup, 2):.1f}x slower than fp32" in warnings[0]
        assert "train.mixed_precision=no" in warnings[0]


def test_the_gpu_warm_up_step_changes_nothing_the_trial_trains_with():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from lora_sweep.trial import train

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=2))
    model.train()
    batch = {"input_ids": torch.randint(5, 50, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    train._WARM.discard("test-device")
    assert train.warm_up(model, batch, "test-device") is True       # dropout drew masks, on a forked stream
    assert train.warm_up(model, batch, "test-device") is False      # once per process and device
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_the_warm_up_batch_is_the_first_training_examples_collated():
    import datasets
    from transformers import DataCollatorWithPadding

    from lora_sweep.trial import train
    from lm_assets import tokenizer

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 5], [1, 6, 7], [1, 8]], "attention_mask": [[1, 1], [1, 1, 1], [1, 1]],
                                     "labels": [0, 1, 0], "__source_index__": [0, 1, 2]})
    batch = train.first_batch(ds, DataCollatorWithPadding(tokenizer()), 2)
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and tuple(batch["input_ids"].shape) == (2, 3)
