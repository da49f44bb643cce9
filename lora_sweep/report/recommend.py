"""The report's recommendation, in one place: the report's "Best" line and `export` both ask here.

Today: the complete trial with the best study.metric; a tie goes to the fewer trainable parameters
(the smaller adapter), then to the earlier trial. A later confirmation stage replaces the rule here.
"""

from __future__ import annotations

import math

from lora_sweep.config import Config
from lora_sweep.record import TrialRecord

RULE = "the best {metric} among complete trials, ties to fewer trainable parameters"


def recommended_trial(config: Config, study):
    """The recommended FrozenTrial, or None when no complete trial has a value of study.metric."""
    from optuna.trial import TrialState

    sign = 1 if config.study.direction == "maximize" else -1
    best, best_key = None, None
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rec = TrialRecord.from_trial(t)
        value = rec.figure(config.study.metric)
        if math.isnan(value):
            continue
        params = rec.trainable_params if rec.trainable_params is not None else math.inf
        key = (sign * value, -params, -t.number)
        if best_key is None or key > best_key:
            best, best_key = t, key
    return best


def rule(config: Config) -> str:
    """How the recommendation was picked, in words."""
    return RULE.format(metric=config.study.metric)
