"""One trial, pure of Optuna and MLflow: data -> cached base model -> LoRA adapters -> training -> metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from lora_sweep.config import TrialSettings
from lora_sweep.trial import adapters, chat, data, models
from lora_sweep.trial.dropout import use_fast_dropout
from lora_sweep.trial.metrics import PeakMemory, release_memory
from lora_sweep.trial.train import train

# What the report and the objective read from a finished trial (Optuna user attrs, MLflow metrics).
RESULT_KEYS = ("eval_accuracy", "eval_loss", "eval_f1", "train_loss", "trainable_params", "total_params",
               "trainable_pct", "peak_memory_mb", "epoch_time_s", "adapter_size_mb", "train_seconds", "eval_seconds",
               "lora_params")
# Language-model tasks only (lora_sweep/trial/tasks.py); on plain text eval_accuracy/eval_f1 are absent;
# the examples_* counts on instruction/chat data only (lora_sweep/trial/chat.py).
LM_RESULT_KEYS = ("eval_perplexity", "examples_kept", "examples_prompt_truncated", "examples_dropped",
                  "eval_exact_match", "eval_chrf")  # the last two: generated answers on instruction/chat data


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
    samples: object = None    # pandas DataFrame (prompt, reference, output): a few generations, instruction/chat data


def run_trial(settings: TrialSettings, device: str, on_epoch: Callable[[int, dict], None],
              adapter_dir: Path | None = None) -> TrialResult:
    """Fine-tune one LoRA configuration and measure it. Pure of Optuna/MLflow: usable alone."""
    from transformers import set_seed

    task = chat.get_task(settings.lora.task_type, settings.data, data.load_splits(settings.data).format)
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
                            eval_ids=splits.eval_ids, generate_every=generate_every(settings, splits.format))
            wall = time.perf_counter() - t0
        result = TrialResult(epochs=outcome.epochs, steps=outcome.steps, target_modules=targets.names,
                             memory_kind=memory.kind, batch_shapes=outcome.batch_shapes, examples=outcome.examples,
                             samples=getattr(task, "last_samples", None))
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
        for count in ("kept", "prompt_truncated", "dropped"):  # train + eval, after data.max_length
            if splits.length_counts:
                result.metrics[f"examples_{count}"] = sum(c[count] for c in splits.length_counts.values())
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
    if shape not in CHAT_FORMATS:
        return
    if tokenizer is not None:
        data.tokenized(settings.data, tokenizer, tokenizer_key=settings.model.name_or_path, task=task)
