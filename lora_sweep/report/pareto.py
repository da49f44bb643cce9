"""The Pareto front of a multi-objective sweep: printed at the end and stored beside the report.

Optuna computes the front (Study.best_trials: complete trials that no other complete trial beats on
every objective); this module names the objectives, stores the front as reports/<sweep>/pareto.csv
and as the study's `pareto_front` user attribute, and formats it for the terminal.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd

from lora_sweep import record
from lora_sweep.config import Config

_SHOW = {"eval_accuracy": ("Accuracy", lambda v: f"{100 * v:.1f}%"), "eval_f1": ("F1", lambda v: f"{v:.4f}"),
         "eval_loss": ("Eval loss", lambda v: f"{v:.4f}"), "trainable_pct": ("Trainable %", lambda v: f"{v:.3f}%"),
         "peak_memory_mb": ("Memory (MB)", lambda v: f"{v:,.1f}"),
         "epoch_time_s": ("Time (s per epoch)", lambda v: f"{v:.1f}")}


def pareto_frame(config: Config, study: optuna.Study) -> pd.DataFrame:
    """One row per Pareto-optimal trial: trial number, label, each objective, the params."""
    names = config.study.objectives
    rows = []
    for t in study.best_trials:
        row = {"trial": t.number, "label": record.TrialRecord.from_trial(t).label}
        row.update(dict(zip(names, t.values)))
        row.update({f"param.{k}": v for k, v in t.params.items()})
        rows.append(row)
    df = pd.DataFrame(rows, columns=["trial", "label", *names] if not rows else None)
    if len(df):
        df = df.sort_values(names[0], ascending=config.study.directions[0] == "minimize", kind="stable")
    return df.reset_index(drop=True)


def store(config: Config, study: optuna.Study) -> tuple[pd.DataFrame, Path]:
    df = pareto_frame(config, study)
    config.report_dir.mkdir(parents=True, exist_ok=True)
    path = config.report_dir / "pareto.csv"
    df.to_csv(path, index=False)
    record.set_pareto_front(study, df["trial"])
    return df, path


def format_front(config: Config, df: pd.DataFrame) -> str:
    names = config.study.objectives
    wants = ", ".join(f"{'max' if d == 'maximize' else 'min'} {n}" for n, d in zip(names, config.study.directions))
    if not len(df):
        return f"Pareto front ({wants}): no complete trials."
    table = pd.DataFrame({"Trial": df["trial"], "Configuration": df["label"],
                          **{_SHOW[n][0]: df[n].map(_SHOW[n][1]) for n in names}})
    return f"Pareto front ({wants}): {len(df)} trial(s) no other trial beats on every objective\n" \
           + table.to_markdown(index=False)
