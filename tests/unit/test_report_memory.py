"""The report's memory figures, from constructed trials (no training): the measured peak and the memory model's
prediction side by side in the table, their footnotes, configurations pruned as infeasible (predicted need above
train.memory_limit_mb) listed with that need and never called pruned by the pruner, and report.csv keeping the
resident-memory peak, the prediction, the limit and the reason."""

from __future__ import annotations

import optuna
import pandas as pd
from markdown_it import MarkdownIt
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from lora_sweep import report
from lora_sweep.record import TrialRecord
from lora_sweep.report import arms

DIST = {"lora.r": CategoricalDistribution([4, 8, 64])}
WHY = "predicted 1,234 MB > 1,000 MB allowed (train.memory_limit_mb)"


def memory_study(predicted: bool = True) -> optuna.Study:
    """r=4 and r=8 complete with measured and (predicted=True) predicted memory; r=64 infeasible, never trained."""
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("meta", {"eval_size": 200, "sampler": "grid", "space": {"lora.r": "choice(4, 8, 64)"},
                                 "model": "m", "data": "d", "train_size": 400, "max_length": 64, "device": "CPU"})
    for r, acc, peak, pred, rss in ((4, 0.80, 301.4, 310.0, 655.0), (8, 0.83, 322.6, 330.2, 690.5)):
        attrs = {"label": f"r={r}", "eval_accuracy": acc, "trainable_params": 1000 * r, "total_params": 100_000,
                 "trainable_pct": r, "peak_memory_mb": peak, "peak_rss_mb": rss, "epoch_time_s": 3.0,
                 "memory_kind": "cpu_peak_live_tensors_one_step" if predicted
                 else "cpu_peak_rss_above_trial_start_sampled",
                 "memory_limit_mb": 1000.0, "epochs": [{"eval_accuracy": acc}],
                 **({"predicted_memory_mb": pred} if predicted else {})}
        study.add_trial(optuna.trial.create_trial(params={"lora.r": r}, distributions=DIST, value=acc,
                                                  user_attrs=attrs))
    if predicted:
        study.add_trial(optuna.trial.create_trial(
            params={"lora.r": 64}, distributions=DIST, state=TrialState.PRUNED,
            user_attrs={"label": "r=64", "infeasible": WHY, "predicted_memory_mb": 1234.4, "memory_limit_mb": 1000.0}))
    return study


def table_rows(text: str) -> list[dict]:
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    cells = [t.content for t in tokens if t.type == "inline"]
    start = cells.index("Configuration")
    width = next(i for i, c in enumerate(cells[start:]) if c == "Trial") + 1
    header, body = cells[start:start + width], cells[start + width:start + 3 * width]
    return [dict(zip(header, body[i:i + width])) for i in range(0, len(body), width)]


def test_table_shows_measured_and_predicted_memory_and_lists_the_infeasible_configuration(make_config):
    config = make_config({"lora.r": "choice(4, 8, 64)"})
    text = report.write_report(config, memory_study()).read_text()
    rows = table_rows(text)
    header = list(rows[0])
    assert header[header.index("Memory (MB)") + 1] == "Predicted (MB)"
    assert [(r["Configuration"], r["Memory (MB)"], r["Predicted (MB)"]) for r in rows] == [
        ("r=4", "301", "310"), ("r=8", "323", "330")]
    assert "most tensor bytes alive at once over one training step" in text
    assert "report.csv's peak_rss_mb holds the process's resident-memory peak above the trial's start" in text
    assert "_Predicted: the memory model's peak training memory" in text
    assert "2 complete, 1 pruned (1 infeasible, not trained)" in text
    assert "## Infeasible configurations" in text
    infeasible = text.split("## Infeasible configurations")[1].split("##")[0]
    assert "- r=64: predicted 1,234 MB, 1,000 MB allowed (trial #2)" in infeasible
    problems = text.split("## Trials without a result")[1]
    assert f"- trial 2 (r=64): **pruned**: infeasible, not trained: {WHY}" in problems
    assert "pruned after" not in problems


def test_report_csv_keeps_rss_prediction_limit_and_reason(make_config):
    config = make_config({"lora.r": "choice(4, 8, 64)"})
    md = report.write_report(config, memory_study())
    csv = pd.read_csv(md.parent / "report.csv").set_index("label")
    assert {"peak_memory_mb", "predicted_memory_mb", "peak_rss_mb", "infeasible", "memory_limit_mb"} <= set(csv)
    assert csv.loc["r=8", ["peak_memory_mb", "predicted_memory_mb", "peak_rss_mb"]].tolist() == [322.6, 330.2, 690.5]
    assert csv.loc["r=64", "infeasible"] == WHY and csv.loc["r=64", "memory_limit_mb"] == 1000.0
    assert csv.loc["r=64", "predicted_memory_mb"] == 1234.4 and pd.isna(csv.loc["r=64", "peak_memory_mb"])


def test_an_older_study_without_predictions_keeps_the_guide_columns(make_config):
    config = make_config({"lora.r": "choice(4, 8, 64)"})
    text = report.write_report(config, memory_study(predicted=False)).read_text()
    assert tuple(table_rows(text)[0]) == report.COLUMNS  # no all-n/a Predicted column
    assert "sampled every 10 ms" in text and "Predicted" not in text and "Infeasible" not in text


def test_an_infeasible_candidate_of_a_tuned_configuration_is_not_called_excluded():
    lr, dists = "train.learning_rate", {"lora.r": CategoricalDistribution([4]),
                                        "train.learning_rate": CategoricalDistribution([1e-3, 3e-3])}
    study = optuna.create_study(direction="maximize")
    for rate, acc in ((1e-3, 0.7), (3e-3, None)):
        attrs = TrialRecord(label=f"r=4, learning_rate={rate:g}", config={"lora.r": 4}, tuned={lr: rate},
                            trainable_params=4000, total_params=100_000, trainable_pct=4.0, eval_accuracy=acc,
                            infeasible="" if acc else WHY, predicted_memory_mb=None if acc else 1234.4,
                            memory_limit_mb=1000.0).to_user_attrs()
        study.add_trial(optuna.trial.create_trial(
            params={"lora.r": 4, lr: rate}, distributions=dists, value=acc, user_attrs=attrs,
            state=TrialState.COMPLETE if acc else TrialState.PRUNED))
    df = report.trials_frame(study)
    text = "\n".join(arms.section(df[df["status"] == "complete"], df, "eval_accuracy", "maximize"))
    assert "learning_rate=0.003: no validation figure, infeasible, not trained (#1)" in text
    assert "excluded" not in text
