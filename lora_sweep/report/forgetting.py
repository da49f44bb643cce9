"""Forgetting in the report (CAUSAL_LM, data.retention_size; lora_sweep/trial/retention.py): each
configuration's forgetting of general English with its 95% interval, a finding only where a paired
test says configurations differ, and a plot of the task metric against forgetting.

Every trial of a sweep scores the same passages (their sha256 is each row's label in
examples-retention/), against the same base, so two configurations' forgetting differs per passage by
their adapted losses alone: the base cancels. The comparison is each configuration against the one
that forgets least, a paired t-test over passages (scipy's ttest_rel: it tests the mean, which is what
forgetting is), Holm-adjusted over those pairs. A configuration run under several seeds counts as the
mean of its runs per passage; the passages are the unit, so seed-to-seed noise is not in the test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from lora_sweep import record

FILE = "forgetting.png"
TITLE = "Task metric vs forgetting of general English"
UNIT = "nats/token"
ALPHA = 0.05
_METRICS = ("eval_accuracy", "eval_exact_match", "eval_chrf", "eval_loss", "eval_perplexity")  # plot default order


def forgotten(df: pd.DataFrame) -> pd.DataFrame:
    """The complete trials that measured forgetting."""
    if not len(df) or "forgetting" not in df:
        return df.iloc[0:0]
    return df[(df["status"] == "complete") & df["forgetting"].notna()]


def load_retention(study_dir, done: pd.DataFrame) -> dict:
    """Trial number -> its per-passage results (examples-retention/), for those that stored them."""
    out = {}
    for t in done["trial"]:
        path = record.examples_path(study_dir, int(t), split="retention")
        if path.exists():
            out[int(t)] = record.read_examples(path)
    return out


def _configurations(done: pd.DataFrame) -> list[tuple[str, list[int]]]:
    from lora_sweep.report.findings import config_keys, config_label

    # study.tune: each candidate apart (its rate is part of what forgets), never an arm's rates pooled as seeds
    key = config_keys(done) + ("\x00" + done["tuned"].astype(str) if "tuned" in done else "")
    return [(config_label(g["label"].iloc[0]), [int(t) for t in g["trial"]]) for _, g in done.groupby(key, sort=False)]


def _passages(frames: list[pd.DataFrame]) -> tuple | None:
    """The passages' hashes in example_id order, where every frame scored exactly the same ones."""
    keys = [tuple(f["label"].astype(str)) for f in frames]
    ids = [tuple(f["example_id"].astype(int)) for f in frames]
    return keys[0] if keys and len(set(keys)) == 1 and len(set(ids)) == 1 else None


def paired_t(first, second) -> float:
    """Two-sided p of the paired t-test of first - second over passages (nan-free arrays)."""
    from scipy.stats import ttest_rel

    d = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    if not np.any(d != 0):  # identical per passage: no difference at all (scipy would give nan)
        return 1.0
    return float(ttest_rel(first, second).pvalue)


def comparisons(names: list[str], losses: list[np.ndarray]) -> list[dict]:
    """Each configuration against the one that forgets least (lowest mean adapted loss, which is the
    lowest forgetting on a shared base): difference per passage, paired t p, Holm-adjusted p."""
    from lora_sweep.report.stats import holm

    least = int(np.argmin([x.mean() for x in losses]))
    out = [{"least": names[least], "other": names[i], "diff": float((losses[i] - losses[least]).mean()),
            "p": paired_t(losses[i], losses[least]), "n": int(losses[i].size)}
           for i in range(len(names)) if i != least]
    for row, adjusted in zip(out, holm([r["p"] for r in out])):
        row["p_adj"] = adjusted
    return out


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def lines(df: pd.DataFrame, study_dir) -> list[str]:
    """The report's forgetting section (markdown lines); [] where no complete trial measured it."""
    from lora_sweep.report.stats import mean, paired_bootstrap
    from lora_sweep.trial.retention import SOURCE_NAME, SOURCE_PACKAGE, read_base, set_hash

    done = forgotten(df)
    if not len(done):
        return []
    frames = load_retention(study_dir, done)
    base = read_base(study_dir)
    configs = _configurations(done)
    shared = _passages(list(frames.values())) if len(frames) == len(done) else None
    if base is not None and (not shared or tuple(base["label"].astype(str)) != shared):
        base = None  # stored for other passages: the stored figures stand
    n = int(done["retention_n"].max())
    named = f"; set sha256 {set_hash(shared)[:12]}…" if shared else ""
    out = ["", "## Forgetting", "",
           f"How much each adapter made the base model forget general English: the mean per-token loss on {n} fixed "
           f"passages of the {SOURCE_NAME} ({SOURCE_PACKAGE}{named}; the same in every trial) under the adapted model minus under "
           f"the base model, in {UNIT}; above 0 it forgot, below 0 it improved. 95% CI: a paired bootstrap over "
           "the passages.", "",
           f"| Configuration | Forgetting ({UNIT}) | 95% CI | Retention loss | Base loss | Trials |",
           "|:--|--:|--:|--:|--:|--:|"]
    losses = []
    for name, trials in configs:
        rows = done[done["trial"].astype(int).isin(trials)]
        if shared:
            adapted = np.mean([frames[t]["loss"].to_numpy(dtype=float) for t in trials], axis=0)
            losses.append(adapted)
        if shared and base is not None:  # several seeds: their mean per passage against the stored base
            b = base["loss"].to_numpy(dtype=float)
            ok = np.isfinite(adapted) & np.isfinite(b)
            d = paired_bootstrap(mean, (adapted[ok],), (b[ok],), seed=0)
            est, low, high, ret, bl = d.estimate, d.low, d.high, float(adapted[ok].mean()), float(b[ok].mean())
        else:  # the stored figures; an interval only for a single run
            est, ret, bl = (float(rows[c].astype(float).mean()) for c in ("forgetting", "retention_loss",
                                                                           "base_retention_loss"))
            low, high = ((float(rows["forgetting_low"].iloc[0]), float(rows["forgetting_high"].iloc[0]))
                         if len(rows) == 1 else (math.nan, math.nan))
        ci = "n/a" if math.isnan(low) else f"{_signed(low)} to {_signed(high)}"
        out.append(f"| {name} | {_signed(est)} | {ci} | {ret:.3f} | {bl:.3f} | "
                   f"{', '.join(f'#{t}' for t in trials)} |")
    out += ["", _finding(configs, losses, shared, frames, done)]
    return out


def _finding(configs, losses, shared, frames, done) -> str:
    if len(configs) < 2:
        return "_One configuration: nothing to compare._"
    if not shared:
        missing = [int(t) for t in done["trial"] if int(t) not in frames]
        why = (f"trial{'s' if len(missing) > 1 else ''} {', '.join(f'#{t}' for t in missing)} stored no per-passage "
               "results" if missing else "the trials scored different passages")
        return f"**Not compared**: {why}, so no paired test over the same passages is possible."
    stacked = np.vstack(losses)
    rows = comparisons([c[0] for c in configs], list(stacked[:, np.isfinite(stacked).all(axis=0)]))
    least, n = rows[0]["least"], rows[0]["n"]
    found = [r for r in rows if r["p_adj"] < ALPHA]
    how = f"paired t over {n} passages, Holm-adjusted over {len(rows)} comparison{'s' if len(rows) > 1 else ''}"
    if not found:
        best = min(rows, key=lambda r: r["p_adj"])
        return (f"**No configuration forgets measurably more than {least}**, which forgets least ({how}; smallest "
                f"{_p(best['p_adj'])}, {best['other']}).")
    said = "; ".join(f"{r['other']} forgets {r['diff']:.3f} {UNIT} more than {least} ({_p(r['p_adj'])})"
                     for r in found)
    rest = [f"{r['other']} not measurably ({_signed(r['diff'])}, {_p(r['p_adj'])})" for r in rows if r not in found]
    one_seed = all(len(trials) == 1 for _, trials in configs)
    return (f"**Forgetting differs beyond passage noise** ({how}; {least} forgets least): {said}"
            + (f"; {'; '.join(rest)}." if rest else ".")
            + (" One run per configuration: the test covers which passages were drawn, not training noise; "
               "set study.confirm to re-train under more seeds before trusting it." if one_seed else ""))


def plot(df: pd.DataFrame, out_dir, metric: str | None = None) -> Path | None:
    """forgetting.png: `metric` (study.metric; default the first of _METRICS the trials have) against
    forgetting, one point per trial with its 95% intervals as error bars; None with nothing to draw."""
    from lora_sweep.report.plots import _pyplot, _save

    done = forgotten(df)
    metric = metric or next((m for m in _METRICS if m in done and done[m].notna().any()), None)
    if metric is None or not len(done) or metric not in done:
        return None
    done = done[done[metric].notna()]
    if not len(done):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = done["forgetting"].astype(float).to_numpy()
    xerr = np.abs(np.vstack([x - done["forgetting_low"].astype(float), done["forgetting_high"].astype(float) - x]))
    scale = 100 if metric in ("eval_accuracy", "eval_exact_match") else 1
    y = scale * done[metric].astype(float).to_numpy()
    yerr = None
    low, high = f"{metric}_ci_low", f"{metric}_ci_high"
    if low in done and high in done and done[low].notna().all():
        yerr = np.abs(np.vstack([y - scale * done[low].astype(float), scale * done[high].astype(float) - y]))
    ax.errorbar(x, y, xerr=np.nan_to_num(xerr), yerr=yerr, fmt="o", color="tab:blue", ecolor="tab:gray",
                alpha=0.8, capsize=3)
    ax.axvline(0, color="tab:red", alpha=0.4, linestyle="--", label="no forgetting")
    for xi, yi, name, t in zip(x, y, done["label"].astype(str), done["trial"]):
        ax.annotate(f"{name} (#{t})", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"Forgetting ({UNIT}; adapted minus base loss on general English)")
    lower = " (lower is better)" if metric in ("eval_loss", "eval_perplexity") else ""
    ax.set_ylabel((f"{metric} (%)" if scale == 100 else metric) + lower)
    ax.set_title(TITLE, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _save(plt, fig, out / FILE)
