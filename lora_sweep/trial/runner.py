"""One trial, pure of Optuna and MLflow: data -> cached base model -> LoRA adapters -> training -> metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from lora_sweep.config import TrialSettings
from lora_sweep.trial import adapters, data, models, tasks
from lora_sweep.trial.dropout import use_fast_dropout
from lora_sweep.trial.metrics import PeakMemory, release_memory
from lora_sweep.trial.train import train

# What the report and the objective read from a finished trial (Optuna user attrs, MLflow metrics).
RESULT_KEYS = ("eval_accuracy", "eval_loss", "eval_f1", "train_loss", "trainable_params", "total_params",
               "trainable_pct", "peak_memory_mb", "epoch_time_s", "adapter_size_mb", "train_seconds", "eval_seconds",
               "lora_params")
# Language-model tasks only (lora_sweep/trial/tasks.py); on plain text eval_accuracy/eval_f1 are absent.
LM_RESULT_KEYS = ("eval_perplexity",)


@dataclass
class TrialResult:
    metrics: dict = field(default_factory=dict)      # RESULT_KEYS
    epochs: list[dict] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)   # the epoch or optimizer step of each evaluation
    target_modules: tuple = ()
    memory_kind: str = ""
    adapter_dir: Path | None = None
    batch_shapes: dict = field(default_factory=dict)
    examples: object = None   # pandas DataFrame, lora_sweep.record.EXAMPLE_COLUMNS: the final evaluation per example


def run_trial(settings: TrialSettings, device: str, on_epoch: Callable[[int, dict], None],
              adapter_dir: Path | None = None) -> TrialResult:
    """Fine-tune one LoRA configuration and measure it. Pure of Optuna/MLflow: usable alone."""
    from transformers import set_seed

    task = tasks.get_task(settings.lora.task_type, settings.data)
    base = models.load_base(settings.model, labels_of(settings), settings.train.seed, settings.lora.task_type)
    settings = replace(settings, lora=adapters.apply_budget(settings.lora, base.model))  # r within lora.param_budget
    splits = data.tokenized(settings.data, base.tokenizer, tokenizer_key=settings.model.name_or_path, task=task)
    model = peft_model = None
    try:
        with PeakMemory(device) as memory:
            model = models.fresh_copy(base)
            set_seed(settings.train.seed)  # same LoRA init and batch order wherever the trial runs
            peft_model, targets = adapters.apply_lora(model, settings.lora,
                                                      quantized=settings.model.load_in_4bit)
            if settings.train.fast_dropout and device == "cpu":
                use_fast_dropout(peft_model, attention=settings.train.fast_attention)
            trainable, total = adapters.parameter_counts(peft_model)
            t0 = time.perf_counter()
            outcome = train(peft_model, base.tokenizer, splits.train, splits.eval, settings.train, device,
                            on_epoch, task=task, generate=splits.generate, labels=splits.labels,
                            eval_ids=splits.eval_ids)
            wall = time.perf_counter() - t0
        result = TrialResult(epochs=outcome.epochs, steps=outcome.steps, target_modules=targets.names,
                             memory_kind=memory.kind, batch_shapes=outcome.batch_shapes, examples=outcome.examples)
        result.metrics = {
            **outcome.final,
            "train_loss": outcome.train_loss,
            "trainable_params": trainable,
            "lora_params": adapters.lora_parameter_count(peft_model),
            "total_params": total,
            "trainable_pct": 100.0 * trainable / total,
            "peak_memory_mb": memory.peak_mb,
            "epoch_time_s": outcome.epoch_time_s,
            "train_seconds": wall - outcome.eval_seconds,
            "eval_seconds": outcome.eval_seconds,
        }
        if adapter_dir is not None:
            peft_model.save_pretrained(adapter_dir)
            weights = next(adapter_dir.glob("adapter_model.*"))
            result.metrics["adapter_size_mb"] = weights.stat().st_size / 2**20
            result.adapter_dir = adapter_dir
        return result
    finally:
        del model, peft_model
        if settings.model.load_in_4bit:
            del base
        release_memory()


def target_names(settings: TrialSettings) -> tuple:
    """The module names a preset resolves to, from the cached base model (quantized bases are not
    cached, and loading one just to name its modules would double the trial's load time)."""
    if settings.model.load_in_4bit:
        return ()
    base = models.load_base(settings.model, labels_of(settings), settings.train.seed, settings.lora.task_type)
    return adapters.resolve_targets(settings.lora.target_modules, base.model).names


def budgeted(settings: TrialSettings) -> TrialSettings:
    """The settings at the rank lora.param_budget resolves to on the cached base model (run_trial trains
    at the same one), for what is recorded before the trial; unchanged without a budget."""
    if settings.lora.param_budget is None or settings.model.load_in_4bit:
        return settings
    base = models.load_base(settings.model, labels_of(settings), settings.train.seed, settings.lora.task_type)
    return replace(settings, lora=adapters.apply_budget(settings.lora, base.model))


def labels_of(settings: TrialSettings) -> tuple:
    return data.load_splits(settings.data).labels
