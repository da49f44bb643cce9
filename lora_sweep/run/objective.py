"""The Optuna objective: one trial of the study run (lora_sweep.trial.runner) and recorded in Optuna and MLflow.

A trial that raises is recorded (Optuna FAIL, MLflow FAILED, the error as a tag) and the sweep goes
on; Optuna's TrialPruned is recorded as pruned with the epoch (or step) it stopped at. A point that an
`exclude` rule forbids is recorded as pruned with the rule's message, without training.
Multi-objective studies get a tuple: study.metric, then study.also_minimize in order.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import optuna

from lora_sweep import record
from lora_sweep.config import Config, TrialSettings
from lora_sweep.run.progress import Progress
from lora_sweep.search.constraints import Excluded
from lora_sweep.search.space import Point, SearchSpace
from lora_sweep.trial import interrupt
from lora_sweep.trial.metrics import failure_reason, release_memory, rss_mb
from lora_sweep.trial.train import precision_name
from lora_sweep.trial.runner import LM_RESULT_KEYS, RESULT_KEYS, Prepared, prepare, run_trial  # noqa: F401

log = logging.getLogger("lora_sweep")

def mlflow_params(settings: TrialSettings, targets: tuple) -> dict:
    """Params under the names LoraConfig / TrainingArguments give them."""
    lora, tr = settings.lora, settings.train
    return {
        **lora.peft_kwargs(), "target_modules": list(targets) or lora.target_modules,
        "target_modules_preset": lora.target_modules if isinstance(lora.target_modules, str) else "list",
        "learning_rate": tr.learning_rate, "weight_decay": tr.weight_decay,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps, "num_train_epochs": tr.num_train_epochs,
        "per_device_train_batch_size": tr.per_device_train_batch_size, "seed": tr.seed,
        "lr_scheduler_type": tr.lr_scheduler_type, "warmup_steps": tr.warmup_steps,
        "train_sampling_strategy": tr.train_sampling_strategy, "fast_dropout": tr.fast_dropout,
        "fast_attention": tr.fast_attention,
        "model_name_or_path": settings.model.name_or_path, "load_in_4bit": settings.model.load_in_4bit,
        "dataset": settings.data.name_or_path, "train_size": settings.data.train_size,
        "eval_size": settings.data.eval_size, "max_length": settings.data.max_length,
        **({"param_budget": lora.param_budget} if lora.param_budget is not None else {}),
        **({"test_size": settings.data.test_size} if settings.data.test_size is not None else {}),
    }


def memory_limit(cap_mb: float | None, device: str) -> tuple[float | None, str]:
    """(MB a trial may use, where that figure comes from): the cap, or the free CUDA memory, the lower."""
    limits = [(cap_mb, "train.memory_limit_mb")] if cap_mb is not None else []
    if device == "cuda":
        import torch

        limits.append((torch.cuda.mem_get_info()[0] / 2**20, "free CUDA memory"))
    return min(limits) if limits else (None, "")


class Objective:
    """Optuna objective: sample a point, run it, record it (Optuna user attrs + an MLflow child run)."""

    def __init__(self, config: Config, space: SearchSpace, tracker, parent_run_id: str, device: str,
                 base_tags: dict, planned: int, progress: Progress | None = None, examples_dir: Path | None = None):
        self.config = config
        self.examples_dir = examples_dir or config.study_dir  # per-example results (confirmation runs: their own)
        self.space = space
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.device = device
        self.base_tags = base_tags
        self.planned = planned
        self.started = 0
        self.progress = progress or Progress(planned, config.base.train.num_train_epochs, config.study.metric,
                                             config.study.direction)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        """Named phases: suggest (an excluded point ends here), start (recorded, MLflow run opened), train
        (each evaluation reported to the pruner), then finish, or pruned, or failed."""
        self.started += 1
        point = self._suggest(trial)
        ready = prepare(point.settings, self.device)  # settings within the budget, splits, targets, memory: once
        point = with_budget(point, ready)
        run = self._start(trial, point, ready)
        try:
            self._check_memory(trial, run, ready)
            result = self._train(trial, point, run, ready)
        except optuna.TrialPruned as e:
            self._pruned(trial, run, e)
            raise
        except BaseException as e:  # KeyboardInterrupt/SIGTERM too: the run must not stay RUNNING
            self._failed(trial, run, e)
            raise
        return self._finish(trial, point, run, result)

    def _suggest(self, trial: optuna.Trial) -> Point:
        try:
            return self.space.suggest(trial)
        except Excluded as e:
            record.write(trial, excluded=str(e), label=str(e).split(":")[0])
            log.info("[%d/%d] trial %d excluded, not trained: %s", self.started, self.planned, trial.number, e)
            self.progress.trial_finished()
            raise optuna.TrialPruned(f"excluded: {e}") from None

    def _start(self, trial: optuna.Trial, point: Point, ready: Prepared) -> "_Run":
        """Who, where and what, stored before any training (a trial that dies midway keeps it)."""
        run = _Run(tag=f"[{self.started}/{self.planned}] trial {trial.number} ({point.label})",
                   unit="step" if point.settings.train.eval_steps else "epoch",
                   epochs=point.settings.train.num_train_epochs)
        tuned = tuple(self.space.tuned)
        record.write(trial, label=point.label,
                     config={k: _jsonable(v) for k, v in record.configuration(point.values, tuned).items()},
                     tuned={k: _jsonable(point.values[k]) for k in tuned if k in point.values})
        self.progress.trial_started(trial.number, point.label)
        release_memory()
        record.write(trial, memory_before_mb=round(rss_mb(), 1),  # process RSS: proves a failed trial gave it back
                     device=self.device, worker=f"{socket.gethostname()}:{os.getpid()}",  # which worker ran it
                     precision=precision_name(point.settings.train, self.device))
        preview = ready.targets
        params = mlflow_params(point.settings, preview)
        record.write(trial, params={k: _jsonable(v) for k, v in params.items()},
                     lora_scale=float(point.settings.lora.scale),
                     predicted_memory_mb=round(ready.memory.peak_mb, 1) if ready.memory is not None else None)
        confirms = trial.user_attrs.get("confirms")  # a confirmation run: the search trial it repeats
        run.run_id = self.tracker.start_trial(self.parent_run_id, run_name(point), params, {
            **self.base_tags, "optuna_trial_number": trial.number, "label": point.label,
            "status": record.Status.RUNNING.value, **({"confirms_trial": confirms} if confirms is not None else {})})
        record.write(trial, mlflow_run_id=run.run_id)
        log.info("%s: r=%s lora_alpha=%s target_modules=%s lora_dropout=%s bias=%s", run.tag, point.settings.lora.r,
                 point.settings.lora.effective_alpha, ",".join(preview) or point.settings.lora.target_modules,
                 point.settings.lora.lora_dropout, point.settings.lora.bias)
        return run

    def _check_memory(self, trial: optuna.Trial, run: "_Run", ready: Prepared) -> None:
        """Infeasible: its predicted peak exceeds what it may use (train.memory_limit_mb, or the free CUDA
        memory); recorded with both figures and pruned before any step, so a resumed grid skips it too."""
        limit, source = memory_limit(ready.settings.train.memory_limit_mb, self.device)
        if ready.memory is not None:  # beside the measured figure in the run's metrics, trained or not
            self.tracker.log_metrics(run.run_id, {"predicted_memory_mb": ready.memory.peak_mb}, step=0)
        if limit is None or ready.memory is None or ready.memory.peak_mb <= limit:
            return
        reason = f"predicted {ready.memory.peak_mb:,.0f} MB > {limit:,.0f} MB allowed ({source})"
        record.write(trial, infeasible=reason, memory_limit_mb=round(limit, 1))
        self.tracker.log_metrics(run.run_id, {"memory_limit_mb": limit}, step=0)
        raise optuna.TrialPruned(f"infeasible, not trained: {reason}")

    def _on_epoch(self, trial: optuna.Trial, run: "_Run", step: int, metrics: dict) -> None:
        """One evaluation: logged, shown, and reported to the pruner (single-objective studies only)."""
        self.tracker.log_metrics(run.run_id, metrics, step=step)
        log.info("%s %s: %s", run.tag, f"epoch {step}/{run.epochs}" if run.unit == "epoch" else f"step {step}",
                 "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if run.unit == "epoch":
            self.progress.epoch_done(step)
        value = metrics.get(self.config.study.metric)
        if value is not None and not self.config.study.multi_objective:
            trial.report(value, step=step)
            if trial.should_prune():
                record.write(trial, pruned_at_step=step, pruned_at_unit=run.unit,
                             pruned_at_epoch=step if run.unit == "epoch" else None)
                why = ("stopped at its race rung (its arm's candidates are compared there)"
                       if trial.user_attrs.get("rung_cap") is not None else "pruned")
                raise optuna.TrialPruned(f"{why} after {run.unit} {step}: {self.config.study.metric}={value:.4f}")

    def _train(self, trial: optuna.Trial, point: Point, run: "_Run", ready: Prepared):
        with tempfile.TemporaryDirectory(prefix="lora-sweep-adapter-") as tmp:
            save = self.config.tracking.log_artifacts and point.settings.train.save_adapter
            result = run_trial(ready, self.device, lambda step, m: self._on_epoch(trial, run, step, m),
                               Path(tmp) / "adapter" if save else None)
            interrupt.check()  # interrupted after the last step: not a result either
            if result.adapter_dir is not None:
                self.tracker.log_artifacts(run.run_id, result.adapter_dir, "adapter")
        return result

    def _pruned(self, trial: optuna.Trial, run: "_Run", e: optuna.TrialPruned) -> None:
        rec = record.TrialRecord.from_user_attrs(trial.user_attrs)
        self.tracker.set_tags(run.run_id, {"status": record.Status.PRUNED.value, **{
            k: "" if v is None else v for k, v in (("pruned_at_step", rec.pruned_at_step),
                                                   ("pruned_at_unit", rec.pruned_at_unit),
                                                   ("pruned_at_epoch", rec.pruned_at_epoch))}, "reason": str(e)})
        self.tracker.finish_trial(run.run_id, "pruned")
        self.progress.trial_finished()
        log.info("%s pruned: %s", run.tag, e)

    def _failed(self, trial: optuna.Trial, run: "_Run", e: BaseException) -> None:
        error = failure_reason(e)
        e.__traceback__ = None  # the frames hold the trial's tensors: let them go now, not at the next trial
        release_memory()
        record.write(trial, error=error, memory_after_mb=round(rss_mb(), 1))
        self.tracker.set_tags(run.run_id, {"status": record.Status.FAILED.value, "error": error})
        self.tracker.finish_trial(run.run_id, "killed" if isinstance(e, KeyboardInterrupt) else "failed")
        self.progress.trial_finished()
        log.warning("%s failed: %s", run.tag, error)

    def _finish(self, trial: optuna.Trial, point: Point, run: "_Run", result) -> float | tuple[float, ...]:
        """The trial's figures recorded whole (Optuna and MLflow), its per-example results stored; the
        objective value(s) returned. The test split's never reach Optuna's value or its pruner."""
        figures = result.figures.stored()
        record.write(trial, **figures, epochs=result.epochs, memory_kind=result.memory_kind,
                     batch_shapes=result.batch_shapes, evaluated_at_s=[round(s, 3) for s in result.evaluated_at_s])
        numbers = {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.tracker.log_metrics(run.run_id, numbers, step=result.steps[-1] if result.steps else len(result.epochs))
        for split, frame in (("eval", result.examples), ("test", result.test_examples),
                             ("retention", getattr(result, "retention_examples", None))):
            if frame is not None:  # per-example results: beside the study, and on the trial's run
                path = record.write_examples(record.examples_path(self.examples_dir, trial.number, split=split), frame)
                if self.config.tracking.log_artifacts:
                    self.tracker.log_artifact(run.run_id, path, "examples" if split == "eval" else f"examples-{split}")
        if getattr(result, "retention_examples", None) is not None:  # the base's losses, once per study (attrs)
            from lora_sweep.trial.retention import write_base

            write_base(self.examples_dir, result.retention_examples)
        if result.samples is not None:  # instruction/chat data: a few generations, in the run's Artifacts table view
            from lora_sweep.report.frame import samples_path, write_samples

            write_samples(samples_path(self.examples_dir, trial.number), result.samples)  # the report reads them here
            self.tracker.log_table(run.run_id, result.samples, "generation_samples.json")
        self.tracker.set_tags(run.run_id, {"status": record.Status.COMPLETE.value, "memory_kind": result.memory_kind})
        self.tracker.finish_trial(run.run_id, "complete")
        m = result.metrics
        self.progress.trial_finished(m.get(self.config.study.metric), point.label)
        quality = "  ".join(f"{k}={m[k]:.4f}" for k in ("eval_accuracy", "eval_exact_match", "eval_chrf",
                                                         "eval_perplexity") if k in m)
        predicted = f" (predicted {m['predicted_memory_mb']:.0f})" if "predicted_memory_mb" in m else ""
        log.info("%s done: %s  trainable=%s (%.2f%%)  peak_memory=%.0f MB%s  %.1f s/epoch", run.tag, quality,
                 f"{m['trainable_params']:,}", m["trainable_pct"], m["peak_memory_mb"], predicted, m["epoch_time_s"])
        if self.config.study.multi_objective:
            return tuple(float(m[k]) for k in self.config.study.objectives)
        return m[self.config.study.metric]


@dataclass
class _Run:
    """A trial in flight: its progress tag, evaluation unit, planned epochs and MLflow run."""
    tag: str
    unit: str
    epochs: int
    run_id: str = ""


# Short names for the MLflow runs list, where width is scarce.
_SHORT = {"lora.lora_dropout": "drop", "lora.bias": "bias", "train.learning_rate": "lr", "train.seed": "seed",
          "lora.use_rslora": "rslora", "lora.use_dora": "dora", "model.load_in_4bit": "4bit"}


def run_name(point: Point) -> str:
    """`r=16 a=32 qkvo`, then whatever else sets this point apart (`bias=all`, `seed=1`, a variant's
    label), so runs read like the table's rows in the MLflow UI."""
    lora = point.settings.lora
    tm = lora.target_modules
    parts = [f"r={lora.r}", f"a={lora.effective_alpha}", tm if isinstance(tm, str) else "+".join(tm)]
    if lora.bias != "none":
        parts.append(f"bias={lora.bias}")
    if point.settings.model.load_in_4bit:
        parts.append("4bit")
    for path, value in point.values.items():
        if path in ("variant", "lora.r", "lora.lora_alpha", "lora.target_modules", "lora.bias",
                    "model.load_in_4bit"):
            continue
        parts.append(f"{_SHORT.get(path, path.split('.')[-1])}={value:g}" if isinstance(value, float)
                     else f"{_SHORT.get(path, path.split('.')[-1])}={value}")
    name = " ".join(parts)
    if "variant" in point.values:
        label = point.label.split(", ")[0]
        name = f"{label}: {name}"
    return name


def with_budget(point: Point, ready: Prepared) -> Point:
    """The point at the r its lora.param_budget resolves to, which its label shows (`target_modules=qv, r=24`);
    a 4-bit base resolves it when the trial trains."""
    if point.settings.lora.param_budget is None or ready.base is None:
        return point
    settings = ready.settings
    label = f"r={settings.lora.r}" if point.label == "base" else f"{point.label}, r={settings.lora.r}"
    return replace(point, settings=settings, label=label)


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v
