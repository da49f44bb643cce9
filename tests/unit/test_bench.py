"""lora_sweep.bench: the committed benchmark text is what its stored result renders to; its arguments."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lora_sweep import bench

STORED = Path(__file__).resolve().parents[2] / "reports" / "bench" / "fp32"


def test_render_rebuilds_the_committed_text_from_its_json(tmp_path):
    shutil.copy(STORED / "bench.json", tmp_path / "bench.json")
    assert bench.main(["--render", str(tmp_path / "bench.json")]) == 0
    text = (tmp_path / "bench.md").read_text()
    assert text == (STORED / "bench.md").read_text()
    assert "**ratio 0.52**" in text and "4.8%" in text  # the figures the README quotes


@pytest.mark.parametrize("args", [[], ["missing.json"], ["a.json", "b.json"]])
def test_render_without_one_stored_result_says_what_to_give(args):
    with pytest.raises(SystemExit, match="expected one stored bench.json"):
        bench.main(["--render", *args])


@pytest.mark.parametrize("argv, expected", [
    ([], ["+sweep=rank"]),
    (["data.train_size=1000"], ["+sweep=rank", "data.train_size=1000"]),
    (["+sweep=bias", "train.num_train_epochs=1"], ["+sweep=bias", "train.num_train_epochs=1"]),
    (["sweep=bias"], ["sweep=bias"]),
])
def test_overrides_without_a_sweep_bench_the_default_rank_sweep(argv, expected):
    assert bench.with_default_sweep(argv) == expected
    assert len(bench.grid_points(bench.compose(bench.with_default_sweep(argv)))) == (4 if expected[0] == "+sweep=rank" else 3)


def test_the_baseline_trains_with_the_sweeps_schedule_not_transformers_defaults(tmp_path):
    overrides = ["train.warmup_steps=0.1", "train.lr_scheduler_type=cosine", "train.max_grad_norm=0.5",
                 "train.gradient_accumulation_steps=2", "train.learning_rate=3e-4"]
    point = bench.grid_points(bench.compose(bench.with_default_sweep(overrides)))[0]
    spec = bench.baseline_spec(point, None, str(tmp_path))
    assert (spec["warmup_steps"], spec["lr_scheduler_type"], spec["max_grad_norm"],
            spec["gradient_accumulation_steps"], spec["learning_rate"]) == (0.1, "cosine", 0.5, 2, 3e-4)
