"""One fine-tuning run with transformers' Trainer, evaluated every epoch or every N steps.

A callback times each epoch's training alone (on_epoch_begin -> on_epoch_end; the Trainer runs
evaluation after on_epoch_end), stops on a non-finite loss, and hands each epoch's eval metrics to
the caller, which reports them to Optuna (pruning) and MLflow. The task (lora_sweep/trial/tasks.py) picks
the collator and the metrics; for language models it also generates answers after each evaluation,
or the final one only (data.generate_at; that time counts as evaluation, not training). With train.eval_steps, evaluations
(and generation) inside an epoch are subtracted from its time; the step passed on is the epoch
number or, with train.eval_steps, the optimizer step.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import (
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_pt_utils import LengthGroupedSampler

from lora_sweep.trial import interrupt
from lora_sweep.config import TrainConfig
from lora_sweep.trial.environment import cpu_bf16_speedup
from lora_sweep.trial.tasks import SequenceClassification, Task

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainResult:
    epochs: list[dict] = field(default_factory=list)   # eval metrics per evaluation (eval_accuracy, ...)
    steps: list[int] = field(default_factory=list)     # the step each evaluation was reported at
    evaluated_at_s: list[float] = field(default_factory=list)  # seconds since training began, at each evaluation
    epoch_times: list[float] = field(default_factory=list)
    eval_seconds: float = 0.0
    train_loss: float = float("nan")
    # "BxL" -> number of training batches of that padded shape: what was computed, for FLOP counts
    # and padding statistics (lora_sweep.bench).
    batch_shapes: dict[str, int] = field(default_factory=dict)
    examples: object = None  # the final evaluation per example (Task.example_outcomes), None without ids
    # The held-out test split per example (Task.test_outcomes), scored once after training; None without
    # one. Its seconds count in neither the epochs' times nor eval_seconds, and nothing is reported on it.
    test_examples: object = None
    test_seconds: float = 0.0

    @property
    def epoch_time_s(self) -> float:
        return sum(self.epoch_times) / len(self.epoch_times) if self.epoch_times else float("nan")

    @property
    def final(self) -> dict:
        return self.epochs[-1] if self.epochs else {}


class _TrialCallback(TrainerCallback):
    def __init__(self, result: TrainResult, on_epoch: Callable[[int, dict], None], task: Task, tokenizer,
                 generate: dict | None, labels: tuple, batch_size: int,
                 by_steps: bool = False, generate_every: bool = True):
        self.result = result
        self.on_epoch = on_epoch
        self.training = False
        self.task = task
        self.tokenizer = tokenizer
        self.generate = generate
        self.labels = labels
        self.batch_size = batch_size
        self.by_steps = by_steps
        self.generate_every = generate_every  # False: generate at the final evaluation only (data.generate_at)
        self._t0 = 0.0
        self._start = time.perf_counter()
        self._eval_in_epoch = 0.0  # evaluations (and our reporting) that ran inside this epoch

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.training = True
        self._t0 = time.perf_counter()
        self._eval_in_epoch = 0.0

    def on_epoch_end(self, args, state, control, **kwargs):
        self.result.epoch_times.append(time.perf_counter() - self._t0 - self._eval_in_epoch)
        self.training = False  # the Trainer evaluates after on_epoch_end

    def on_step_end(self, args, state, control, **kwargs):
        interrupt.check()  # a SIGTERM whose exception a library swallowed ends the trial here
        if control.should_evaluate:
            self.training = False  # train.eval_steps: an evaluation runs now, inside the epoch

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLoss(f"training loss became {loss} at step {state.global_step} "
                                f"(epoch {state.epoch:.2f}); lower train.learning_rate or check the data.")

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        metrics = dict(metrics or {})
        t0 = time.perf_counter()
        final = state.global_step >= state.max_steps  # the last epoch's, or the closing one with train.eval_steps
        generate = self.generate if self.generate_every or final else None
        row = self.task.epoch_metrics(metrics, model, self.tokenizer, generate, self.batch_size, self.labels)
        runtime = metrics.get("eval_runtime", 0.0)
        self.result.eval_seconds += runtime + time.perf_counter() - t0
        step = state.global_step if self.by_steps else len(self.result.epochs) + 1
        if not math.isfinite(row.get("eval_loss", 0.0)):  # diverged weights: its accuracy means nothing
            raise NonFiniteLoss(f"eval loss became {row['eval_loss']} at step {state.global_step}; lower "
                                f"train.learning_rate or check the data.")
        self.result.epochs.append(row)
        self.result.evaluated_at_s.append(time.perf_counter() - self._start)
        self.result.steps.append(step)
        try:
            self.on_epoch(step, row)  # may raise optuna.TrialPruned: it ends training here
        finally:
            self._eval_in_epoch += runtime + (time.perf_counter() - t0)
            self.training = self.by_steps  # mid-epoch evaluation: training batches follow


class ShuffledBatches(torch.utils.data.Sampler):
    """transformers' length-grouped batches, served in random order.

    LengthGroupedSampler sorts each mega-batch (a quarter of 2000 tweets) longest first and serves
    its batches in that order: every epoch walks four times from long tweets down to short ones.
    The same batches in shuffled order keep its padding savings and lose that ordering. The batch
    holding the longest example stays first (an out-of-memory error comes at once, as there);
    a partial batch stays last, so the DataLoader's batches fall on the groups' boundaries.
    Why: transformers' order cost accuracy (reports/bench/README.md, "Accuracy over seeds")."""

    def __init__(self, grouped: LengthGroupedSampler):
        self.grouped = grouped

    def __len__(self) -> int:
        return len(self.grouped)

    def __iter__(self):
        order, size = list(self.grouped), self.grouped.batch_size
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        tail = [batches.pop()] if batches and len(batches[-1]) < size else []
        head, rest = batches[:1], batches[1:]
        # the grouped sampler's own generator (None: torch's global one, seeded by set_seed)
        perm = torch.randperm(len(rest), generator=self.grouped.generator).tolist()
        return iter([i for batch in head + [rest[j] for j in perm] + tail for i in batch])


class _Trainer(Trainer):
    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        return ShuffledBatches(sampler) if isinstance(sampler, LengthGroupedSampler) else sampler

    def _get_eval_sampler(self, eval_dataset):
        # transformers 5 applies train_sampling_strategy=group_by_length to evaluation as well, in
        # mega-batches of four eval batches: 500 tweets become random groups of 64, each padded to
        # its longest (measured: 4.7 s per evaluation instead of 3.0 s). Our eval split is already
        # ordered by length (lora_sweep.trial.data): read it in that order.
        if self.args.world_size <= 1 and eval_dataset is not None:
            return torch.utils.data.SequentialSampler(eval_dataset)
        return super()._get_eval_sampler(eval_dataset)


class _ShapeRecorder:
    """Wraps the collator to count the padded shapes of training batches (one dict update a batch)."""

    def __init__(self, collator, callback: _TrialCallback):
        self.collator = collator
        self.callback = callback

    def __call__(self, features):
        batch = self.collator(features)
        if self.callback.training:
            key = "x".join(map(str, batch["input_ids"].shape))
            shapes = self.callback.result.batch_shapes
            shapes[key] = shapes.get(key, 0) + 1
        return batch


@functools.cache  # once a process, not once a trial
def _warn_slow_bf16(speedup: float) -> None:
    log.warning("train.mixed_precision=bf16 on this CPU: a MiniLM-sized bf16 matmul measured %.1fx slower "
                "than fp32 here, so bf16 trials train slower, not faster. Use train.mixed_precision=no "
                "(or auto) on this machine.", 1 / speedup)


def mixed_precision(settings: TrainConfig, device: str) -> dict:
    mode = settings.mixed_precision
    if mode == "auto":
        # A CPU stays fp32 here: a sweep replaces auto with its measured choice first (lora_sweep.trial.precision).
        mode = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if mode == "fp16" and device != "cuda":
        from lora_sweep.config import ConfigError

        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; on a CPU use bf16 or no.")
    if mode == "bf16" and device == "cpu" and (speedup := cpu_bf16_speedup()) < 1:
        _warn_slow_bf16(round(speedup, 2))
    return {"bf16": mode == "bf16", "fp16": mode == "fp16"}


_WARM: set[str] = set()  # devices whose one-time start-up (context, libraries, kernels) this process has paid


def warm_up(model, batch: dict, device: str, autocast_dtype=None) -> bool:
    """One untimed forward and backward pass on `batch`, once per process and device (the GPU run found
    ~23 s of start-up in its first trial's epoch time). Weights untouched, gradients dropped, the RNG
    states restored, so the trial trains as it would have. Returns whether it ran."""
    if device in _WARM:
        return False
    _WARM.add(device)
    on = next(model.parameters()).device
    with torch.random.fork_rng(devices=[on] if on.type == "cuda" else []):
        with torch.autocast(on.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**{k: v.to(on) for k, v in batch.items()}).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    if on.type == "cuda":
        torch.cuda.synchronize()
    return True


def first_batch(train_set, collate, size: int) -> dict:
    """The collated first `size` training examples, model inputs only."""
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
    return collate([{k: v for k, v in train_set[i].items() if k in keys} for i in range(min(size, len(train_set)))])


def precision_name(settings: TrainConfig, device: str) -> str:
    """What a trial with these settings trains in: fp32 | bf16 | fp16 (its TrialRecord.precision)."""
    mode = settings.mixed_precision
    if mode == "auto":
        mode = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return "fp32" if mode == "no" else mode


def train(model, tokenizer, train_set, eval_set, settings: TrainConfig, device: str,
          on_epoch: Callable[[int, dict], None], task: Task | None = None, generate: dict | None = None,
          labels: tuple = (), eval_ids: list | None = None, generate_every: bool = True,
          test_set=None, test_ids: list | None = None, test_generate: dict | None = None) -> TrainResult:
    """`generate`/`labels`: the eval prompts whose answers a language-model task generates (Splits.generate),
    at every evaluation or (generate_every=False) the final one only;
    `eval_ids`: the eval examples' ids in eval_set's order (Splits.eval_ids), for per-example results;
    `test_set`/`test_ids`/`test_generate`: the held-out test split (Splits.test, test_ids, test_generate),
    scored once after training into result.test_examples, never reported to on_epoch."""
    task = task or SequenceClassification(None)
    result = TrainResult()
    callback = _TrialCallback(result, on_epoch, task, tokenizer, generate, labels,
                              settings.per_device_eval_batch_size, by_steps=bool(settings.eval_steps),
                              generate_every=generate_every)
    with tempfile.TemporaryDirectory(prefix="lora-sweep-") as out:
        args = TrainingArguments(
            output_dir=out,
            learning_rate=settings.learning_rate,
            weight_decay=settings.weight_decay,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            num_train_epochs=settings.num_train_epochs,
            per_device_train_batch_size=settings.per_device_train_batch_size,
            per_device_eval_batch_size=settings.per_device_eval_batch_size,
            warmup_steps=settings.warmup_steps,
            lr_scheduler_type=settings.lr_scheduler_type,
            max_grad_norm=settings.max_grad_norm,
            train_sampling_strategy=settings.train_sampling_strategy,
            seed=settings.seed,
            use_cpu=device == "cpu",
            eval_strategy="steps" if settings.eval_steps else "epoch",
            eval_steps=settings.eval_steps,
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=1,  # every step: a non-finite loss stops the trial at once (on_log)
            report_to="none",
            disable_tqdm=True,
            dataloader_pin_memory=device == "cuda",
            prediction_loss_only=task.prediction_loss_only,
            **mixed_precision(settings, device),
        )
        trainer = _Trainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=_ShapeRecorder(task.collator(tokenizer), callback),
            compute_metrics=task.compute_metrics(),
            callbacks=[callback],
        )
        trainer.remove_callback(PrinterCallback)  # our own progress lines replace its dict dumps
        if device == "cuda":  # the process's first trial on a GPU would pay the start-up in its epoch time
            precision = mixed_precision(settings, device)
            warm_up(trainer.model, first_batch(train_set, task.collator(tokenizer), settings.per_device_train_batch_size),
                    device, torch.bfloat16 if precision["bf16"] else torch.float16 if precision["fp16"] else None)
        output = trainer.train()
        callback.training = False
        if settings.eval_steps and (not result.steps or result.steps[-1] != trainer.state.global_step):
            trainer.evaluate()  # the final model, when the last step is not an eval step
        result.train_loss = float(output.training_loss)
        if not math.isfinite(result.train_loss):
            raise NonFiniteLoss(f"mean training loss is {result.train_loss}; lower train.learning_rate.")
        t0 = time.perf_counter()
        result.examples = task.example_outcomes(trainer, eval_set, eval_ids, generate, labels)
        result.eval_seconds += time.perf_counter() - t0
        if test_set is not None and len(test_set):  # after the eval rows: a classifier's last_eval is overwritten
            t0 = time.perf_counter()
            result.test_examples = task.test_outcomes(trainer, test_set, test_ids, test_generate, labels, tokenizer,
                                                      settings.per_device_eval_batch_size)
            result.test_seconds = time.perf_counter() - t0
    return result
