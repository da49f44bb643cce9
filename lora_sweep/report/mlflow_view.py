"""The sweep at a glance in the MLflow UI: what its parent run carries beside the report.

- metric series over the trial number (MLflow step = Optuna trial number): each complete trial's
  study.metric (`sweep/<metric>`) and the best so far (`sweep/best_<metric>`);
- the recommended configuration's figures (`recommended/...`), with the Wilson 95% interval of its
  accuracy when the eval set's size is known, and after a confirmation stage its mean and sd over seeds;
- the comparison table as an MLflow table artifact (`comparison_table.json`), replaced at each
  publish so a resumed sweep holds each row once;
- the report's plots as MLflow images (key = plot name, step = complete trials so far);
- with study.tune, a `tuned_choice` tag on each candidate's child run: the chosen one says what it was
  chosen from on validation, the others which candidate their configuration chose instead.
"""

from __future__ import annotations

import math
from pathlib import Path

from optuna.trial import TrialState

from lora_sweep import record
from lora_sweep.config import Config
from lora_sweep.report.stats import wilson

TABLE_FILE = "comparison_table.json"
TUNED_TAG = "tuned_choice"


def series_names(metric: str) -> tuple[str, str]:
    return f"sweep/{metric}", f"sweep/best_{metric}"


def sweep_series(config: Config, study) -> dict[str, dict[int, float]]:
    """Each complete trial's study.metric and the best so far, keyed by trial number."""
    metric = config.study.metric
    each, best = series_names(metric)
    sign = 1 if config.study.direction == "maximize" else -1
    out: dict[str, dict[int, float]] = {each: {}, best: {}}
    top = None
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        value = record.TrialRecord.from_trial(t).figure(metric)
        if math.isnan(value):
            continue
        top = value if top is None else (max if sign > 0 else min)(top, value)
        out[each][t.number] = value
        out[best][t.number] = top
    return out


def recommended_figures(config: Config, study) -> dict[str, float]:
    """The recommended trial (the report's pick) as single-value metrics."""
    from lora_sweep.report.confirm import verdict
    from lora_sweep.report.recommend import recommend

    v = verdict(config, study)
    picked = recommend(config, study, v=v)
    if picked is None:
        return {}
    chosen = picked.trial
    rec = record.TrialRecord.from_trial(chosen)
    out = {"recommended/trial": float(chosen.number)}
    for name in dict.fromkeys((config.study.metric, "eval_accuracy", "trainable_params", "trainable_pct")):
        try:
            value = rec.figure(name)
        except KeyError:
            continue
        if not math.isnan(value):
            out[f"recommended/{name}"] = value
    mine = next((c for c in v.configs if c.trial == chosen.number), None) if v is not None and v.complete else None
    out["recommended/confirmed"] = float(mine is not None)
    if mine is not None:
        out.update({f"recommended/{config.study.metric}_seed_mean": mine.mean,
                    f"recommended/{config.study.metric}_seed_sd": mine.sd, "recommended/seeds": float(len(mine.values))})
    n = scored_n(config, study, chosen.number)
    accuracy = out.get("recommended/eval_accuracy")
    if accuracy is not None and isinstance(n, int) and n > 0:
        out["recommended/eval_accuracy_ci_low"], out["recommended/eval_accuracy_ci_high"] = wilson(round(accuracy * n), n)
    return out


def scored_n(config: Config, study, number: int) -> int | None:
    """The examples trial `number`'s accuracy counts: its scored per-example rows (a language model
    scores only the generated ones), else eval_size for a classifier, else unknown."""
    from lora_sweep.report.frame import scored_count

    if record.examples_path(config.study_dir, number).exists():
        return scored_count(config.study_dir, number)
    meta = record.meta(study)
    n = meta.get("eval_size")
    return n if meta.get("task_type", "SEQ_CLS") == "SEQ_CLS" and isinstance(n, int) else None


def publish_view(config: Config, study, md: Path, tracker, parent: str, table=None) -> None:
    """table: the report's comparison table (report.table.guide_table), one row per trial."""
    from lora_sweep.report.arms import run_tags
    from lora_sweep.report.frame import trials_frame
    from lora_sweep.report.plots import TITLES

    tracker.log_series(parent, sweep_series(config, study))
    figures = recommended_figures(config, study)
    if figures:
        tracker.log_metrics(parent, figures)
    if table is not None and len(table):
        tracker.log_table(parent, table, TABLE_FILE)
    # every candidate's run, so a choice that changed with a resumed sweep leaves no stale tag behind
    for run_id, tag in run_tags(trials_frame(study), config.study.metric, config.study.direction).items():
        tracker.set_tags(run_id, {TUNED_TAG: tag})
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    for name in TITLES:
        path = md.parent / name
        if path.exists():
            tracker.log_image(parent, path, Path(name).stem, done)


def browse_line(config: Config, study, tracker=None) -> str:
    """The summary's MLflow line: the parent run's URL in the model-training view."""
    from lora_sweep.config.urls import redact
    from lora_sweep.tracking import DEFAULT_UI, Tracker, ui_base

    head = f"MLflow: experiment {config.experiment_name!r}"
    parent = record.parent_run_id(study)
    experiment_id = None
    if parent is not None:
        try:
            tracker = tracker or Tracker(config.tracking_uri, config.experiment_name)
            experiment_id = tracker.experiment_id
        except Exception:  # MLflow out of reach: the line without a URL
            pass
    base = ui_base(config.tracking_uri)
    if base is not None:
        url = ui_url_or_none(base, experiment_id, parent)
        return redact(f"{head}: {url}" if url else f"{head} at {base}")
    url = ui_url_or_none(DEFAULT_UI, experiment_id, parent)
    return (f"{head}; browse with: python -m lora_sweep ui sweep={config.study.name}"
            + (f" (or mlflow ui --backend-store-uri {config.tracking_uri}, then open {url})" if url else ""))


def ui_url_or_none(base: str, experiment_id: str | None, run_id: str | None) -> str | None:
    from lora_sweep.tracking import ui_url

    return ui_url(base, experiment_id, run_id) if experiment_id is not None else None
