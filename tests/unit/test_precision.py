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
