"""Every name a user may type for a choice, owned here so that validation needs no later stage."""

from __future__ import annotations

BIAS_CHOICES = ("none", "all", "lora_only")
TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM")  # lora_sweep/trial/tasks.py: one class each
SAMPLING_STRATEGIES = ("random", "group_by_length", "sequential")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DIRECTIONS = ("maximize", "minimize")
# What a study can optimise, and which way is better. The eval metrics come from every evaluation
# (pruning reads them); the cost figures only exist once a trial finishes (multi-objective only).
METRIC_DIRECTIONS = {"eval_accuracy": "maximize", "eval_f1": "maximize", "eval_loss": "minimize",
                     "eval_perplexity": "minimize"}
COST_OBJECTIVES = ("trainable_pct", "peak_memory_mb", "epoch_time_s")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
MODES = ("sweep", "report", "export", "ui")


# study.sampler / study.pruner: lora_sweep.search.samplers maps each name to its Optuna factory.
SAMPLER_NAMES = ("grid", "random", "tpe", "nsga2", "cmaes", "qmc", "gp")
PRUNER_NAMES = ("none", "median", "percentile", "successive_halving", "hyperband")


def metric_names(task_type: str, labelled: bool = True) -> tuple[str, ...]:
    """The metrics a trial of this task reports every epoch (study.metric must be one of them)."""
    if task_type == "SEQ_CLS":
        return ("eval_accuracy", "eval_f1", "eval_loss")
    if labelled:
        return ("eval_accuracy", "eval_f1", "eval_loss", "eval_perplexity")
    return ("eval_loss", "eval_perplexity")
