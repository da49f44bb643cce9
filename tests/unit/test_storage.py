"""Storage choice, the grid queue, orphaned trials, worker slots and password redaction (real
SQLite and journal files; the PostgreSQL path runs in tests/integration/test_workers.py)."""

from __future__ import annotations

import logging

import optuna
import pytest
from optuna.trial import TrialState

from lora_sweep.config import urls
from lora_sweep.search import storage
from lora_sweep.config import ConfigError
from lora_sweep.search.space import SearchSpace
from lora_sweep.search.study import QueueEmpty, create_study, fail_orphans, queue_study, resume
from lora_sweep.run.workers import Slot, plan, visible_gpus, worker_args

optuna.logging.set_verbosity(optuna.logging.ERROR)
# The queue tests ask() by hand, as Study.optimize does inside; Optuna warns about that with heartbeats.
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
GRID4 = {"lora.r": "choice(4,8,16,32)"}


@pytest.mark.parametrize("text, expected", [
    ("postgresql://lora:s3cret@db:5432/optuna", "postgresql://lora:***@db:5432/optuna"),
    ("cmd study.storage=postgresql+psycopg://u:p%40ss@h/db x", "cmd study.storage=postgresql+psycopg://u:***@h/db x"),
    ("http://user:pw@mlflow:5000 and postgresql://lora@db/optuna", "http://user:***@mlflow:5000 and "
                                                                   "postgresql://lora@db/optuna"),
    ("postgresql://db/optuna?password=hunter2&sslmode=require", "postgresql://db/optuna?password=***&sslmode=require"),
    ("sqlite:////tmp/study.db", "sqlite:////tmp/study.db"),
])
def test_redact_hides_passwords_in_urls(text, expected):
    assert urls.redact(text) == expected


def test_log_lines_are_redacted(caplog):
    logger = logging.getLogger("lora_sweep.test_redact")
    caplog.handler.addFilter(urls.RedactFilter())
    with caplog.at_level(logging.INFO):
        logger.info("storage %s", "postgresql://lora:topsecret@db/optuna")
    assert "topsecret" not in caplog.text and "lora:***@db" in caplog.text


def test_storage_defaults_sqlite_for_one_worker_and_journal_for_several(make_config, tmp_path):
    one = make_config(GRID4, study={"name": "s"})
    assert one.storage_url == f"sqlite:///{tmp_path / 'sweeps' / 's' / 'study.db'}"
    many = make_config(GRID4, study={"name": "s", "workers": 2})
    assert many.storage_url == f"journal:///{tmp_path / 'sweeps' / 's' / 'study.journal'}"
    assert make_config(GRID4, study={"workers": "auto"}).storage_url.startswith("journal:///")
    pg = make_config(GRID4, study={"workers": 4, "storage": "postgresql://lora@db/optuna"})
    assert pg.storage_url == "postgresql://lora@db/optuna"


@pytest.mark.parametrize("study, match", [
    ({"workers": 2, "storage": "sqlite:///x.db"}, r"study.storage='sqlite:///x.db' is SQLite, which parallel"),
    ({"workers": 0}, r"study.workers must be an integer >= 1 or auto.*got study.workers=0"),
    ({"workers": "many"}, r"study.workers=.many."),
    ({"heartbeat_interval": 10, "grace_period": 5}, r"study.grace_period must be .* > study.heartbeat_interval \(10\)"),
    ({"storage": "postgresql:/x"}, r"study.storage must be sqlite:///PATH"),
    ({"storage": "mysql://u:pw@h/db", "max_retry": -1}, r"study.max_retry must be an integer >= 0"),
])
def test_bad_study_settings_are_config_errors(make_config, study, match):
    with pytest.raises(ConfigError, match=match):
        make_config(GRID4, study=study)


def test_config_errors_never_show_a_password(make_config):
    with pytest.raises(ConfigError) as e:
        make_config(GRID4, study={"workers": 2, "storage": "sqlite://user:hunter2@/x.db"})
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize("url_kind", ["sqlite", "journal"])
def test_two_workers_popping_one_queue_never_share_a_point(make_config, url_kind):
    workers = 1 if url_kind == "sqlite" else 2
    config = make_config(GRID4, study={"name": f"queue-{url_kind}", "workers": workers})
    space = SearchSpace(config)
    first, second = create_study(config, space), create_study(config, space)
    assert resume(config, space, first) == 4
    assert resume(config, space, second) == 4  # a second worker's resume queues nothing more
    assert len(first.get_trials(states=(TrialState.WAITING,))) == 4

    a, b = queue_study(first), queue_study(second)
    seen = []
    for study in (a, b, a, b):  # interleaved asks, as two processes would
        trial = study.ask()
        seen.append(space.suggest(trial).values["lora.r"])
        study.tell(trial, 0.5)
    assert sorted(seen) == [4, 8, 16, 32]
    for study in (a, b):
        with pytest.raises(QueueEmpty):
            study.ask()
    assert len(first.trials) == 4  # an empty queue creates no surplus trial


def test_orphaned_running_trial_is_failed_and_queued_again(make_config):
    config = make_config(GRID4, study={"name": "orphans"})
    space = SearchSpace(config)
    study = create_study(config, space)
    resume(config, space, study)
    orphan = queue_study(study).ask()  # a worker took it, then died
    space.suggest(orphan)
    assert [t.number for t in study.get_trials(states=(TrialState.RUNNING,))] == [orphan.number]

    assert fail_orphans(study) == [orphan.number]
    failed = study.trials[orphan.number]
    assert failed.state == TrialState.FAIL and "worker died" in failed.user_attrs["error"]
    resume(config, space, study)
    waiting = [t.system_attrs["fixed_params"]["lora.r"] for t in study.get_trials(states=(TrialState.WAITING,))]
    assert sorted(waiting) == [4, 8, 16, 32]


def test_a_second_process_on_a_local_study_is_refused(make_config):
    config = make_config(GRID4, study={"name": "owned"})
    first = storage.OwnerLock(config)
    first.acquire()
    try:
        with pytest.raises(ConfigError, match="Another lora-sweep process is running sweep 'owned'"):
            storage.OwnerLock(config).acquire()
    finally:
        first.release()
    again = storage.OwnerLock(config)
    again.acquire()
    again.release()


def test_worker_slots_pin_gpus_or_split_cores():
    assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in plan("auto", ["3", "5"], [0, 1])] == ["3", "5"]
    cpu = plan(2, [], [0, 1, 2, 3, 4])
    assert [s.cores for s in cpu] == [(0, 1, 2), (3, 4)]
    assert cpu[1].env() == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    assert plan("auto", [], [0, 1]) == [Slot(0, cores=(0, 1))]
    with pytest.raises(ConfigError, match="study.workers=3 exceeds the 2 CPU core"):
        plan(3, [], [0, 1])
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,7"}) == ["2", "7"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_worker_args_replace_workers_and_storage():
    args = worker_args(["+sweep=rank", "study.workers=4", "study.storage=x", "train.seed=1"],
                       "journal:///tmp/s/study.journal")
    assert args == ["+sweep=rank", "train.seed=1", "study.workers=1", "study.trials_per_gpu=1", "study.storage='journal:///tmp/s/study.journal'"]
