"""The report's recommendation, in one place: the report, the summary, the MLflow view and `export`
all ask here, so they never disagree.

- After a complete confirmation stage (report/confirm.py): its winner, or the cheapest
  configuration statistically indistinguishable from the best over seeds and examples.
- Otherwise, with per-example results: the cheapest configuration the paired tests cannot tell
  from the most accurate one (report/paired.py: exact McNemar, Holm; fewest trainable parameters,
  then time), one seed; on instruction/chat data the best by study.metric (McNemar on exact match,
  a paired bootstrap on chrF or loss).
- Otherwise (older studies): the best study.metric, ties to fewer trainable parameters.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from dataclasses import dataclass

from lora_sweep.config import Config
from lora_sweep.config.urls import redact
from lora_sweep.record import TrialRecord
from lora_sweep.report.compare import CORRECTNESS

GENERATED = ("eval_exact_match", "eval_chrf")  # metrics of instruction/chat data only


@dataclass(frozen=True)
class Recommendation:
    trial: object    # the search trial (FrozenTrial) to use: the configuration's own run
    how: str         # the rule that picked it, in words
    confirmed: bool  # across seeds (a confirmation stage), not from one run


UNSET = object()  # a verdict the caller has not computed (None: computed, and there is none)


def search_verdict(config: Config, study):
    """The search's paired verdict (findings.verdict_of over the stored trials and their examples), or None."""
    from lora_sweep.report.findings import verdict_of
    from lora_sweep.report.frame import load_examples, trials_frame

    df = trials_frame(study)
    if not len(df):
        return None
    return verdict_of(df, load_examples(config.study_dir, df), config.study.metric, config.study.direction)


def recommend(config: Config, study, confirmed: bool = True, v=None, pv=UNSET) -> Recommendation | None:
    """The recommended configuration's search trial and why; None without a complete trial.
    confirmed=False: the search's own pick, the confirmation stage left out; v, pv: the confirmation's
    and the search's verdicts when the caller has them already (their bootstraps are the costly part)."""
    from lora_sweep.report.confirm import verdict

    v = (v or verdict(config, study)) if confirmed else None
    if v is not None and v.complete:
        chosen = v.recommended
        how = (f"the confirmation stage's winner over {len(chosen.values)} seeds" if v.winner is not None else
               f"the cheapest configuration statistically indistinguishable from the best over "
               f"{len(v.best.values)} seeds (confirmation stage)")
        return Recommendation(study.trials[chosen.trial], how, True)
    picked = _paired_pick(config, study, search_verdict(config, study) if pv is UNSET else pv)
    if picked is not None:
        return picked
    best = best_trial(config, study)
    if best is None:
        return None
    need = ("the trials' per-example results, which earlier versions did not store" if config.study.metric in
            GENERATED else "per-example accuracy of a classifier or of labelled generation")
    return Recommendation(best, f"the best {config.study.metric} among complete trials, ties to fewer trainable "
                                f"parameters; no paired test backs it (those need {need})", False)


def best_trial(config: Config, study):
    """The complete trial with the best study.metric; a tie goes to fewer trainable parameters, then
    to the earlier trial. With study.tune, among each configuration's chosen candidate's runs only."""
    from optuna.trial import TrialState

    from lora_sweep.report.arms import chosen_trials
    from lora_sweep.report.frame import trials_frame

    sign = 1 if config.study.direction == "maximize" else -1
    allowed = chosen_trials(trials_frame(study), config.study.metric, config.study.direction)
    best, best_key = None, None
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rec = TrialRecord.from_trial(t)
        value = rec.figure(config.study.metric)
        if math.isnan(value) or (allowed is not None and t.number not in allowed):
            continue
        params = rec.trainable_params if rec.trainable_params is not None else math.inf
        key = (sign * value, -params, -t.number)
        if best_key is None or key > best_key:
            best, best_key = t, key
    return best


def _paired_pick(config: Config, study, pv) -> Recommendation | None:
    """Paired tests: the findings' "cheapest of these" configuration, as a trial (its best run)."""
    from lora_sweep.report.frame import trials_frame

    if pv is None:
        return None
    level = pv.pick
    df = trials_frame(study)
    done = df[df["trial"].isin(level.trials)]
    metric = done[config.study.metric].astype(float)
    number = int(done.loc[metric.idxmax() if config.study.direction == "maximize" else metric.idxmin(), "trial"])
    seeds = "on one seed" if len(level.trials) == 1 else f"over its {len(level.trials)} runs"
    tests = "(McNemar, Holm)" if config.study.metric in CORRECTNESS and len(level.trials) == 1 else "(Holm)"
    what = "most accurate" if config.study.metric == "eval_accuracy" else f"best by {config.study.metric}"
    return Recommendation(study.trials[number], f"the cheapest configuration the paired tests {tests} cannot tell "
                                                f"from the {what}, {seeds}", False)


def _disagreements(v, pv, r: Recommendation, free_text: bool = False) -> list[str]:
    """Up to five examples the recommended configuration and the best answer differently (free_text:
    generated answers, instruction/chat data)."""
    import lora_sweep.report.compare as compare
    import lora_sweep.report.paired as paired

    if r.confirmed and v is not None and v.complete and v.recommended is not v.best:
        best, pick = v.best, v.recommended
        return paired.disagreement_lines(best.label, pick.label, compare.Runs(best.seeds, best.examples),
                                         compare.Runs(pick.seeds, pick.examples), free_text)
    if r.confirmed or pv is None or pv.pick is pv.best:
        return []
    i, j = pv.levels.index(pv.best), pv.levels.index(pv.pick)
    return paired.disagreement_lines(pv.best.name, pv.pick.name, pv.runs[i], pv.runs[j], free_text)


def _generates_text(study) -> bool:
    """Instruction/chat data: some trial scored generated answers by exact match."""
    return any(TrialRecord.from_trial(t).eval_exact_match is not None for t in study.get_trials(deepcopy=False))


def export_command(config: Config) -> str:
    """The command that exports this sweep's recommendation, as a user can paste it: `python -m lora_sweep
    export sweep=NAME`, plus the store's locations where they are not the defaults (study.storage,
    paths.sweeps_dir, tracking.uri; passwords redacted). The sweep's other settings come from its study."""
    parts = ["python -m lora_sweep export", f"sweep={config.study.name}"]
    if config.study.storage:
        parts.append(f"study.storage={redact(config.study.storage)}")
    if config.paths.sweeps_dir != Path("sweeps").resolve():
        parts.append(f"paths.sweeps_dir={config.paths.sweeps_dir}")
    if config.tracking.uri:
        parts.append(f"tracking.uri={redact(config.tracking.uri)}")
    return " ".join(shlex.quote(p) if i else p for i, p in enumerate(parts))


def section(config: Config, study, pv=UNSET) -> list[str]:
    """The report's confirmation section (when the sweep has one) and its recommendation line; pv: the
    search's paired verdict when the caller has it."""
    from lora_sweep.report.confirm import section as confirmation, test_lines, verdict

    v = verdict(config, study)
    pv = search_verdict(config, study) if pv is UNSET else pv
    lines = confirmation(v) + test_lines(v) if v is not None else []
    r = recommend(config, study, v=v, pv=pv)
    if r is None:
        return lines
    rec = TrialRecord.from_trial(r.trial)
    lines += ["", "## Recommendation", "",
              f"**{rec.label}** (trial #{r.trial.number}): {r.how}. `{export_command(config)}` writes it (adapter, "
              "any trained head, tokenizer, model card) and checks that it loads."]
    lines += _disagreements(v, pv, r, _generates_text(study))
    if not r.confirmed and (pv is None or pv.pick.runs == 1):  # a pick over several seeds says so in r.how
        lines.append("One seed only: set study.confirm (e.g. `study.confirm={top_k: 3, seeds: 3}`) to re-train the "
                     "top configurations under more seeds before trusting a small difference.")
    return lines
