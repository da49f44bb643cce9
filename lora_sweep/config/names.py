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
                     "eval_perplexity": "minimize", "eval_exact_match": "maximize", "eval_chrf": "maximize"}
COST_OBJECTIVES = ("trainable_pct", "peak_memory_mb", "epoch_time_s")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
MODES = ("sweep", "report", "export", "ui")
# data.format: the shape of the examples (lora_sweep/trial/chat.py); auto detects it from the columns
DATA_FORMATS = ("auto", "labelled", "text", "prompt_completion", "messages", "sharegpt", "alpaca")
CHAT_FORMATS = ("prompt_completion", "messages")  # instruction / chat data: CAUSAL_LM, loss on the answer
# instruction / chat data read as messages (chat.check_rows converts them): Splits.format never holds these
CHAT_DIALECTS = ("sharegpt", "alpaca")
# data.generate_at: generate at every evaluation or the last only; auto = every on labelled data (one-word answers), last on instruction/chat data
GENERATE_AT = ("auto", "every", "last")
TRUNCATIONS = ("left", "drop")  # data.truncation: an over-long example's prompt is cut from the left, or it is dropped


# study.sampler / study.pruner: lora_sweep.search.samplers maps each name to its Optuna factory.
SAMPLER_NAMES = ("grid", "random", "tpe", "nsga2", "cmaes", "qmc", "gp")
PRUNER_NAMES = ("none", "median", "percentile", "successive_halving", "hyperband")


def metric_names(task_type: str, labelled: bool = True, chat: bool = False) -> tuple[str, ...]:
    """The metrics a trial of this task reports (study.metric must be one of them); `chat`: instruction/chat
    data (CHAT_FORMATS), whose generated answers score exact match and chrF."""
    if chat:
        return ("eval_loss", "eval_perplexity", "eval_exact_match", "eval_chrf")
    if task_type == "SEQ_CLS":
        return ("eval_accuracy", "eval_f1", "eval_loss")
    if labelled:
        return ("eval_accuracy", "eval_f1", "eval_loss", "eval_perplexity")
    return ("eval_loss", "eval_perplexity")
