"""Stored results (an Optuna study) -> one pandas row per trial with every stored figure, plus each
accuracy's Wilson interval, the per-example results of the complete trials and (instruction/chat data)
their sample generations."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from lora_sweep import record
from lora_sweep.config.schema import lora_scale
from lora_sweep.report.compare import config_key
from lora_sweep.report.stats import wilson

_STATUS = {TrialState.COMPLETE: record.Status.COMPLETE.value, TrialState.PRUNED: record.Status.PRUNED.value,
           TrialState.FAIL: record.Status.FAILED.value, TrialState.RUNNING: record.Status.RUNNING.value,
           TrialState.WAITING: record.Status.WAITING.value}


# A trial failed by Optuna's heartbeat check: its worker died before it could say why.
_NO_REASON = "its worker stopped sending heartbeats (killed or lost); the trial was queued again"


# report.csv's columns before the searched params, in the order earlier versions wrote them; every
# other field of the trial's record (lora_sweep.record) follows, then the params, the MLflow run id
# and the epochs, so every stored figure reaches the csv.
_FIRST = ("eval_accuracy", "eval_f1", "eval_loss", "train_loss", "trainable_params", "total_params",
          "trainable_pct", "peak_memory_mb", "epoch_time_s", "adapter_size_mb", "train_seconds",
          "eval_perplexity", "memory_kind")
_LAST = ("mlflow_run_id", "epochs")


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial with every stored figure (each field of its TrialRecord), in trial order."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rec = record.TrialRecord.from_trial(t)
        fields = rec.row()
        row = {"trial": t.number, "label": rec.label, "status": _STATUS.get(t.state, t.state.name),
               "error": (rec.error or _NO_REASON) if t.state == TrialState.FAIL else "",
               "pruned_at_epoch": rec.pruned_at_epoch, "device": rec.device,
               "pruned_at": (f"{rec.pruned_at_unit or 'epoch'} {rec.pruned_at_step}"
                             if rec.pruned_at_step is not None else ""), "excluded": rec.excluded}
        row.update({k: fields[k] for k in _FIRST})
        row.update({k: v for k, v in fields.items() if k not in row and k not in _LAST})
        row["config"] = config_key(record.configuration(t.params, rec.tuned))  # nor the seed nor tuned values
        row["seed"] = t.params.get("train.seed", rec.params.get("seed"))
        row.update({f"param.{k}": v for k, v in t.params.items()})
        # study.metric at each evaluation it reported ({step: value}): a raced candidate's figures at each rung
        row["intermediate"] = json.dumps({str(k): v for k, v in sorted(t.intermediate_values.items())})
        row["mlflow_run_id"] = rec.mlflow_run_id
        row["epochs"] = rec.epochs
        rows.append(row)
    df = pd.DataFrame(rows)
    if not len(df):
        return df
    meta = record.meta(study)  # without per-example files, a classifier's accuracy is over eval_size examples
    n = _eval_size(study) if meta.get("task_type", "SEQ_CLS") == "SEQ_CLS" else None
    return with_intervals(ordered(df, study), {}, n)


def with_intervals(df: pd.DataFrame, examples: dict, eval_size: int | None = None) -> pd.DataFrame:
    """eval_n (examples the accuracy counts: from the trial's per-example file, else eval_size) and the
    accuracy's Wilson 95% interval (eval_accuracy_ci_low/high); lora_scale from the params where an
    older record lacks it."""
    def n_of(row):
        ex = examples.get(int(row["trial"]))
        if ex is not None:
            return int(ex["correct"].notna().sum()) or None
        return eval_size if pd.notna(row["eval_accuracy"]) else None

    def ci(row, side):
        n, acc = row["eval_n"], row["eval_accuracy"]
        return wilson(round(acc * n), n)[side] if pd.notna(n) and n and pd.notna(acc) else None

    out = df.copy()
    out["eval_n"] = pd.Series([n_of(r) for _, r in df.iterrows()], index=df.index, dtype="Int64")
    out["eval_accuracy_ci_low"] = [ci(r, 0) for _, r in out.iterrows()]
    out["eval_accuracy_ci_high"] = [ci(r, 1) for _, r in out.iterrows()]
    if "lora_scale" in out:
        out["lora_scale"] = [_scale(r) for _, r in out.iterrows()]
    return out


def _scale(row) -> float | None:
    if pd.notna(row["lora_scale"]):
        return float(row["lora_scale"])
    try:
        params = json.loads(row["params"]) if isinstance(row["params"], str) else row["params"]
        return lora_scale(params["r"], params["lora_alpha"], bool(params.get("use_rslora", False)))
    except (KeyError, TypeError, ValueError):
        return None


def scored_count(study_dir: Path, number: int) -> int | None:
    """The eval examples trial `number`'s accuracy counts, from its per-example file (a language model scores
    only the ones it generated); None without the file, or with nothing scored."""
    path = record.examples_path(study_dir, number)
    if not path.exists():
        return None
    return int(record.read_examples(path)["correct"].notna().sum()) or None


def load_examples(study_dir: Path, df: pd.DataFrame) -> dict:
    """Trial number -> per-example results, for the complete trials that stored them."""
    out = {}
    for t in df[df["status"] == "complete"]["trial"] if len(df) else []:
        path = record.examples_path(study_dir, int(t))
        if path.exists():
            out[int(t)] = record.read_examples(path)
    return out


def reported_frame(study_dir: Path, study: optuna.Study) -> tuple[pd.DataFrame, dict]:
    """The trials frame as the report shows it, with each rate's count (eval_n) and interval from the trials'
    per-example results; and those results (trial number -> frame)."""
    df = trials_frame(study)
    examples = load_examples(study_dir, df)
    if len(df):
        df = with_intervals(df, examples, _eval_size(study) if record.meta(study).get("task_type", "SEQ_CLS")
                            == "SEQ_CLS" else None)
    return df, examples


def data_read(study: optuna.Study) -> str:
    """How the first complete trial read its data (the same in every trial of a sweep): the encoding, malformed
    records set aside, rows data.labels left out; '' where none is recorded (Hub data, older studies)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return ""
    rec = record.TrialRecord.from_trial(min(done, key=lambda t: t.number))
    parts = [f"read as {rec.data_encoding}"] if rec.data_encoding else []
    bad = {k: int(v) for k, v in (rec.bad_rows or {}).items() if v}
    if bad:
        total = sum(bad.values())
        parts.append(f"{total} malformed record{'' if total == 1 else 's'} set aside: "
                     + ", ".join(f"{v} {k}" for k, v in bad.items()))
    if rec.rows_set_aside:
        parts.append(f"{rec.rows_set_aside} row{'' if rec.rows_set_aside == 1 else 's'} with other labels left out "
                     "by data.labels")
    return "".join(f"; {p}" for p in parts)


def samples_path(study_dir: Path, number: int, stage: str = "") -> Path:
    """Where trial `number` keeps its sample generations (instruction/chat data: prompt, reference, output of
    the first few generated eval examples), beside its per-example results, so a rebuilt report shows them."""
    return Path(study_dir, stage) / "samples" / f"trial-{int(number)}.parquet"


SAMPLE_COLUMNS = ("prompt", "reference", "output")


def write_samples(path: Path, frame: pd.DataFrame) -> Path:
    """Write a sample table (SAMPLE_COLUMNS, as text) to `path` (parquet), atomically."""
    missing = [c for c in SAMPLE_COLUMNS if c not in frame]
    if missing:
        raise ValueError(f"a sample table lacks the columns {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame[list(SAMPLE_COLUMNS)].astype("string").to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def load_samples(study_dir: Path, df: pd.DataFrame) -> dict:
    """Trial number -> its sample generations, for the complete trials that stored them (none before this
    version, nor on labelled data)."""
    out = {}
    for t in df[df["status"] == "complete"]["trial"] if len(df) else []:
        path = samples_path(study_dir, int(t))
        if path.exists():
            out[int(t)] = pd.read_parquet(path)[list(SAMPLE_COLUMNS)]
    return out


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


def _eval_size(study: optuna.Study) -> int | None:
    size = record.meta(study).get("eval_size")
    return int(size) if isinstance(size, (int, float)) else None
