"""Findings in the guide's style, computed from the trials DataFrame (report.trials_frame).

Every sentence names the configurations (and trial numbers) its figures come from, and every
difference is compared with a noise band before it is called a trend:

- repeated seeds (a space over train.seed, or the same point run twice): the pooled standard
  deviation of accuracy between runs of one configuration;
- otherwise the eval set's sampling error (binomial, n eval examples), which is a floor: run-to-run
  training noise comes on top and was not measured.

A difference smaller than 1.96 standard errors of the difference is reported as within noise.

When every complete trial stored its per-example results, configurations are compared on the same
examples instead (paired.py: exact McNemar, Holm-adjusted, paired-bootstrap intervals); on
instruction/chat data (no accuracy) that is the only comparison made, on study.metric: McNemar on
exact match over the generated answers, a paired bootstrap on chrF or loss.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

import lora_sweep.report.arms as arms
import lora_sweep.report.compare as compare
import lora_sweep.report.paired as paired
from lora_sweep.report.arms import tuned_paths
from lora_sweep.record import TrialRecord

SEED = "param.train.seed"
ACC, PCT = "eval_accuracy", "trainable_pct"


@dataclass(frozen=True)
class Noise:
    sd: float           # accuracy points, one run
    source: str         # "seeds" | "binomial"
    detail: str

    def band(self, n1: int = 1, n2: int = 1) -> float:
        """Half-width (points) of the ~95% interval of a difference between two means."""
        return 1.96 * self.sd * math.sqrt(1 / n1 + 1 / n2)


def complete(df: pd.DataFrame) -> pd.DataFrame:
    if not len(df):
        return df
    done = df[(df["status"] == "complete")]
    return done[done[ACC].notna() & done[PCT].notna()]


def is_chat(df: pd.DataFrame) -> bool:
    """Instruction/chat data: generated answers scored by exact match, no eval_accuracy."""
    return bool(len(df)) and "eval_exact_match" in df and df["eval_exact_match"].notna().any()


def compared(df: pd.DataFrame, metric: str = ACC) -> pd.DataFrame:
    """The complete trials the findings compare: complete() on labelled data; on instruction/chat data
    (no accuracy) those with `metric` and a trainable share."""
    if not is_chat(df) or len(complete(df)):
        return complete(df)
    done = df[df["status"] == "complete"]
    return done[done[metric].notna() & done[PCT].notna()] if metric in done else done.iloc[:0]


def pareto_mask(df: pd.DataFrame) -> pd.Series:
    """True for rows no other row beats on both accuracy (higher) and trainable % (lower); with study.tune, among
    each configuration's chosen candidate's runs (a losing candidate's lucky run is no configuration's)."""
    mine = arms.represents(df)
    acc = np.where(mine, df[ACC].to_numpy(dtype=float), np.nan)
    pct = df[PCT].to_numpy(dtype=float)
    keep = []
    for i in range(len(df)):
        dominated = ((acc >= acc[i]) & (pct <= pct[i]) & ((acc > acc[i]) | (pct < pct[i]))).any()
        keep.append(bool(np.isfinite(acc[i]) and np.isfinite(pct[i]) and not dominated))
    return pd.Series(keep, index=df.index, dtype=bool)


def config_columns(df: pd.DataFrame) -> list[str]:
    """The searched parameters that define a configuration (the seed is the repetition axis; tuned values
    are each configuration's own, chosen on validation)."""
    tuned = {f"param.{p}" for p in tuned_paths(df)}
    return [c for c in df.columns if c.startswith("param.") and c != SEED and c not in tuned]


def varied(df: pd.DataFrame) -> list[str]:
    return [c for c in config_columns(df) if df[c].astype(str).nunique() > 1]


def noise(df: pd.DataFrame, eval_size: int | None) -> Noise | None:
    done = complete(df)
    if not len(done):
        return None
    # runs of one candidate repeat each other; another tuned value (a learning rate) is not a repeat
    keys = [c for c in done.columns if c.startswith("param.") and c != SEED] + (["sweep"] if "sweep" in done else [])
    groups = done.groupby([done[k].astype(str) for k in keys], sort=False)[ACC] if keys else [(0, done[ACC])]
    dof, ss, n_repeated = 0, 0.0, 0
    for _, acc in groups:
        if len(acc) > 1:
            n_repeated += 1
            dof += len(acc) - 1
            ss += float(((100 * acc - 100 * acc.mean()) ** 2).sum())
    if dof:
        sd = math.sqrt(ss / dof)
        return Noise(sd, "seeds", f"pooled standard deviation {sd:.2f} points between repeated runs of "
                                  f"{n_repeated} configuration(s) ({dof + n_repeated} runs)")
    if "eval_n" in done and done["eval_n"].notna().any():  # the examples each accuracy counts (scored ones)
        eval_size = int(done["eval_n"].dropna().min())
    if not eval_size:
        return None
    p = float(done[ACC].mean())
    sd = 100 * math.sqrt(max(p * (1 - p), 1e-12) / eval_size)
    return Noise(sd, "binomial", f"no repeated seeds here, so this is the eval set's sampling error alone "
                                 f"(binomial, {eval_size} examples, {sd:.2f} points per run); training "
                                 f"noise between seeds comes on top (add a space over train.seed to measure it)")


@dataclass(frozen=True)
class Level:
    """One configuration: its runs averaged over seeds."""
    name: str
    acc: float      # points
    pct: float      # trainable %
    params: float   # trainable parameters
    runs: int
    trials: tuple
    value: float = float("nan")   # the mean of the study's metric over its runs (accuracy as a fraction)

    @property
    def ref(self) -> str:
        return f"{self.name} ({_trials(self.trials)})"


def variant_label(label: str) -> str:
    """A point's label is the variant's label, then ", path=value" for other searched parameters; keep the
    variant's own label whole even when it has commas ("Text Generation (r=8, q/k/v/o)")."""
    parts = label.split(", ")
    while len(parts) > 1 and re.match(r"^[\w.\-]+=", parts[-1]):
        parts.pop()
    return ", ".join(parts)


def config_keys(done: pd.DataFrame) -> pd.Series:
    """Each row's configuration: its searched values without the nuisance ones (the seed), as text.
    Runs of one configuration under several seeds share a key; the label text (which names the seed)
    never decides it."""
    if "config" in done and done["config"].notna().all():
        return done["config"].astype(str)
    cols = config_columns(done)
    return pd.Series([compare.config_key({c: r[c] for c in cols if pd.notna(r[c])}) for _, r in done.iterrows()],
                     index=done.index, dtype=str)


def config_label(label: str, tuned=()) -> str:
    """A run's label without its seed part ("r=4, lora_dropout=0.1, seed=2" -> "r=4, lora_dropout=0.1"), nor
    the parts of the `tuned` paths (", learning_rate=0.001": each configuration's own, not its name)."""
    return arms.arm_label(label, tuned)


def levels(done: pd.DataFrame, column: str | None, metric: str = ACC) -> list[Level]:
    """Configurations in table order; `column` groups by one parameter, None by the whole configuration."""
    key = done[column].astype(str) if column else config_keys(done)
    out = []
    for name, g in done.groupby(key, sort=False):
        if column == "param.variant":  # the variant's label ("Query-Only"), not its key
            name = variant_label(str(g["label"].iloc[0]))
        elif column:
            name = _show(g[column].iloc[0])
        else:
            name = config_label(g["label"].iloc[0], tuned_paths(done))
        value = float(g[metric].astype(float).mean()) if metric in g else float("nan")
        out.append(Level(str(name), 100 * float(g[ACC].mean()),
                         float(g[PCT].mean()), float(g["trainable_params"].mean()), len(g),
                         tuple(int(t) for t in g["trial"]), value))
    return out


_UNSET = object()


def sweep_findings(df: pd.DataFrame, eval_size: int | None, importances: dict | None = None,
                   examples: dict | None = None, metric: str = ACC, direction: str = "maximize",
                   verdict=_UNSET) -> list[str]:
    """Findings for one sweep (one study); `examples`: trial number -> its per-example results
    (lora_sweep.record.read_examples), which turn on the paired tests of `metric`; `verdict`: their
    verdict_of when the caller has it already. With study.tune, each configuration at its chosen candidate."""
    done = arms.choose(compared(df, metric), metric, direction)[0]
    chat = not len(complete(df)) and is_chat(df)
    if not len(done):
        return [CHAT_FINDING] if chat else ["No complete trials yet, so nothing to compare."]
    vary = varied(done)
    column = vary[0] if len(vary) == 1 else None
    numeric = column is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in done[column])
    warning = paired.scale_warning(done, levels(done, column), column, numeric)
    verdict = verdict_of(done, examples, metric, direction) if verdict is _UNSET else verdict
    if verdict is not None:
        lines = [_varied_line(vary, importances, metric)] if len(vary) > 1 else []
        lines += paired.paired_lines(verdict, numeric)
        lines[-1:-1] = [x for x in (warning, _cost(done)) if x]
        return lines
    if chat:  # no per-example results (an older study): the noise band below keys on accuracy
        return [CHAT_FINDING]
    nz = noise(done, eval_size)
    lines = []
    if len(vary) == 1:
        column = vary[0]
        lv = levels(done, column)
        name = column.removeprefix("param.").split(".")[-1]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in done[column])
        lines.append(_steps(name, lv, nz) if numeric else _against_best(lv, nz))
    elif len(vary) > 1:
        lines.append(_varied_line(vary, importances))
    lines.append(_best(levels(done, None), nz))
    lines += [x for x in (warning, _cost(done)) if x]
    lines.append("Paired tests (configurations compared on the same eval examples: McNemar, paired intervals) "
                 "need per-example results, which these trials did not store (written by earlier versions, or "
                 "a plain-text language model, which has no per-example correctness); differences are judged "
                 "by the noise band instead.")
    if nz is not None:
        lines.append(f"Noise band: ±{nz.band():.1f} points for two single runs; {nz.detail}.")
    return lines


# Instruction/chat sweeps whose trials stored no per-example results (earlier versions): said once.
CHAT_FINDING = ("Instruction/chat data: compare Exact match, chrF and Eval loss in the table. Paired tests (McNemar "
                "on exact match, paired bootstrap on chrF or loss) need each trial's per-example results "
                "(examples/ beside the study), which these trials did not store; the noise band and Pareto front "
                "key on eval_accuracy and are not computed for them.")


def verdict_of(done: pd.DataFrame, examples: dict | None, metric: str = ACC,
               direction: str = "maximize") -> "paired.PairedVerdict | None":
    """The paired verdict over the complete trials (None without per-example results of `metric`):
    the one object the findings' sentences and the recommendation both read. With study.tune, each
    configuration (arm) is compared at its chosen candidate: the runs arms.choose keeps on validation."""
    done = arms.choose(compared(done, metric), metric, direction)[0]
    if not len(done) or not examples or metric not in done or not paired.has_examples(done, examples, metric):
        return None
    vary = varied(done)
    column = vary[0] if len(vary) == 1 else None
    numeric = column is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in done[column])
    knob = column.removeprefix("param.").split(".")[-1] if column else None
    lv = levels(done, column, metric)
    if knob:  # "r=8", not "8"
        lv = [replace(x, name=f"{knob}={x.name}") for x in lv]
    return paired.paired_verdict(done, lv, numeric, examples, metric, direction, knob)


def _varied_line(vary: list[str], importances: dict | None, metric: str = ACC) -> str:
    what = ", ".join(f"`{c.removeprefix('param.')}`" for c in vary)
    line = f"{len(vary)} parameters varied together ({what}), so no single parameter's effect is isolated"
    if importances:
        line += (f"; fANOVA importance for {'accuracy' if metric == ACC else metric}: "
                 + ", ".join(f"`{k}` {v:.2f}" for k, v in importances.items()))
    return line + "."


def overall_findings(done: pd.DataFrame, nz: Noise | None) -> list[str]:
    """Across sweeps: the best row and the Pareto-optimal rows."""
    if not len(done):
        return []
    rows = [Level(f"{r['label']} [{r['sweep']}]", 100 * r[ACC], r[PCT], r["trainable_params"], 1,
                  (int(r["trial"]),)) for _, r in done.iterrows()]
    return [_best(rows, nz)]


def pareto_sentence(done: pd.DataFrame, mask: pd.Series, sweep_col: bool = False) -> str:
    names = [f"{r['label']}" + (f" [{r['sweep']}]" if sweep_col else "") for _, r in done[mask].iterrows()]
    return ("Pareto-optimal (no other configuration is both more accurate and trains a smaller share of "
            f"parameters; marked ✓ in the table): {', '.join(names)}.")


# -- sentences ---------------------------------------------------------------------------------

def _steps(name: str, lv: list[Level], nz: Noise | None) -> str:
    parts, within, beyond = [], [], []
    for a, b in zip(lv, lv[1:]):
        d = b.acc - a.acc
        verb = "gained" if d > 0 else "lost" if d < 0 else "changed nothing"
        size = f" {abs(d):.1f} points" if d else ""
        parts.append(f"{a.name} to {b.name} {verb}{size} ({a.acc:.1f}% → {b.acc:.1f}%, "
                     f"{_ratio(b.params, a.params)} the trainable parameters)")
        step = f"{a.name}→{b.name}"
        if nz is not None and abs(d) < nz.band(a.runs, b.runs):
            within.append(step)
        else:
            beyond.append(step)
    text = f"Raising {name} from " + "; ".join(parts) + f" [{_trials([t for x in lv for t in x.trials])}]."
    if nz is None:
        return text
    band = f"±{nz.band():.1f} points"
    if not beyond:
        return text + f" Every step is within noise ({band}): this sweep shows no trend in {name}."
    gains = [b.acc - a.acc for a, b in zip(lv, lv[1:])]
    if within:
        text += f" Within noise ({band}): {', '.join(within)}; beyond it: {', '.join(beyond)}."
    if len(gains) > 1 and all(g > 0 for g in gains) and all(x > y for x, y in zip(gains, gains[1:])):
        text += " Gains diminish as it grows."
    return text


def _against_best(lv: list[Level], nz: Noise | None) -> str:
    best = max(lv, key=lambda x: (x.acc, -x.params))
    parts = []
    for x in lv:
        if x is best:
            continue
        d = best.acc - x.acc
        noise_note = ""
        if nz is not None:
            noise_note = " (within noise)" if 0 < round(d, 1) and d < nz.band(x.runs, best.runs) else ""
        worse = f"{d:.1f} points less accurate" if round(d, 1) else "as accurate"
        parts.append(f"{x.ref} trained {_fewer_more(x.params, best.params)} and was {worse}{noise_note}")
    head = f"Against the most accurate, {best.ref} at {best.acc:.1f}%: "
    return head + "; ".join(parts) + "." if parts else f"Only {best.ref} completed."


def _best(lv: list[Level], nz: Noise | None) -> str:
    best = max(lv, key=lambda x: (x.acc, -x.params))  # a tie goes to the smaller adapter
    text = f"Best configuration: {best.ref}, {best.acc:.1f}% accuracy with {best.pct:.2f}% of parameters trainable."
    if nz is None:
        return text
    close = [x for x in lv if x is not best and best.acc - x.acc < nz.band(x.runs, best.runs)]
    if close:
        cheapest = min([best, *close], key=lambda x: x.params)
        text += (f" Within noise of it (±{nz.band():.1f} points): {', '.join(x.name for x in close)}"
                 + (f"; the cheapest of these is {cheapest.ref}, {cheapest.pct:.2f}% trainable."
                    if cheapest is not best else "; none trains fewer parameters."))
    return text


def _cost(done: pd.DataFrame) -> str:
    def span(col: str, fmt: str) -> str:
        v = done[col].dropna()
        if not len(v):
            return "not measured"
        lo, hi = done.loc[v.idxmin()], done.loc[v.idxmax()]
        return (f"{fmt.format(v.min())} ({lo['label']}) to {fmt.format(v.max())} ({hi['label']})"
                if len(v) > 1 else fmt.format(v.min()))

    return (f"Time per epoch ranged from {span('epoch_time_s', '{:.1f} s')}; peak memory from "
            f"{span('peak_memory_mb', '{:,.0f} MB')}.")


def _fewer_more(n: float, ref: float) -> str:
    if n < ref:
        return f"{100 * (1 - n / ref):.0f}% fewer parameters"
    if n == ref:
        return "as many parameters"
    return f"{100 * (n / ref - 1):.0f}% more parameters" if n < 2 * ref else f"{n / ref:.1f}× the parameters"


def _ratio(n: float, ref: float) -> str:
    return f"{n / ref:.1f}×" if ref else "?"


def _trials(numbers) -> str:
    numbers = list(numbers)
    return ("trial " if len(numbers) == 1 else "trials ") + ", ".join(f"#{n}" for n in numbers)


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and value.startswith("["):  # a list parameter, JSON-encoded in the frame
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, (list, tuple)):  # as the table writes it: q_proj+v_proj
        return "+".join(map(str, value))
    return str(value)


def param_importances(study, metric: str = ACC) -> dict | None:
    """fANOVA importances of the searched parameters for `metric` (seeded, so a rebuilt report
    reads the same); None when fewer than two parameters vary or too few trials completed."""
    import warnings

    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    vary = [p for p in sorted({k for t in done for k in t.params})
            if len({repr(t.params.get(p)) for t in done}) > 1]
    if len(vary) < 2 or len(done) < 3:
        return None
    if len({getattr(TrialRecord.from_trial(t), metric) for t in done}) < 2:
        return None  # every trial scored the same: fANOVA raises "zero total variance"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            target=lambda t: TrialRecord.from_trial(t).figure(metric))
