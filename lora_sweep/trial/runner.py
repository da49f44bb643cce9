"""One trial, pure of Optuna and MLflow: data -> cached base model -> LoRA adapters -> training -> metrics."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch

from lora_sweep.config import TrialSettings
from lora_sweep.trial import adapters, chat, data, memory, models, retention
from lora_sweep.trial.dropout import use_fast_dropout
from lora_sweep.trial.metrics import MEMORY_KINDS, PeakMemory, release_memory
from lora_sweep.trial.train import train

log = logging.getLogger("lora_sweep")

# What the report and the objective read from a finished trial (Optuna user attrs, MLflow metrics).
RESULT_KEYS = ("eval_accuracy", "eval_loss", "eval_f1", "train_loss", "trainable_params", "total_params",
               "trainable_pct", "peak_memory_mb", "epoch_time_s", "adapter_size_mb", "train_seconds", "eval_seconds",
               "lora_params", "predicted_memory_mb", "peak_rss_mb")
# Language-model tasks only (lora_sweep/trial/tasks.py); on plain text eval_accuracy/eval_f1 are absent;
# the examples_* counts on instruction/chat data only (lora_sweep/trial/chat.py).
LM_RESULT_KEYS = ("eval_perplexity", "examples_kept", "examples_prompt_truncated", "examples_dropped",
                  "eval_exact_match", "eval_chrf")  # the last two: generated answers on instruction/chat data
# The held-out test split's figures (data.test_size; TrialResult.test_metrics), each where it applies:
# test_accuracy and test_f1 on labelled data, test_exact_match on instruction/chat data (as eval_*).
TEST_KEYS = ("test_accuracy", "test_f1", "test_loss", "test_exact_match", "test_n", "test_seconds")
# How the data was read, how generation ended, and forgetting (CAUSAL_LM, data.retention_size).
DATA_KEYS = ("data_encoding", "bad_rows", "rows_set_aside", "answers_generated", "answers_capped")
RETENTION_KEYS = ("retention_loss", "base_retention_loss", "forgetting", "forgetting_low", "forgetting_high",
                  "retention_n")


@dataclass(frozen=True)
class Figures:
    """What a complete trial measured, one field per result field of lora_sweep.record.TrialRecord (the
    objective records it whole); None where the task does not measure it (perplexity of a classifier)."""
    eval_accuracy: float | None = None
    eval_loss: float | None = None
    eval_f1: float | None = None
    eval_perplexity: float | None = None
    eval_exact_match: float | None = None
    eval_chrf: float | None = None
    train_loss: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_pct: float | None = None
    lora_params: int | None = None
    peak_memory_mb: float | None = None
    predicted_memory_mb: float | None = None
    peak_rss_mb: float | None = None
    epoch_time_s: float | None = None
    adapter_size_mb: float | None = None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    examples_kept: int | None = None
    examples_prompt_truncated: int | None = None
    examples_dropped: int | None = None
    test_accuracy: float | None = None
    test_f1: float | None = None
    test_loss: float | None = None
    test_exact_match: float | None = None
    test_n: int | None = None
    test_seconds: float | None = None
    data_encoding: str | None = None
    bad_rows: dict | None = None
    rows_set_aside: int | None = None
    answers_generated: int | None = None
    answers_capped: int | None = None
    retention_loss: float | None = None
    base_retention_loss: float | None = None
    forgetting: float | None = None
    forgetting_low: float | None = None
    forgetting_high: float | None = None
    retention_n: int | None = None

    def stored(self, keys: tuple | None = None) -> dict:
        """The figures that apply (not None), optionally only `keys`."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None and (keys is None or f.name in keys)}


@dataclass
class TrialResult:
    figures: Figures = field(default_factory=Figures)
    epochs: list[dict] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)   # the epoch or optimizer step of each evaluation
    evaluated_at_s: list[float] = field(default_factory=list)  # the trial's seconds so far, at each evaluation
    target_modules: tuple = ()
    memory_kind: str = ""
    adapter_dir: Path | None = None
    batch_shapes: dict = field(default_factory=dict)
    examples: object = None   # pandas DataFrame, lora_sweep.record.EXAMPLE_COLUMNS: the final evaluation per example
    samples: object = None    # pandas DataFrame (prompt, reference, output): a few generations, instruction/chat data
    # data.test_size: the held-out test split per example (EXAMPLE_COLUMNS), scored once after training
    # (its figures: the test_* fields of `figures`); None without a test split.
    test_examples: object = None
    # data.retention_size (CAUSAL_LM): per passage (EXAMPLE_COLUMNS; label = the passage's hash, loss = the
    # adapted model's mean token loss); its figures: the RETENTION_KEYS fields of `figures`.
    retention_examples: object = None

    @property
    def metrics(self) -> dict:
        """The eval and cost figures (RESULT_KEYS, LM_RESULT_KEYS) that apply."""
        return self.figures.stored(RESULT_KEYS + LM_RESULT_KEYS)

    @property
    def test_metrics(self) -> dict:
        """The held-out test split's figures (TEST_KEYS); {} without a test split."""
        return self.figures.stored(TEST_KEYS)


@dataclass(frozen=True)
class Prepared:
    """What a trial needs, resolved once before it trains (the objective records from it what it resolves):
    its settings at the rank lora.param_budget gives, the task, the base model (cached per process), the
    tokenized splits and the module names the targets resolve to. A 4-bit base is not cached: it is
    loaded (and the budget applied) when the trial trains, and base, splits and targets stay empty here."""
    settings: TrialSettings
    task: object
    base: object = None
    splits: data.Splits | None = None
    targets: tuple = ()
    memory: memory.Prediction | None = None  # its predicted peak on the device it will train on


def prepare(settings: TrialSettings, device: str = "cpu") -> Prepared:
    from lora_sweep.trial.train import precision_name

    task = chat.get_task(settings.lora.task_type, settings.data, data.load_splits(settings.data).format)
    precision = precision_name(settings.train, device)
    if settings.model.load_in_4bit:  # loading one just to name its modules would double the trial's load time
        shape = (settings.train.per_device_train_batch_size, settings.data.max_length)
        skeleton = models.meta_model(settings.model, labels_of(settings), settings.lora.task_type)
        targets = adapters.resolve_targets(settings.lora.target_modules, skeleton)
        return Prepared(settings, task, memory=predict_memory(
            skeleton, settings, targets, shape, (settings.train.per_device_eval_batch_size, shape[1]), device, precision))
    base = models.load_base(settings.model, labels_of(settings), settings.train.seed, settings.lora.task_type)
    settings = replace(settings, lora=adapters.apply_budget(settings.lora, base.model))  # r within lora.param_budget
    splits = data.tokenized(settings.data, base.tokenizer, tokenizer_key=settings.model.name_or_path, task=task)
    targets = adapters.resolve_targets(settings.lora.target_modules, base.model)
    predicted = predict_memory(base.model, settings, targets,
                               batch_shape(splits.train, settings.train.per_device_train_batch_size),
                               batch_shape(splits.eval, settings.train.per_device_eval_batch_size), device, precision)
    return Prepared(settings, task, base, splits, targets.names, predicted)


def predict_memory(model, settings: TrialSettings, targets, batch, eval_batch, device: str, precision: str):
    """memory.predict, or None (logged once) for a model whose config the memory model cannot read: a trial
    never fails for want of a prediction."""
    try:
        return memory.predict(model, settings, targets, batch, eval_batch, device, precision)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as e:
        _warn_unpredicted(type(model).__name__, f"{type(e).__name__}: {e}")
        return None


@functools.cache  # once a process per architecture
def _warn_unpredicted(kind: str, why: str) -> None:
    log.warning("No memory prediction for %s (%s): its trials record none and train.memory_limit_mb is not "
                "applied to them", kind, why)


def batch_shape(dataset, size: int) -> tuple[int, int]:
    """The largest padded batch of `size` examples from `dataset`: examples x its longest example's tokens."""
    lengths = [len(ids) for ids in dataset["input_ids"]] if dataset is not None and len(dataset) else [1]
    return min(size, len(lengths)), max(lengths)


def largest_prediction(settings: list[TrialSettings], device: str) -> float:
    """MB: the largest predicted peak over these trials' settings (a space's corner points)."""
    return max((ready.memory.peak_mb for s in settings if (ready := prepare(s, device)).memory is not None),
               default=0.0)


def run_trial(settings: TrialSettings | Prepared, device: str, on_epoch: Callable[[int, dict], None],
              adapter_dir: Path | None = None) -> TrialResult:
    """Fine-tune one LoRA configuration (its settings, or what prepare() resolved from them) and measure
    it. Pure of Optuna/MLflow: usable alone."""
    from transformers import set_seed

    ready = settings if isinstance(settings, Prepared) else prepare(settings, device)
    task, base, splits, settings, predicted = ready.task, ready.base, ready.splits, ready.settings, ready.memory
    if base is None:  # a 4-bit base: loaded for this trial alone
        base = models.load_base(settings.model, labels_of(settings), settings.train.seed, settings.lora.task_type)
        settings = replace(settings, lora=adapters.apply_budget(settings.lora, base.model))
        splits = data.tokenized(settings.data, base.tokenizer, tokenizer_key=settings.model.name_or_path, task=task)
    del ready
    model = peft_model = None
    try:
        # before LoRA wraps anything (a 4-bit base is this trial's own model) and outside the peak memory
        base_scores = retention.base_losses(base, settings, device) if retention.applies(settings) else None
        with PeakMemory(device) as rss:
            model = models.fresh_copy(base)
            set_seed(settings.train.seed)  # same LoRA init and batch order wherever the trial runs
            peft_model, targets = adapters.apply_lora(model, settings.lora,
                                                      quantized=settings.model.load_in_4bit)
            if settings.train.fast_dropout and device == "cpu":
                use_fast_dropout(peft_model, attention=settings.train.fast_attention)
            trainable, total = adapters.parameter_counts(peft_model)
            live = measured_peak(peft_model, splits, task, base.tokenizer, settings) if device == "cpu" else None
            t0 = time.perf_counter()
            outcome = train(peft_model, base.tokenizer, splits.train, splits.eval, settings.train, device,
                            on_epoch, task=task, generate=splits.generate, labels=splits.labels,
                            eval_ids=splits.eval_ids, generate_every=generate_every(settings, splits.format),
                            test_set=splits.test, test_ids=splits.test_ids, test_generate=splits.test_generate)
            wall = time.perf_counter() - t0
        values = {
            **outcome.final,
            "train_loss": outcome.train_loss,
            "trainable_params": trainable,
            "lora_params": adapters.lora_parameter_count(peft_model),
            "total_params": total,
            "trainable_pct": 100.0 * trainable / total,
            "peak_memory_mb": live if live is not None else rss.peak_mb,
            "peak_rss_mb": rss.peak_mb if live is not None else None,
            "predicted_memory_mb": predicted.peak_mb if predicted is not None else None,
            "epoch_time_s": outcome.epoch_time_s,
            "train_seconds": wall - outcome.eval_seconds - outcome.test_seconds,
            "eval_seconds": outcome.eval_seconds,
        }
        for count in ("kept", "prompt_truncated", "dropped"):  # train + eval (not test), after data.max_length
            if splits.length_counts:
                values[f"examples_{count}"] = sum(splits.length_counts[k][count] for k in ("train", "eval"))
        values.update(data_encoding=splits.encoding or None, bad_rows=splits.bad_rows,
                      rows_set_aside=splits.set_aside)
        values.update(answers_generated=getattr(task, "last_generated", None),
                      answers_capped=getattr(task, "last_capped", None))
        if outcome.test_examples is not None:
            values.update(held_out_figures(outcome.test_examples, splits.format, splits.labels, outcome.test_seconds))
        kept = None
        if base_scores is not None:  # data.retention_size: forgetting of general English (trial/retention.py)
            kept = retention.measure(peft_model, base.tokenizer, settings, device, base_scores)
            values.update(kept.figures)
        saved = None
        if adapter_dir is not None:
            peft_model.save_pretrained(adapter_dir)
            weights = next(adapter_dir.glob("adapter_model.*"))
            values["adapter_size_mb"] = weights.stat().st_size / 2**20
            saved = adapter_dir
        result = TrialResult(figures=Figures(**values), epochs=outcome.epochs, steps=outcome.steps,
                             evaluated_at_s=outcome.evaluated_at_s,
                             target_modules=targets.names,
                             memory_kind=MEMORY_KINDS["cpu"] if live is not None else rss.kind, adapter_dir=saved,
                             batch_shapes=outcome.batch_shapes, examples=outcome.examples,
                             samples=getattr(task, "last_samples", None), test_examples=outcome.test_examples,
                             retention_examples=kept.examples if kept is not None else None)
        return result
    finally:
        del model, peft_model
        if settings.model.load_in_4bit:
            del base
        release_memory()


def measured_peak(peft_model, splits: data.Splits, task, tokenizer, settings: TrialSettings) -> float:
    """MB: the most live tensor bytes over one training step at the largest training batch, or over one
    evaluation forward pass at the largest eval batch, whichever is more (trial/memory.py)."""
    collate = task.collator(tokenizer)
    train_batch = memory.largest_batch(splits.train, collate, settings.train.per_device_train_batch_size)
    eval_batch = memory.largest_batch(splits.eval, collate, settings.train.per_device_eval_batch_size)
    from lora_sweep.trial.train import precision_name

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision_name(settings.train, "cpu"))
    return max(memory.measure(peft_model, train_batch, eval_batch, settings.train.learning_rate,
                              settings.train.weight_decay, autocast_dtype=half))


def held_out_figures(frame, shape: str, labels: tuple, seconds: float) -> dict:
    """The test split's figures from its per-example frame (EXAMPLE_COLUMNS): test_accuracy (labelled
    data) or test_exact_match (instruction/chat data), the mean of `correct` where it is not null (where
    any is); test_f1, macro F1 over the task's labels on those rows (labelled data); test_loss, the mean
    per-example loss over the finite ones; test_n, the rows scored for correctness, else those with a
    loss; test_seconds."""
    import numpy as np
    import pandas as pd

    from lora_sweep.config.names import CHAT_FORMATS

    correct = pd.Series(frame["correct"], dtype="boolean")
    scored = correct.notna().to_numpy()
    losses = pd.Series(frame["loss"], dtype="float64").to_numpy(na_value=np.nan)
    finite = np.isfinite(losses)
    out = {"test_loss": float(losses[finite].mean()) if finite.any() else float("nan")}
    if scored.any():
        share = float(correct[scored].astype(bool).mean())
        if shape in CHAT_FORMATS:
            out["test_exact_match"] = share
        else:
            from sklearn.metrics import f1_score

            out["test_accuracy"] = share
            gold = pd.Series(frame["label"], dtype="string")[scored].tolist()
            predicted = pd.Series(frame["prediction"], dtype="string")[scored].tolist()
            out["test_f1"] = float(f1_score(gold, predicted, labels=[str(label) for label in labels],
                                            average="macro", zero_division=0))
    out["test_n"] = int(scored.sum()) if scored.any() else int(finite.sum())
    out["test_seconds"] = float(seconds)
    return out


def generate_every(settings: TrialSettings, shape: str) -> bool:
    """data.generate_at, the one rule for every generating task: auto generates at every evaluation on
    labelled data (one-word answers, cheap) and at the last only on instruction/chat data (long answers)."""
    from lora_sweep.config.names import CHAT_FORMATS

    at = settings.data.generate_at
    return at == "every" or (at == "auto" and shape not in CHAT_FORMATS)


def labels_of(settings: TrialSettings) -> tuple:
    return data.load_splits(settings.data).labels


def check_data(settings: TrialSettings, metric: str, tokenizer=None) -> None:
    """Before any training (the sweep's preflight): study.metric must be one the data's shape measures,
    instruction/chat data needs CAUSAL_LM, and (given the tokenizer) every example must render and fit (tokenized once, cached for the trials)."""
    from lora_sweep.config import ConfigError
    from lora_sweep.config.names import CHAT_FORMATS, metric_names

    shape = data.load_splits(settings.data).format
    task = chat.get_task(settings.lora.task_type, settings.data, shape)  # instruction/chat data: CAUSAL_LM only
    allowed = metric_names(settings.lora.task_type, labelled=shape == "labelled", chat=shape in CHAT_FORMATS)
    if metric not in allowed:
        raise ConfigError(f"study.metric={metric!r}: {settings.data.name_or_path} holds {shape} data, on which "
                          f"a trial measures {', '.join(allowed)}.")
    if retention.applies(settings):  # data.retention_size within the passages there are, before any training
        retention.passages(settings.data.retention_size)
    if shape not in CHAT_FORMATS:
        return
    if tokenizer is not None:
        data.tokenized(settings.data, tokenizer, tokenizer_key=settings.model.name_or_path, task=task)
