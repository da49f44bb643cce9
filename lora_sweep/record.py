"""One trial's stored record, and the study's own stored attributes: the one place that knows their keys.

The objective writes a TrialRecord's fields as Optuna trial user attributes, as it goes (write():
a trial that dies midway keeps what it had); the report, findings, plots, Pareto front, combined
reports and the benchmarks read them back with TrialRecord.from_trial. The keys are the field names,
the same as every earlier version stored, so an older study still reads: a key it lacks reads as
the field's default (None for a figure), a key this version does not know is ignored.

The study-level attributes (the sweep's meta, its timings, the MLflow parent run, the Pareto front)
have small accessors below, for the same reason.

Per-example results are not user attributes (every worker reloads those): each complete trial
writes one small parquet file beside the study, examples_path(study_dir, number), with the columns
EXAMPLE_COLUMNS (write_examples / read_examples below); with data.test_size a second one for the
held-out test split, examples_path(study_dir, number, split="test").
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path

_NAN = float("nan")


class Status(str, Enum):
    """How a trial stands: the report's status column and its MLflow run's `status` tag."""
    COMPLETE = "complete"
    PRUNED = "pruned"          # stopped by the pruner, or an excluded point (never trained)
    FAILED = "failed"
    RUNNING = "running"
    WAITING = "waiting"        # queued (a grid point, a confirmation run)


@dataclass(frozen=True)
class TrialRecord:
    """What one trial stores. Figures are None where the trial never produced them (excluded,
    pruned, failed, or written by a version that did not store them)."""

    # who and where (written when the trial starts)
    label: str = ""                          # the point's label: "r=8", "qkvo, bias=all", ...
    config: dict = field(default_factory=dict)  # the configuration: the searched values less NUISANCE ones
    excluded: str = ""                       # an `exclude` rule's message: the point was never trained
    warm_start: bool = False                 # enqueued by study.warm_start
    stage: str = ""                          # "confirm": a confirmation run (companion study), "" = the search
    confirms: int | None = None              # a confirmation run's search trial (the configuration it repeats)
    device: str = ""                         # cpu | cuda
    precision: str = ""                      # what it trained in: fp32 | bf16 | fp16
    worker: str = ""                         # host:pid of the process that ran it
    memory_before_mb: float | None = None    # process RSS at the trial's start (after releasing memory)
    params: dict = field(default_factory=dict)  # the MLflow params (LoraConfig / TrainingArguments names)
    lora_scale: float | None = None          # the adapter's effective scale: lora_alpha/r (sqrt(r) with rsLoRA)
    tuned: dict = field(default_factory=dict)  # study.tune's values it trained with (path -> value): not its configuration
    rung_cap: int | None = None              # racing: the rung (epoch or step) it stops at unless its arm's race is
                                             # decided in its favour there; None: it trains to the end
    mlflow_run_id: str = ""
    # results (lora_sweep.trial.runner's RESULT_KEYS and LM_RESULT_KEYS)
    eval_accuracy: float | None = None
    eval_loss: float | None = None
    eval_f1: float | None = None
    eval_perplexity: float | None = None     # language-model tasks only
    eval_exact_match: float | None = None    # instruction/chat data: share of generated answers that match (normalised)
    eval_chrf: float | None = None           # instruction/chat data: sacrebleu corpus chrF (0-100) of the generated answers
    examples_kept: int | None = None         # instruction/chat data: train + eval examples within data.max_length ...
    examples_prompt_truncated: int | None = None  # ... of which the prompt was cut from the left to fit
    examples_dropped: int | None = None      # ... and those dropped (data.truncation=drop, or answer too long)
    train_loss: float | None = None          # mean training loss over the run's optimizer steps
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_pct: float | None = None
    peak_memory_mb: float | None = None      # what memory_kind says: CPU, live tensor bytes over one step
    predicted_memory_mb: float | None = None # the memory model's peak (lora_sweep.trial.memory), before training
    peak_rss_mb: float | None = None         # CPU: process RSS peak above the trial's start (sampled), not the table's
    epoch_time_s: float | None = None        # mean seconds per epoch of training, evaluations excluded
    adapter_size_mb: float | None = None     # only when the adapter was saved
    train_seconds: float | None = None       # the run's wall time less its evaluations
    eval_seconds: float | None = None        # evaluations (and generation, and reporting) during the run
    epochs: list = field(default_factory=list)        # eval metrics of each evaluation
    evaluated_at_s: list = field(default_factory=list)  # the trial's seconds (training + evaluations) at each
    memory_kind: str = ""                             # what peak_memory_mb measures (lora_sweep.report)
    batch_shapes: dict = field(default_factory=dict)  # "BxL" -> training batches of that padded shape
    lora_params: int | None = None           # trainable LoRA weights alone (lora_A/B, DoRA magnitudes), no head
    # the held-out test split (data.test_size): scored once after training; nothing that chooses reads these
    test_accuracy: float | None = None       # share of correct test examples (labelled data)
    test_f1: float | None = None             # their macro F1 over the labels (labelled data)
    test_loss: float | None = None           # mean per-example test loss
    test_exact_match: float | None = None    # instruction/chat data: share of generated test answers that match
    test_n: int | None = None                # test examples scored for correctness (else: with a loss)
    test_seconds: float | None = None        # scoring the test split after training (in no other time)
    # how the data was read (lora_sweep.trial.data): the same for every trial of a sweep
    data_encoding: str = ""                  # the encoding a local file was read with (data.encoding=auto: detected)
    bad_rows: dict = field(default_factory=dict)  # malformed records set aside: reason -> count
    rows_set_aside: int | None = None        # rows whose label data.labels leaves out (not bad)
    # generated answers (instruction/chat data): at the last generation over eval
    answers_generated: int | None = None
    answers_capped: int | None = None        # ... of which stopped at data.max_new_tokens, not at end of turn
    # forgetting (CAUSAL_LM, data.retention_size): mean per-token loss on fixed general English passages
    retention_loss: float | None = None      # the adapted model's
    base_retention_loss: float | None = None # the base model's (the same passages, computed once a sweep)
    forgetting: float | None = None          # mean over passages of adapted - base loss (> 0: forgot)
    forgetting_low: float | None = None      # its 95% interval (paired bootstrap over passages)
    forgetting_high: float | None = None
    retention_n: int | None = None           # passages scored
    # how it ended, when not complete
    infeasible: str = ""                     # never trained: its predicted peak exceeds the memory it may use
    memory_limit_mb: float | None = None     # that memory: train.memory_limit_mb, or the free CUDA memory
    error: str | None = None                 # a failed trial's reason
    memory_after_mb: float | None = None     # process RSS after a failed trial released its memory
    pruned_at_step: int | None = None        # the epoch or optimizer step it was pruned after ...
    pruned_at_unit: str | None = None        # ... "epoch" or "step"
    pruned_at_epoch: int | None = None       # the same, when the unit is an epoch

    @classmethod
    def from_user_attrs(cls, attrs: dict) -> "TrialRecord":
        """The record stored as these user attributes: missing keys take defaults, unknown ones are ignored."""
        return cls(**{k: attrs[k] for k in _NAMES if k in attrs})

    @classmethod
    def from_trial(cls, trial) -> "TrialRecord":
        """A stored (frozen) trial's record. A trial that Optuna itself failed (its heartbeat stopped) has
        no error attribute; its reason, if Optuna gave one, stands in."""
        record = cls.from_user_attrs(trial.user_attrs)
        reason = trial.system_attrs.get("fail_reason")
        return replace(record, error=reason) if record.error is None and reason is not None else record

    def to_user_attrs(self) -> dict:
        """The fields that differ from their defaults, under their stored keys (what never happened is
        not stored: an excluded trial has no epoch_time_s)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != _default(f)}

    def figure(self, name: str) -> float:
        """A numeric field as a float, NaN when absent (Optuna's importance and plot targets)."""
        if name not in _NAMES:
            raise KeyError(f"a trial record has no field {name!r}")
        value = getattr(self, name)
        return _NAN if value is None else float(value)

    def row(self) -> dict:
        """Every field, for a table row (report.csv): containers as compact JSON, so the csv keeps them."""
        return {name: (json.dumps(v, separators=(",", ":"), default=str) if isinstance(v, (dict, list)) else v)
                for name in _NAMES for v in (getattr(self, name),)}


_NAMES = tuple(f.name for f in fields(TrialRecord))
# Searched values that are not part of a configuration's identity: its runs under several seeds are
# one configuration (report/compare.py pairs them as seeds, never as separate configurations).
NUISANCE = ("train.seed",)


def configuration(params: dict, tuned=()) -> dict:
    """A trial's configuration: its searched values (Optuna params) without the nuisance ones (the seed,
    and the paths study.tune tunes within each configuration: `tuned`)."""
    return {k: v for k, v in params.items() if k not in NUISANCE and k not in tuned}
FIELDS = _NAMES  # the stored keys, in the record's order


def _default(f):
    return f.default_factory() if f.default is MISSING else f.default


def write(trial, **values) -> None:
    """Store these fields of a running trial's record now (a name the record lacks raises TypeError)."""
    for key, value in TrialRecord(**values).to_user_attrs().items():
        trial.set_user_attr(key, value)


def write_to_storage(storage, trial_id: int, **values) -> None:
    """The same, straight into a storage (for a trial whose worker is gone)."""
    for key, value in TrialRecord(**values).to_user_attrs().items():
        storage.set_trial_user_attr(trial_id, key, value)


# -- the study's own attributes ----------------------------------------------------------------

PARENT_ATTR = "mlflow_parent_run_id"  # the sweep's MLflow parent run, shared by every worker
_META, _TIMINGS, _PARETO, _PRECISION = "meta", "timings", "pareto_front", "precision"


def meta(study) -> dict:
    """What the sweep ran on (model, data, sizes, device, sampler, space, command, versions); {} if unknown."""
    return dict(study.user_attrs.get(_META) or {})


def set_meta(study, value: dict) -> None:
    study.set_user_attr(_META, value)


def has_meta(study) -> bool:
    return _META in study.user_attrs


def timings(study) -> dict:
    """Where the last sweep process's time went: startup_s, preflight_s, setup_s, trials_s, report_s."""
    return dict(study.user_attrs.get(_TIMINGS) or {})


def set_timings(study, value: dict) -> None:
    study.set_user_attr(_TIMINGS, value)


def precision(study) -> dict:
    """train.mixed_precision=auto's CPU decision, made once a study (lora_sweep.trial.precision.decide):
    choice, fp32_s, bf16_s, speedup, threshold, shape; {} where none was made."""
    return dict(study.user_attrs.get(_PRECISION) or {})


def set_precision(study, value: dict) -> None:
    study.set_user_attr(_PRECISION, value)


def parent_run_id(study) -> str | None:
    return study.user_attrs.get(PARENT_ATTR)


def set_parent_run_id(study, run_id: str) -> None:
    study.set_user_attr(PARENT_ATTR, run_id)


def pareto_front(study) -> list[int]:
    return list(study.user_attrs.get(_PARETO) or [])


def set_pareto_front(study, numbers) -> None:
    study.set_user_attr(_PARETO, [int(n) for n in numbers])


_SETTINGS = "settings"


def settings(study) -> dict:
    """The sweep's own settings, stored once when its study was created: {"config": the resolved
    configuration (plain data, URL passwords redacted), "overrides": [what the user typed]}; {} for a
    study written before they were stored. export, report and ui rebuild their config from them."""
    return dict(study.user_attrs.get(_SETTINGS) or {})


def set_settings(study, value: dict) -> None:
    study.set_user_attr(_SETTINGS, value)


# -- per-example results -----------------------------------------------------------------------

# example_id: the example's row number in the source data (before filtering and the split), the
#   same in every trial of a sweep; label: the gold label (None on plain text); prediction: the
#   predicted label (SEQ_CLS) or the generated answer (CAUSAL_LM / SEQ_2_SEQ_LM; the reference answer
#   is the label on instruction/chat data), None where nothing is predicted; correct: prediction ==
#   label (normalised exact match on instruction/chat data), None where there is no correctness (plain
#   text; a language model's examples beyond data.generate_size); loss: the example's eval loss
#   (mean over its answer tokens for language models, every token on plain text).
EXAMPLE_COLUMNS = ("example_id", "label", "prediction", "correct", "loss")


def examples_path(study_dir, number: int, stage: str = "", split: str = "eval") -> Path:
    """Where trial `number` of the study stored in `study_dir` keeps its per-example results
    (stage="confirm": a confirmation run, numbered in the companion study; split="test": those of
    the held-out test split, data.test_size)."""
    if split not in ("eval", "test", "retention"):
        raise ValueError(f"split={split!r}: per-example results are stored for 'eval', 'test' or 'retention'")
    folder = "examples" if split == "eval" else f"examples-{split}"
    return Path(study_dir, stage) / folder / f"trial-{int(number)}.parquet"


def write_examples(path, frame) -> Path:
    """Write a per-example frame (EXAMPLE_COLUMNS) to `path` (parquet), atomically."""
    import pandas as pd

    missing = [c for c in EXAMPLE_COLUMNS if c not in frame]
    if missing:
        raise ValueError(f"per-example results lack the columns {missing}")
    out = pd.DataFrame({
        "example_id": pd.Series(frame["example_id"], dtype="int64").to_numpy(),
        "label": pd.Series(frame["label"], dtype="string").to_numpy(),
        "prediction": pd.Series(frame["prediction"], dtype="string").to_numpy(),
        "correct": pd.Series(frame["correct"], dtype="boolean").to_numpy(),
        "loss": pd.Series(frame["loss"], dtype="float64").to_numpy(),
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    out.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def read_examples(path):
    """A trial's per-example results: a DataFrame with exactly EXAMPLE_COLUMNS, sorted by example_id
    (FileNotFoundError when the trial stored none: older versions, trials that did not complete)."""
    import pandas as pd

    frame = pd.read_parquet(path)
    return frame[list(EXAMPLE_COLUMNS)].sort_values("example_id", kind="stable").reset_index(drop=True)
