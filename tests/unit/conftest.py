"""Shared fixtures for the fast unit tests: Hydra composition of the real conf/ folder."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lora_sweep.trial import data
from lora_sweep.trial import models, retention
from lora_sweep.config import from_mapping

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture
def compose_cfg():
    """compose_cfg([overrides]) -> the DictConfig Hydra composes from conf/config.yaml."""

    def _compose(overrides=()):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return _compose


@pytest.fixture
def raw_config(compose_cfg, tmp_path):
    """The default configuration as a plain dict, with its paths under tmp_path."""
    raw = OmegaConf.to_container(compose_cfg(), resolve=True)
    raw["paths"] = {"sweeps_dir": str(tmp_path / "sweeps"), "reports_dir": str(tmp_path / "reports")}
    return raw


@pytest.fixture
def make_config(raw_config):
    """make_config(space, variants=None, **group_overrides) -> a validated Config.

    group_overrides update one group each, e.g. study={"sampler": "grid"}.
    """

    def _make(space, variants=None, **groups):
        raw = copy.deepcopy(raw_config)
        raw["space"] = space
        if variants is not None:
            raw["variants"] = variants
        for group, values in groups.items():
            raw[group] = {**raw[group], **values}
        return from_mapping(raw)

    return _make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread is much faster than two fighting over a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_caches():
    """Per-process caches of base models and tokenized data, emptied so tests never share them."""
    models.clear_cache()
    data.clear_cache()
    retention.clear_cache()
    yield
    models.clear_cache()
    data.clear_cache()
