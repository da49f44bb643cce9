"""The sweep at a glance on its MLflow parent run: series over the trial number, the recommended
configuration's figures, and the comparison table, held once across a resume."""

from __future__ import annotations

import pytest

from lora_sweep.run.sweep import run_sweep
from test_search_tiny import tiny_config  # noqa: F401
from test_trial_tiny import assets  # noqa: F401

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches")]


def test_parent_run_carries_the_series_and_one_table_across_a_resume(tiny_config):  # noqa: F811
    import mlflow
    from mlflow.tracking import MlflowClient

    from lora_sweep import record

    space, train = {"lora.r": "choice(2, 4, 8)"}, {"num_train_epochs": 1}
    config = tiny_config(space, {"name": "glance", "sampler": "random", "n_trials": 2}, train=train)
    study = run_sweep(config)
    client = MlflowClient(tracking_uri=config.tracking_uri)
    parent = record.parent_run_id(study)
    steps = lambda key: [(m.step, m.value) for m in client.get_metric_history(parent, key)]  # noqa: E731
    values = {t.number: t.user_attrs["eval_accuracy"] for t in study.trials}
    assert steps("sweep/eval_accuracy") == sorted(values.items())
    assert steps("sweep/best_eval_accuracy") == [(0, values[0]), (1, max(values.values()))]
    metrics = client.get_run(parent).data.metrics
    low, high = metrics["recommended/eval_accuracy_ci_low"], metrics["recommended/eval_accuracy_ci_high"]
    assert low < metrics["recommended/eval_accuracy"] < high
    assert metrics["recommended/trial"] in values

    def table():
        mlflow.set_tracking_uri(config.tracking_uri)
        return client.load_table(client.get_run(parent).info.experiment_id, "comparison_table.json",
                                 run_ids=[parent])

    assert len(table()) == 2
    images = [a.path for a in client.list_artifacts(parent, "images")]
    assert any(p.startswith("images/accuracy_vs_trainable+step+2+") for p in images)

    # Resume with a budget of one more trial: the table holds each trial once, the series gain a step.
    config = tiny_config(space, {"name": "glance", "sampler": "random", "n_trials": 3}, train=train)
    study = run_sweep(config)
    assert record.parent_run_id(study) == parent and len(study.trials) == 3
    assert len(table()) == 3
    assert [s for s, _ in steps("sweep/eval_accuracy")] == [0, 1, 2]
    assert [s for s, _ in steps("sweep/best_eval_accuracy")] == [0, 1, 2]
