"""Stored results (the Optuna study) -> pandas -> reports/<sweep>/report.md + report.csv.

The markdown table has the columns of the guide's "Applied Examples" table (seed 004), one row per
trial; every figure comes from the trial's stored record, so `python -m lora_sweep report
+sweep=NAME` rebuilds it without training.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from lora_sweep.config import Config, ConfigError

COLUMNS = ("Configuration", "Accuracy", "Parameters (trainable %)", "Memory (MB)",
           "Training Time (s per epoch)")
_STATUS = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
           TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial with every stored figure, in trial order."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        row = {"trial": t.number, "label": ua.get("label", ""), "status": _STATUS.get(t.state, t.state.name),
               "error": ua.get("error", t.system_attrs.get("fail_reason", "")) if t.state == TrialState.FAIL
               else "", "pruned_at_epoch": ua.get("pruned_at_epoch"), "device": ua.get("device", "")}
        for key in ("eval_accuracy", "eval_f1", "eval_loss", "train_loss", "trainable_params", "total_params",
                    "trainable_pct", "peak_memory_mb", "epoch_time_s", "adapter_size_mb", "train_seconds"):
            row[key] = ua.get(key)
        row["memory_kind"] = ua.get("memory_kind", "")
        row.update({f"param.{k}": v for k, v in t.params.items()})
        row["mlflow_run_id"] = ua.get("mlflow_run_id", "")
        rows.append(row)
    df = pd.DataFrame(rows)
    return ordered(df, study) if len(df) else df


def ordered(df: pd.DataFrame, study: optuna.Study) -> pd.DataFrame:
    """Rows in the order the space lists its values (r=4, 8, 16, 32), not the sampler's order."""
    dists = {}
    for t in study.get_trials(deepcopy=False):
        dists.update(t.distributions)
    keys = []
    for path, d in dists.items():
        col = f"param.{path}"
        if col in df:
            if isinstance(d, optuna.distributions.CategoricalDistribution):
                order = {c: i for i, c in enumerate(d.choices)}
                df = df.assign(**{f"_order.{path}": df[col].map(order)})
                keys.append(f"_order.{path}")
            else:
                keys.append(col)
    if not keys:
        return df
    return df.sort_values(keys + ["trial"], kind="stable").drop(
        columns=[k for k in keys if k.startswith("_order.")])


def guide_table(df: pd.DataFrame) -> pd.DataFrame:
    """The guide's five columns, formatted for reading. Complete trials only."""
    done = df[df["status"] == "complete"]
    return pd.DataFrame({
        COLUMNS[0]: done["label"],
        COLUMNS[1]: done["eval_accuracy"].map(lambda v: f"{100 * v:.1f}%"),
        COLUMNS[2]: [f"{int(n):,} ({p:.2f}%)" for n, p in zip(done["trainable_params"], done["trainable_pct"])],
        COLUMNS[3]: done["peak_memory_mb"].map(lambda v: f"{v:,.1f}"),
        COLUMNS[4]: done["epoch_time_s"].map(lambda v: f"{v:.1f}"),
    })


def markdown(config: Config, study: optuna.Study, df: pd.DataFrame) -> str:
    meta = study.user_attrs.get("meta", {})
    n = len(df)
    counts = df["status"].value_counts().to_dict() if n else {}
    lines = [f"# LoRA sweep: {config.study.name}", ""]
    facts = [
        ("Model", f"`{meta.get('model', config.base.model.name_or_path)}`"),
        ("Data", f"`{meta.get('data', config.base.data.name_or_path)}`, labels {meta.get('labels', '?')}, "
                 f"{meta.get('train_size', '?')} train / {meta.get('eval_size', '?')} eval examples, "
                 f"max_length {meta.get('max_length', '?')}"),
        ("Device", meta.get("device", "?")),
        ("Date", meta.get("date", "?")),
        ("Search", f"{meta.get('sampler', '?')} over "
                   + (", ".join(f"`{k}: {v}`" for k, v in meta.get("space", {}).items()) or "the base config")),
        ("Trials", ", ".join(f"{v} {k}" for k, v in counts.items()) or "none yet"),
        ("Command", f"`{meta.get('command', '')}`"),
        ("MLflow", f"experiment `{meta.get('experiment_name', config.experiment_name)}` at "
                   f"`{meta.get('tracking_uri', config.tracking_uri)}`"),
        ("Versions", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
         + f"; git {meta.get('git_commit', '?')}"),
    ]
    lines += [f"- **{k}**: {v}" for k, v in facts]
    lines.append("")
    table = guide_table(df) if n else pd.DataFrame(columns=COLUMNS)
    lines.append(table.to_markdown(index=False) if len(table) else "_No complete trials yet._")
    lines.append("")
    kinds = sorted(set(df.get("memory_kind", pd.Series(dtype=str)).dropna()) - {""}) if n else []
    notes = ["Accuracy: eval accuracy after the last epoch.",
             "Parameters: trainable parameters as peft counts them (LoRA weights plus the classifier "
             "head that peft trains in full), and their share of all parameters.",
             "Training Time: mean seconds per epoch of training, evaluation excluded."]
    if kinds:
        notes.append("Memory: " + "; ".join(_MEMORY_NOTES.get(k, k) for k in kinds) + ".")
    lines += [f"_{note}_  " for note in notes]
    problems = df[df["status"].isin(["failed", "pruned"])] if n else df
    if len(problems):
        lines += ["", "## Trials without a result", ""]
        for _, row in problems.iterrows():
            why = row["error"] if row["status"] == "failed" else f"pruned after epoch {row['pruned_at_epoch']}"
            lines.append(f"- trial {row['trial']} ({row['label']}): **{row['status']}**: {why}")
    lines.append("")
    return "\n".join(lines)


_MEMORY_NOTES = {
    "cuda_max_allocated": "peak CUDA memory allocated by torch during the trial (counters reset per trial)",
    "cpu_peak_rss_above_trial_start_sampled": "peak resident memory of the process above its size at the "
    "trial's start (model copy, adapter, optimizer state, activations), sampled every 10 ms",
}


def write_report(config: Config, study: optuna.Study | None = None) -> Path | None:
    """Write reports/<name>/report.md and report.csv; returns the markdown path."""
    if study is None:
        from lora_sweep.study import load_study

        study = load_study(config)
    df = trials_frame(study)
    out = config.report_dir
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(markdown(config, study, df))
    tmp.replace(md)  # a reader never sees half a report
    df.to_csv(out / "report.csv", index=False)
    return md


def summary(config: Config, study: optuna.Study) -> str:
    df = trials_frame(study)
    table = guide_table(df)
    best = ""
    done = df[df["status"] == "complete"]
    if len(done):
        metric = config.study.metric
        pick = done[metric].idxmax() if config.study.direction == "maximize" else done[metric].idxmin()
        value = done.loc[pick, metric]
        best = f"Best: {done.loc[pick, 'label']} ({metric}={value:.4f})\n" if not math.isnan(value) else ""
    store = config.tracking_uri
    return "\n".join([
        "", table.to_markdown(index=False) if len(table) else "No complete trials.", "", best
        + f"Report: {config.report_dir / 'report.md'} (and report.csv)",
        f"MLflow: experiment {config.experiment_name!r}; browse with: mlflow ui --backend-store-uri {store}",
    ])


def check_exists(config: Config) -> None:
    """Report mode on a sweep that never ran: say so, and create nothing."""
    if config.study.storage is None and not (config.study_dir / "study.db").exists():
        raise ConfigError(f"No results for sweep {config.study.name!r}: {config.study_dir / 'study.db'} does not "
                          f"exist. Run it first: python -m lora_sweep +sweep={config.study.name}")
