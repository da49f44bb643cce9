"""The report's words around its table: the footnotes saying what each column measures (notes_lines), the
configurations never trained because the memory model said they would not fit (infeasible_section), and every
trial without a result with its reason (problems_section)."""

from __future__ import annotations

import pandas as pd

import lora_sweep.report.arms as arms
from lora_sweep.report.budget import NOTE as BUDGET_NOTE, budget_column
from lora_sweep.report.findings import complete


def shows_predicted(done: pd.DataFrame) -> bool:
    """Whether the table has a Predicted column: some shown trial has a prediction (older studies have none)."""
    return "predicted_memory_mb" in done and done["predicted_memory_mb"].notna().any()


def notes_lines(df: pd.DataFrame, max_new_tokens: int | None = None) -> list[str]:
    kinds = sorted(set(df.get("memory_kind", pd.Series(dtype=str)).dropna()) - {""}) if len(df) else []
    language_model = "eval_perplexity" in df and df["eval_perplexity"].notna().any()
    chat = "eval_exact_match" in df and df["eval_exact_match"].notna().any()
    notes = [*(_CHAT_NOTES if chat else _LM_NOTES if language_model else ["Accuracy: eval accuracy after the last epoch."]),
             "Trainable params: trainable parameters as peft counts them (LoRA weights plus any classifier "
             "head, which peft trains in full); Trainable (%): their share of all parameters.",
             "95% CI: the accuracy's Wilson 95% interval over the eval examples it counts (eval_n in report.csv).",
             *(["Test: accuracy on the held-out test split (data.test_size; test_n in report.csv), which nothing "
                "that chose a configuration read."] if "test_accuracy" in df and df["test_accuracy"].notna().any()
               else []),
             "Training time: mean seconds per epoch of training, evaluation excluded.",
             "Pareto: ✓ where no other row is both more accurate and trains a smaller share of parameters.",
             "Trial: the Optuna trial number (its MLflow run id is in report.csv)."]
    if chat:  # no accuracy: no Wilson interval, and the Pareto front (accuracy vs trainable %) stays empty
        notes = [n for n in notes if not n.startswith(("95% CI", "Pareto"))]
        if "answers_capped" in df and df["answers_capped"].notna().any():
            limit = f" ({max_new_tokens} tokens)" if max_new_tokens else ""
            notes.insert(2, f"Capped: generated answers that stopped at data.max_new_tokens{limit} before ending "
                            "their turn, of those generated; a capped answer is scored as it stands.")
    if len(df) and budget_column(complete(df)) is not None:
        notes.insert(2, BUDGET_NOTE)
    if kinds:
        notes.append("Memory: " + "; ".join(_MEMORY_NOTES.get(k, k) for k in kinds) + ".")
    if len(df) and shows_predicted(df[df["status"] == "complete"]):
        notes.append(PREDICTED_NOTE)
    return [f"_{note}_  " for note in notes]


def infeasible_section(df: pd.DataFrame) -> list[str]:
    """The configurations never trained because their predicted peak exceeds the memory a trial may use, each
    with that need and that limit ([] when there are none)."""
    if not len(df) or "infeasible" not in df:
        return []
    stopped = df[[bool(_text(r, "infeasible")) for _, r in df.iterrows()]]
    if not len(stopped):
        return []
    lines = ["", "## Infeasible configurations", "",
             "Never trained: the memory model predicted a peak above the memory a trial may use "
             "(train.memory_limit_mb, or the free GPU memory). A smaller train.per_device_train_batch_size or "
             "data.max_length lowers the need.", ""]
    for label, runs in stopped.groupby("label", sort=False):
        trials = ", ".join(f"#{int(t)}" for t in runs["trial"])
        lines.append(f"- {label}: predicted {_mb(runs['predicted_memory_mb'].max())} MB, "
                     f"{_mb(runs['memory_limit_mb'].min())} MB allowed (trial{'s' if len(runs) > 1 else ''} {trials})")
    return lines


def problems_section(df: pd.DataFrame) -> list[str]:
    problems = df[df["status"].isin(["failed", "pruned"])] if len(df) else df
    if not len(problems):
        return []
    lines = ["", "## Trials without a result", ""]
    for _, row in problems.iterrows():
        # an infeasible or excluded trial is Optuna-pruned but never trained: the pruner had no part in it
        why = (row["error"] if row["status"] == "failed"
               else f"infeasible, not trained: {_text(row, 'infeasible')}" if _text(row, "infeasible")
               else f"excluded, not trained: {row['excluded']}" if row["excluded"] else arms.why_stopped(row, df))
        lines.append(f"- trial {row['trial']} ({row['label']}): **{row['status']}**: {why}")
    return lines


def _text(row, name: str) -> str:
    value = row.get(name)
    return value if isinstance(value, str) else ""  # NaN where a combined frame's older study lacks the field


def _mb(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{value:,.0f}"


_LM_NOTES = ["Accuracy: share of eval examples (the first data.generate_size) whose greedily generated answer "
             "is exactly the label, after the last epoch; n/a on plain text.",
             "Perplexity: exp(eval_loss), the loss on the answer tokens only (every token on plain text)."]

_CHAT_NOTES = ["Exact match: share of eval examples (the first data.generate_size) whose greedily generated answer "
               "equals the reference after normalising both (punctuation removed, outer whitespace stripped, "
               "inner whitespace collapsed to one space, casefolded), at the last epoch (data.generate_at); "
               "(matched/scored): the answers that matched, of those generated and scored (eval_n in report.csv).",
               "chrF: sacrebleu's corpus chrF (0-100; character 6-grams, beta 2) of the same generated answers.",
               _LM_NOTES[1] + " Eval loss: that loss itself (mean per answer token over every eval example)."]

_MEMORY_NOTES = {
    "cuda_max_allocated": "peak CUDA memory allocated by torch during the trial (counters reset per trial)",
    "cpu_peak_live_tensors_one_step": "the most tensor bytes alive at once over one training step at the trial's "
    "largest batch shape, then one eval pass at its largest eval batch (weights, adapter, gradients, optimizer "
    "state, activations), counted op by op, outside the timed epoch (report.csv's peak_rss_mb holds the "
    "process's resident-memory peak above the trial's start, sampled every 10 ms)",
    "cpu_peak_rss_above_trial_start_sampled": "peak resident memory of the process above its size at the "
    "trial's start (model copy, adapter, optimizer state, activations), sampled every 10 ms",
}

PREDICTED_NOTE = ("Predicted: the memory model's peak training memory for the trial (weights, trainable parameters "
                  "with their gradients and optimizer state, activations at the largest batch shape, the eval "
                  "batch), computed before the trial trained.")
