"""Which precision a trial trains in, and the warning for bf16 on a CPU that would emulate it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lora_sweep import environment, train
from lora_sweep.config import ConfigError, TrainConfig


def test_auto_is_fp32_on_a_cpu_and_fp16_needs_cuda():
    assert train.mixed_precision(TrainConfig(mixed_precision="auto"), "cpu") == {"bf16": False, "fp16": False}
    assert train.mixed_precision(TrainConfig(mixed_precision="no"), "cpu") == {"bf16": False, "fp16": False}
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train.mixed_precision(TrainConfig(mixed_precision="fp16"), "cpu")


def test_bf16_on_a_cpu_warns_once_exactly_where_the_cpu_lacks_bf16_instructions(caplog):
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("needs Linux's /proc/cpuinfo to know the CPU's flags independently of torch")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert environment.cpu_has_native_bf16() == native

    train._warn_emulated_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="lora_sweep"):
        for _ in range(3):  # three trials
            assert train.mixed_precision(TrainConfig(mixed_precision="bf16"), "cpu") == {"bf16": True, "fp16": False}
    warnings = [r for r in caplog.records if "emulates bf16" in r.getMessage()]
    assert len(warnings) == (0 if native else 1)
