"""space: (Hydra sweeper grammar) -> Optuna distributions, grids, suggested points and clear errors."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from lora_sweep.config import ConfigError
from lora_sweep.search.space import SearchSpace
from lora_sweep.search.samplers import sampler_name

optuna.logging.set_verbosity(optuna.logging.ERROR)

VARIANTS = {
    "small": {"label": "Small (r=4)", "set": {"lora.r": 4, "lora.lora_alpha": 8}},
    "wide": {"label": "Wide", "set": {"lora": {"target_modules": "all-linear"}}},
}


def _param(make_config, path, expr):
    space = SearchSpace(make_config({path: expr}))
    return space, space.params[path]


def test_choice_is_categorical_and_grid(make_config):
    space, p = _param(make_config, "lora.r", "choice(4,8)")
    assert isinstance(p.distribution, CategoricalDistribution)
    assert p.distribution.choices == (4, 8)
    assert p.grid == (4, 8)
    assert space.is_grid and space.grid() == {"lora.r": [4, 8]} and space.grid_size() == 2


def test_nested_space_mapping_is_flattened(make_config):
    space = SearchSpace(make_config({"lora": {"r": "choice(4,8)", "bias": "choice(none, all)"}}))
    assert set(space.params) == {"lora.r", "lora.bias"}
    assert space.params["lora.bias"].grid == ("none", "all")


def test_int_range_is_an_int_distribution_with_a_grid(make_config):
    space, p = _param(make_config, "lora.r", "range(4,16,step=4)")
    assert isinstance(p.distribution, IntDistribution)
    assert (p.distribution.low, p.distribution.high, p.distribution.step) == (4, 12, 4)
    assert p.grid == (4, 8, 12)  # stop is exclusive, as in Python and Hydra
    assert space.grid_size() == 3


def test_float_range_grid(make_config):
    _, p = _param(make_config, "lora.lora_dropout", "range(0.0,0.3,step=0.1)")
    assert isinstance(p.distribution, FloatDistribution)
    assert p.grid == (0.0, 0.1, 0.2)


def test_interval_is_float_without_grid(make_config):
    space, p = _param(make_config, "lora.lora_dropout", "interval(0.0,0.3)")
    assert isinstance(p.distribution, FloatDistribution)
    assert (p.distribution.low, p.distribution.high, p.distribution.log) == (0.0, 0.3, False)
    assert p.grid is None
    assert space.is_grid is False
    assert space.grid_size() == 0
    # corners of a continuous parameter: both ends
    assert [pt.settings.lora.lora_dropout for pt in space.corner_points()] == [0.1, 0.0, 0.3]


def test_log_tag_gives_a_log_distribution(make_config):
    _, p = _param(make_config, "train.learning_rate", "tag(log, interval(1e-5,1e-3))")
    assert isinstance(p.distribution, FloatDistribution)
    assert p.distribution.log is True
    assert (p.distribution.low, p.distribution.high) == (1e-5, 1e-3)


def test_int_tag_gives_an_int_interval(make_config):
    _, p = _param(make_config, "lora.r", "tag(int, interval(4, 64))")
    assert isinstance(p.distribution, IntDistribution)
    assert (p.distribution.low, p.distribution.high, p.grid) == (4, 64, None)


def test_list_choices_round_trip_to_tuples_through_suggest(make_config):
    space = SearchSpace(make_config({"lora.target_modules": "choice([query,value],[query])"}))
    # Optuna categoricals hold scalars only: list choices are stored as JSON strings...
    assert space.params["lora.target_modules"].grid == ('["query", "value"]', '["query"]')
    # GridSampler visits both choices in two trials (it stops the study itself, so use optimize).
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(),
                                sampler=optuna.samplers.GridSampler(space.grid(), seed=0))
    seen = {}

    def objective(trial):
        point = space.suggest(trial)
        value = point.values["lora.target_modules"]
        # ...and come back as tuples, in the values and in the settings
        assert isinstance(value, tuple)
        assert point.settings.lora.target_modules == value
        point.settings.validate()
        seen[value] = (point.label, trial.params["lora.target_modules"])
        return 0.5

    study.optimize(objective, n_trials=2)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert seen == {
        ("query", "value"): ("target_modules=query+value", '["query", "value"]'),
        ("query",): ("target_modules=query", '["query"]'),
    }


def test_mixed_preset_and_list_choice(make_config):
    space = SearchSpace(make_config({"lora.target_modules": "choice(qkvo,[query,value])"}))
    assert [pt.settings.lora.target_modules for pt in space.corner_points()[1:]] == ["qkvo", ("query", "value")]


def test_suggest_samples_within_interval_and_applies_to_settings(make_config):
    space = SearchSpace(make_config({"lora.lora_dropout": "interval(0.0,0.3)", "lora.r": "range(4,16,step=4)"}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(5):
        trial = study.ask()
        point = space.suggest(trial)
        study.tell(trial, 0.0)
        dropout, r = point.values["lora.lora_dropout"], point.values["lora.r"]
        assert 0.0 <= dropout <= 0.3
        assert r in (4, 8, 12) and isinstance(r, int)
        assert (point.settings.lora.lora_dropout, point.settings.lora.r) == (dropout, r)
        assert point.label == f"lora_dropout={dropout:g}, r={r}"


def test_variant_point_applies_the_variant_then_plain_paths(make_config):
    space = SearchSpace(make_config({"variant": "choice(small, wide)", "lora.lora_dropout": "choice(0.0, 0.2)"},
                                    variants=VARIANTS))
    point = space.point({"variant": "small", "lora.lora_dropout": 0.2})
    lora = point.settings.lora
    assert (lora.r, lora.effective_alpha, lora.lora_dropout) == (4, 8, 0.2)
    assert point.label == "Small (r=4), lora_dropout=0.2"
    assert space.point({"variant": "wide"}).settings.lora.target_modules == "all-linear"
    assert space.point({}).label == "base"
    assert space.grid_size() == 4


def test_grid_size_multiplies(make_config):
    space = SearchSpace(make_config({"lora.r": "choice(4,8)", "lora.lora_dropout": "choice(0.0,0.1,0.2)"}))
    assert space.grid_size() == 6
    assert len(space) == 2


def test_sampler_auto_picks_grid_or_tpe(make_config):
    grid = make_config({"lora.r": "choice(4,8)"})
    assert sampler_name(grid, SearchSpace(grid)) == "grid"
    mixed = make_config({"lora.r": "choice(4,8)", "lora.lora_dropout": "interval(0.0,0.3)"})
    assert sampler_name(mixed, SearchSpace(mixed)) == "tpe"


def test_sampler_grid_with_an_interval_is_refused(make_config):
    config = make_config({"lora.r": "choice(4,8)", "lora.lora_dropout": "interval(0.0,0.3)"},
                         study={"sampler": "grid"})
    with pytest.raises(ConfigError) as err:
        sampler_name(config, SearchSpace(config))
    message = str(err.value)
    assert message.startswith("study.sampler=grid needs choice(...) or range(...)")
    assert "lora.lora_dropout use interval(...)" in message
    assert "lora.r" not in message.split("but")[1]  # only the continuous one is blamed


@pytest.mark.parametrize("path, expr, expected", [
    ("lora.r", "choice()", ["space.lora.r", "cannot parse 'choice()'", "choice(a, b, ...)"]),
    ("lora.lora_dropout", "interval(0.3,0.1)", ["space.lora.lora_dropout", "low < high", "low=0.3, high=0.1"]),
    ("lora.r", "5", ["space.lora.r='5' is a single value", "set lora.r=5 instead"]),
    ("lora.rank", "choice(4,8)", ["space.lora.rank: unknown parameter path 'lora.rank'", "Allowed: variant,",
                                  "lora.r,", "train.learning_rate"]),
    ("lora", "choice(4,8)", ["space.lora: unknown parameter path 'lora'"]),
    ("lora.r", "choice(4,", ["space.lora.r: cannot parse 'choice(4,'"]),
    ("lora.r", "choice(4,4)", ["space.lora.r: 'choice(4,4)' repeats a choice"]),
    ("lora.r", "range(8,4)", ["space.lora.r: 'range(8,4)' is empty"]),
    ("train.learning_rate", "tag(log, interval(0, 1e-3))", ["space.train.learning_rate", "low must be > 0"]),
    ("train.learning_rate", "tag(logg, interval(1e-5, 1e-3))", ["space.train.learning_rate", "unknown tag(s) ['logg']"]),
    ("lora.lora_dropout", "interval(0.1, 0.1)", ["space.lora.lora_dropout", "low=0.1, high=0.1"]),
])
def test_bad_space_expression_names_the_path(make_config, path, expr, expected):
    config = make_config({path: expr})
    with pytest.raises(ConfigError) as err:
        SearchSpace(config)
    for part in expected:
        assert part in str(err.value)


def test_unknown_variant_lists_the_defined_ones(make_config):
    config = make_config({"variant": "choice(small, huge)"}, variants=VARIANTS)
    with pytest.raises(ConfigError) as err:
        SearchSpace(config)
    assert str(err.value) == "space.variant: unknown variant(s) ['huge']; defined: ['small', 'wide']."


def test_variant_without_variants_section(make_config):
    with pytest.raises(ConfigError, match=r"space\.variant: unknown variant\(s\) \['small'\]; defined: none"):
        SearchSpace(make_config({"variant": "choice(small)"}))


def test_variant_must_be_a_choice(make_config):
    with pytest.raises(ConfigError, match=r"space\.variant: variants are names; use choice"):
        SearchSpace(make_config({"variant": "interval(0, 1)"}, variants=VARIANTS))
