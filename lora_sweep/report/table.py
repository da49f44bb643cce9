"""Stored results (the Optuna study) -> pandas -> reports/<sweep>/report.md + report.csv + plots.

The markdown table has the columns of the guide's "Applied Examples" table (seed 004), units in the
headers, one row per trial with its Pareto mark and trial number (instruction/chat data: exact match
with its count, chrF, eval loss, capped answers) and its footnotes (notes.py); findings (findings.py), the
recommendation, the held-out split, the config's claims (claims.py), sample generations (chat data), PNG plots
(plots.py) and the trials without a result (notes.py) follow.
Every figure comes from the trial's stored record and files beside the study (per-example results, sample
generations), so `python -m lora_sweep report +sweep=NAME` rebuilds it without training; publish() puts it
on the sweep's MLflow parent run.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import optuna
import pandas as pd

from lora_sweep import record
from lora_sweep.config import Config, ConfigError
import lora_sweep.report.arms as arms
import lora_sweep.report.claims as claims
from lora_sweep.report.budget import budget_column
from lora_sweep.report.frame import _eval_size, data_read, load_examples, load_samples, reported_frame, trials_frame
import lora_sweep.report.heldout as heldout
from lora_sweep.report.findings import (complete, compared, config_keys, noise, pareto_mask, pareto_sentence,
                                        param_importances, sweep_findings, verdict_of)
from lora_sweep.report.paired import TEXT_LIMIT, text_cell
from lora_sweep.report.forgetting import lines as forgetting_lines, plot as forgetting_plot
from lora_sweep.report.notes import infeasible_section, notes_lines, problems_section, shows_predicted
from lora_sweep.report.plots import TITLES, fresh_plots, write_plots
from lora_sweep.trial.precision import describe as describe_precision

log = logging.getLogger("lora_sweep")

def guide_table(df: pd.DataFrame, sweep_column: bool = False, metric: str = "eval_accuracy",
                direction: str = "maximize") -> pd.DataFrame:
    """The guide's columns, units in the headers, formatted for reading. Complete trials only (study.tune: Tuned)."""
    done = complete(df)
    pareto = pareto_mask(done) if len(done) else pd.Series(dtype=bool)
    if "eval_perplexity" in df:  # language models on plain text have perplexity but no accuracy
        done = df[(df["status"] == "complete") & (df["eval_accuracy"].notna() | df["eval_perplexity"].notna())]
        pareto = pareto.reindex(done.index, fill_value=False)
    table = pd.DataFrame({
        "Configuration": done["label"].map(_cell),
        "Accuracy (%)": done["eval_accuracy"].map(lambda v: "n/a" if pd.isna(v) else f"{100 * v:.1f}"),
        "95% CI": [_interval(r) for _, r in done.iterrows()],
        "Trainable params": done["trainable_params"].map(lambda v: f"{int(v):,}"),
        "Trainable (%)": done["trainable_pct"].map(lambda v: f"{v:.2f}"),
        "Memory (MB)": done["peak_memory_mb"].map(_mb),
        "Training time (s/epoch)": done["epoch_time_s"].map(lambda v: f"{v:.1f}" if pd.notna(v) else "n/a"),
        "Pareto": pareto.map(lambda p: "✓" if p else ""),
        "Trial": done["trial"].map(lambda n: f"#{n}"),
    })
    if "test_accuracy" in done and done["test_accuracy"].notna().any():  # data.test_size: the held-out split
        table.insert(table.columns.get_loc("95% CI") + 1, "Test (%)", done["test_accuracy"].map(
            lambda v: "n/a" if pd.isna(v) else f"{100 * v:.1f}"))
    if shows_predicted(done):  # the memory model's figure beside the measured one
        table.insert(table.columns.get_loc("Memory (MB)") + 1, "Predicted (MB)", done["predicted_memory_mb"].map(_mb))
    if "eval_perplexity" in done and done["eval_perplexity"].notna().any():  # CAUSAL_LM / SEQ_2_SEQ_LM
        table.insert(3, "Perplexity", done["eval_perplexity"].map(
            lambda v: "n/a" if pd.isna(v) else f"{v:.2f}"))
    if "eval_exact_match" in done and done["eval_exact_match"].notna().any():  # instruction/chat data
        table = _chat_columns(table, done)
    matched = budget_column(done)  # lora.param_budget: each row's LoRA parameters beside it
    if matched is not None:
        table.insert(table.columns.get_loc("Trainable params"), *matched)
    table = arms.tuned_column(table, done, df, metric, direction)
    if sweep_column:
        table.insert(0, "Sweep", done["sweep"].map(_cell))
    return table


def _chat_columns(table: pd.DataFrame, done: pd.DataFrame) -> pd.DataFrame:
    """Exact match with its count (matched/scored: eval_n, from the per-example results), chrF, answers capped
    at data.max_new_tokens (where recorded) and eval loss in place of accuracy and its interval."""
    def rate(row) -> str:
        v, n = row["eval_exact_match"], row.get("eval_n")
        if pd.isna(v):
            return "n/a"
        return f"{100 * v:.1f} ({round(v * n)}/{n})" if n is not None and pd.notna(n) and n else f"{100 * v:.1f}"

    def capped(row) -> str:
        k, n = row.get("answers_capped"), row.get("answers_generated")
        if k is None or pd.isna(k):
            return "n/a"
        return f"{int(k)}/{int(n)}" if n is not None and pd.notna(n) else f"{int(k)}"

    at = table.columns.get_loc("Accuracy (%)")
    table = table.drop(columns=["Accuracy (%)", "95% CI"])
    table.insert(at, "Exact match (%)", [rate(r) for _, r in done.iterrows()])
    table.insert(at + 1, "chrF", done["eval_chrf"].map(lambda v: "n/a" if pd.isna(v) else f"{v:.1f}"))
    if "answers_capped" in done and done["answers_capped"].notna().any():  # None in studies before it was counted
        table.insert(at + 2, "Capped", [capped(r) for _, r in done.iterrows()])
    if "eval_loss" in done and done["eval_loss"].notna().any():
        after = table.columns.get_loc("Perplexity") + 1 if "Perplexity" in table else at + 2
        table.insert(after, "Eval loss", done["eval_loss"].map(lambda v: "n/a" if pd.isna(v) else f"{v:.4f}"))
    return table


COLUMNS = ("Configuration", "Accuracy (%)", "95% CI", "Trainable params", "Trainable (%)", "Memory (MB)",
           "Training time (s/epoch)", "Pareto", "Trial")
_ALIGN = {"Configuration": "left", "Sweep": "left", "Tuned": "left", "Pareto": "center", "Trial": "right"}


def to_markdown(table: pd.DataFrame) -> str:
    """A GFM pipe table; numbers are already strings, right-aligned, and not re-parsed by tabulate."""
    align = [_ALIGN.get(c, "right") for c in table.columns]
    return table.to_markdown(index=False, tablefmt="pipe", disable_numparse=True, colalign=align)


def _interval(row) -> str:
    low, high = row.get("eval_accuracy_ci_low"), row.get("eval_accuracy_ci_high")
    return "n/a" if low is None or high is None or pd.isna(low) or pd.isna(high) else f"{100 * low:.1f}–{100 * high:.1f}"


def _mb(v) -> str:
    return f"{v:,.0f}" if pd.notna(v) else "n/a"


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _precision_fact(study: optuna.Study, df: pd.DataFrame) -> str:
    """', bf16 chosen: 1.7x faster than fp32 at 32x128' (auto's stored decision), else what the trials
    recorded (', bf16'); '' for studies from versions that recorded neither."""
    decision = record.precision(study)
    if decision:
        return f", {describe_precision(decision)}"
    used = sorted({p for p in df.get("precision", pd.Series(dtype=object)).dropna() if p})
    return f", {' / '.join(used)}" if used else ""


def _facts(config: Config, study: optuna.Study, df: pd.DataFrame) -> list[tuple[str, str]]:
    meta = record.meta(study)
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    return [
        ("Model", f"`{meta.get('model', config.base.model.name_or_path)}`"),
        ("Data", f"`{meta.get('data', config.base.data.name_or_path)}`, "
                 + (f"labels {meta.get('labels', '?')}, " if meta.get("labels", "?") != [] else "")
                 + f"{meta.get('train_size', '?')} train / {meta.get('eval_size', '?')} eval"
                 + (f" / {meta['test_size']} held-out test" if meta.get("test_size") else "") + " examples, "
                 f"max_length {meta.get('max_length', '?')}" + data_read(study)),
        ("Task", meta.get("task_type", config.base.lora.task_type)),
        ("Device", meta.get("device", "?") + _precision_fact(study, df)),
        ("Date", meta.get("date", "?")),
        ("Search", f"{meta.get('sampler', '?')} over "
                   + (", ".join(f"`{k}: {v}`" for k, v in meta.get("space", {}).items()) or "the base config")),
        ("Trials", ", ".join(f"{v} {k}" + _infeasible_count(df, k) for k, v in counts.items()) or "none yet"),
        ("Command", f"`{meta.get('command', '')}`"),
        ("MLflow", f"experiment `{meta.get('experiment_name', config.experiment_name)}` at "
                   f"`{meta.get('tracking_uri', config.tracking_uri)}`"),
        ("Versions", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
         + f"; git {meta.get('git_commit', '?')}"),
    ]


def _infeasible_count(df: pd.DataFrame, status: str) -> str:
    """' (2 infeasible, not trained)' after the pruned count: Optuna prunes them, but no pruner stopped them."""
    n = int((df["infeasible"].fillna("") != "").sum()) if status == "pruned" and "infeasible" in df else 0
    return f" ({n} infeasible, not trained)" if n else ""


def markdown(config: Config, study: optuna.Study, df: pd.DataFrame, plots: list[Path] = (),
             examples: dict | None = None, samples: dict | None = None) -> str:
    lines = [f"# LoRA sweep: {config.study.name}", ""]
    lines += [f"- **{k}**: {v}" for k, v in _facts(config, study, df)]
    lines += ["", "## Results", ""]
    table = guide_table(df, metric=config.study.metric, direction=config.study.direction) if len(df) else pd.DataFrame()
    lines.append(to_markdown(table) if len(table) else "_No complete trials yet._")
    lines += ["", *notes_lines(df, config.base.data.max_new_tokens)]
    done = complete(df)
    lines += ["", "## Findings", ""]
    examples = load_examples(config.study_dir, df) if examples is None else examples
    pv = verdict_of(df, examples, config.study.metric, config.study.direction)  # once: findings, pick, test
    found = sweep_findings(df, _eval_size(study), param_importances(study, config.study.metric), examples,
                           config.study.metric, config.study.direction, verdict=pv)
    if len(done):
        found.insert(len(found) - 1, pareto_sentence(done, pareto_mask(done)))
    lines += [f"- {f}" for f in found]
    from lora_sweep.report.recommend import section  # the confirmation stage, then the one recommendation

    samples = load_samples(config.study_dir, df) if samples is None else samples
    # The sections after the findings, in this order; each is [] when it has nothing to say.
    sections = [
        arms.section(compared(df, config.study.metric), df, config.study.metric, config.study.direction),  # study.tune
        section(config, study, pv=pv),                      # the confirmation stage, then the recommendation
        heldout.section(held_out(config, df, pv)),          # data.test_size
        claims.report_section(config, df, examples),        # claims: published claims, checked
        samples_section(df, samples, config.study.metric),  # instruction/chat data
        forgetting_lines(df, config.study_dir),             # CAUSAL_LM: data.retention_size
        plots_section(plots),
        infeasible_section(df),                             # train.memory_limit_mb: never trained
        problems_section(df),
    ]
    for part in sections:
        lines += part
    lines.append("")
    return "\n".join(lines)


SAMPLE_ROWS = 3  # sample generations shown per configuration


def samples_section(df: pd.DataFrame, samples: dict, metric: str) -> list[str]:
    """A few generated answers per configuration (its chosen candidate's first run with some), beside their prompt and
    reference: what the exact-match and chrF figures are made of."""
    from lora_sweep.trial.metrics import exact_match

    done = compared(df, metric) if len(df) else df
    done = done[arms.represents(done, metric) & done["trial"].astype(int).isin(samples)] if len(done) else done
    if not len(done):
        return []
    lines = ["", "## Sample generations", "",
             f"The first {SAMPLE_ROWS} eval examples each configuration generated an answer for (greedy, at its last "
             "generation; one run per configuration). Prompts show their end (the turn answered), every text at most "
             f"{TEXT_LIMIT} characters; Match: the normalised exact match that Exact match counts.", ""]
    for _, runs in done.groupby(config_keys(done), sort=False):
        first = runs.iloc[0]
        shown = samples[int(first["trial"])].head(SAMPLE_ROWS)
        lines += [f"**{_cell(first['label'])}** (trial #{int(first['trial'])})", "",
                  "| Prompt | Reference | Answer | Match |", "|:--|:--|:--|:-:|"]
        lines += [f"| {text_cell(r.prompt, keep_end=True)} | {text_cell(r.reference)} | {text_cell(r.output)} | "
                  f"{'✓' if exact_match(str(r.output), str(r.reference)) else '✗'} |" for r in shown.itertuples()]
        lines.append("")
    return lines[:-1]


def held_out(config: Config, df: pd.DataFrame, pv):
    """The search's paired verdict `pv` (findings.verdict_of) repeated on the test split (heldout.Repeat),
    None without it or without test results."""
    tests = heldout.load_test_examples(config.study_dir, df) if pv is not None else {}
    return heldout.repeat(pv, df, tests) if tests else None


def plots_section(plots) -> list[str]:
    if not plots:
        return []
    lines = ["", "## Plots", ""]
    for p in plots:
        lines += [f"![{TITLES[p.name]}]({p.name})", ""]
    return lines[:-1]


def write_report(config: Config, study: optuna.Study | None = None) -> Path | None:
    """Write reports/<name>/report.md, report.csv and the plots; returns the markdown path."""
    if study is None:
        from lora_sweep.search.study import load_study

        study = load_study(config)
    df, examples = reported_frame(config.study_dir, study)
    out = config.report_dir
    out.mkdir(parents=True, exist_ok=True)
    done = complete(df)
    nz = noise(done, _eval_size(study))
    plots = fresh_plots(out, lambda: [*write_plots(done, pareto_mask(done), out, study, config.study.metric,
                                                    noise_sd=nz.sd if nz else None),
                                      *filter(None, [forgetting_plot(df, out, config.study.metric)])])
    return write_files(out, markdown(config, study, df, plots, examples), df)


def write_files(out: Path, text: str, df: pd.DataFrame) -> Path:
    md = out / "report.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(md)  # a reader never sees half a report
    csv = df.assign(epochs=df["epochs"].map(lambda v: json.dumps(v, separators=(",", ":"), default=str))) \
        if "epochs" in df else df  # the curves too, as JSON
    if len(df):
        csv = csv.assign(pareto=False)
        done = complete(df)
        csv.loc[done.index, "pareto"] = pareto_mask(done)
    csv.to_csv(out / "report.csv", index=False)
    return md


def artifacts(md: Path) -> list[Path]:
    """What a report consists of: the markdown, the csv and its plots (for MLflow)."""
    return [p for p in (md, md.parent / "report.csv", *(md.parent / n for n in TITLES)) if p.exists()]


def description(md: Path) -> str:
    """The report for an MLflow run's description: images cannot resolve there, so they become a
    pointer to the run's artifacts."""
    text = md.read_text()
    text = re.sub(r"\n## Plots\n(?:\n|!\[[^\n]*\n)*", "\n## Plots\n\nSee this run's artifacts, folder `report/`.\n\n",
                  text)
    return text


def publish(config: Config, study: optuna.Study, md: Path, tracker=None) -> None:
    """The report on the sweep's parent MLflow run: its description, and (tracking.log_artifacts)
    report.md, report.csv and the plots under artifacts report/. A report rebuilt later updates
    the same run. MLflow being unreachable costs the upload, not the report."""
    from lora_sweep.tracking import Tracker

    parent = record.parent_run_id(study)
    if parent is None:
        return
    try:
        tracker = tracker or Tracker(config.tracking_uri, config.experiment_name)
        tracker.describe(parent, description(md))
        from lora_sweep.report.mlflow_view import publish_view  # series, recommendation, table, images

        table = guide_table(reported_frame(config.study_dir, study)[0], False, config.study.metric, config.study.direction)
        publish_view(config, study, md, tracker, parent, table)
        if config.tracking.log_artifacts:
            for path in artifacts(md):
                tracker.log_artifact(parent, path, "report")
    except Exception as e:
        log.warning("Report written, but not attached to MLflow run %s at %s: %s", parent,
                    config.tracking_uri, e)


def summary(config: Config, study: optuna.Study) -> str:
    df, examples = reported_frame(config.study_dir, study)
    table = guide_table(df, metric=config.study.metric, direction=config.study.direction) if len(df) else pd.DataFrame()
    best = test = ""
    done = df[df["status"] == "complete"]
    if len(done):
        from lora_sweep.report.confirm import test_summary, verdict
        from lora_sweep.report.recommend import recommend  # the one pick; export uses it too

        metric = config.study.metric
        v = verdict(config, study)  # both verdicts once: the pick and the held-out line read them
        pv = verdict_of(df, examples, metric, config.study.direction)
        chosen = recommend(config, study, v=v, pv=pv)
        picks = done.index[done["trial"] == chosen.trial.number] if chosen is not None else []
        value = done.loc[picks[0], metric] if len(picks) else math.nan
        best = (f"Recommended: {done.loc[picks[0], 'label']}, trial #{chosen.trial.number} ({metric}={value:.4f}): "
                f"{chosen.how}\n" if not math.isnan(value) else "")
        test = test_summary(v) or heldout.summary_line(held_out(config, df, pv))
    from lora_sweep.report.mlflow_view import browse_line

    return "\n".join([
        "", to_markdown(table) if len(table) else "No complete trials.", "", best + (f"{test}\n" if test else "")
        + f"Report: {config.report_dir / 'report.md'} (and report.csv)",
        browse_line(config, study),
    ])


def check_exists(config: Config) -> None:
    """Report mode on a sweep that never ran: say so, and create nothing."""
    stored = [config.study_dir / "study.db", config.study_dir / "study.journal"]  # one worker / several
    if config.study.storage is None and not any(p.exists() for p in stored):
        raise ConfigError(f"No results for sweep {config.study.name!r}: {config.study_dir / 'study.db'} does not "
                          f"exist. Run it first: python -m lora_sweep +sweep={config.study.name} (or the sweep you named "
                          f"study.name={config.study.name}), or give the paths.sweeps_dir / study.storage it used")
