"""Live progress on a terminal vs plain lines elsewhere; readable MLflow run names; `report` argv."""

from __future__ import annotations

import io
import logging

from lora_sweep.cli import normalise_argv
from lora_sweep.run.objective import run_name
from lora_sweep.run.progress import LiveProgress, Progress, progress_for
from lora_sweep.search.space import SearchSpace


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_progress_when_output_is_not_a_terminal():
    assert type(progress_for(4, 2, "eval_accuracy", "maximize", io.StringIO())) is Progress
    assert type(progress_for(4, 2, "eval_accuracy", "maximize", _Tty())) is LiveProgress


def test_live_progress_shows_trials_epoch_best_and_eta():
    out = _Tty()
    with progress_for(2, 2, "eval_accuracy", "maximize", out) as p:
        p.trial_started(0, "r=8")
        logging.getLogger("lora_sweep").warning("a log line goes above the bar")
        p.epoch_done(1)
        p.bar.refresh()
        mid = out.getvalue()
        p.epoch_done(2)
        p.trial_finished(0.875, "r=8")
        p.trial_started(1, "r=4")
        p.trial_finished()  # a failed trial: its two epochs count as done, the best stays
        p.bar.refresh()
    text = out.getvalue()
    assert "0/2 trials" in mid and "trial 0 (r=8) epoch 2/2" in mid and "ETA 0:00:0" in mid
    assert "a log line goes above the bar" in text
    assert "2/2 trials" in text and "best: r=8 eval_accuracy=87.5%" in text
    assert p.best == (0.875, "r=8")


def test_run_names_read_like_the_configuration(make_config):
    space = SearchSpace(make_config({"lora.r": "choice(4, 16)", "train.seed": "choice(1, 2)"}))
    assert run_name(space.point({"lora.r": 16, "train.seed": 2})) == "r=16 a=32 qkvo seed=2"
    space = SearchSpace(make_config({"lora.bias": "choice(none, all)", "lora.lora_dropout": "choice(0.0, 0.3)"}))
    assert run_name(space.point({"lora.bias": "all", "lora.lora_dropout": 0.3})) == "r=16 a=32 qkvo bias=all drop=0.3"
    guide = make_config({"variant": "choice(q, b)"}, variants={
        "q": {"label": "Query-Only", "set": {"lora.target_modules": "query"}},
        "b": {"label": "Low Rank (r=4)", "set": {"lora.r": 4, "lora.lora_alpha": 8}}})
    assert run_name(SearchSpace(guide).point({"variant": "q"})) == "Query-Only: r=16 a=32 query"
    assert run_name(SearchSpace(guide).point({"variant": "b"})) == "Low Rank (r=4): r=4 a=8 qkvo"


def test_report_over_several_sweeps_from_the_command_line():
    assert normalise_argv(["report", "sweep=rank,bias"]) == ["mode=report", "+sweep=rank", "report.sweeps=[rank,bias]"]
    assert normalise_argv(["+sweep=rank"]) == ["+sweep=rank"]


def test_several_sweeps_only_in_report_mode(compose_cfg, tmp_path, capsys):
    from lora_sweep.cli import run

    cfg = compose_cfg(["+sweep=rank", "report.sweeps=[rank,bias]", f"paths.sweeps_dir={tmp_path / 'sweeps'}"])
    assert run(cfg) == 2
    assert "report.sweeps=['rank', 'bias']: several sweeps go into one report only in report mode" in \
        capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()
