"""Every test process (and the sweeps it starts) keeps machine-level caches in its own folder."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def own_cache_dir(tmp_path_factory):
    # train.mixed_precision=auto caches its CPU probe per machine (lora_sweep.trial.precision)
    before = os.environ.get("LORA_SWEEP_CACHE_DIR")
    os.environ["LORA_SWEEP_CACHE_DIR"] = str(tmp_path_factory.mktemp("lora-sweep-cache"))
    yield
    if before is None:
        os.environ.pop("LORA_SWEEP_CACHE_DIR", None)
    else:
        os.environ["LORA_SWEEP_CACHE_DIR"] = before
