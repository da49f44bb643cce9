"""GPU tests reuse the unit tests' tiny model builders (tests/unit/lm_assets.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture
def raw_config(tmp_path):
    """The default configuration as a plain dict, with its paths under tmp_path."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = OmegaConf.to_container(compose("config"), resolve=True)
    raw["paths"] = {"sweeps_dir": str(tmp_path / "sweeps"), "reports_dir": str(tmp_path / "reports")}
    return raw
