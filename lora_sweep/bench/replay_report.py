"""The replayed search benchmark's result: regret against compute per method, median and worst over seeds."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)   # of the exhaustive grid's summed trial seconds


def regret_curve(table, charges: list, reference: str = "best") -> list[tuple[float, float | None]]:
    """(seconds spent, regret in the metric's units) after each finished trial: the reference's test score minus
    the method's current pick's (its best complete trial on validation; None before it has one). reference:
    "best", the best test score in the grid (regret >= 0); "grid", the grid's own pick's (best on validation)."""
    ref = table.rows[table.best(test=reference == "best")].test
    sign = 1 if table.maximize else -1
    best, out = None, []
    for c in charges:
        if c.state == "complete" and (best is None or sign * c.value > sign * best[1]):
            best = (c.key, c.value)
        out.append((c.spent, None if best is None else sign * (ref - table.rows[best[0]].test)))
    return out


def at(curve: list, seconds: float) -> float | None:
    """The regret a replay had reached once `seconds` were spent (its last finished trial by then)."""
    value = None
    for spent, regret in curve:
        if spent > seconds + 1e-9:
            break
        value = regret
    return value


def to_pick(curve: list) -> float:
    """Seconds until the method's pick scored at least the reference on test (inf: never); with reference
    "grid", until it was as good on test as the exhaustive grid's own answer."""
    return next((spent for spent, regret in curve if regret is not None and regret <= 1e-12), math.inf)


def _pts(x: float | None, scale: float) -> str:
    return "no pick yet" if x is None else f"{scale * x:+.1f}".replace("+0.0", "0.0").replace("-0.0", "0.0")


def _median_ci(x: np.ndarray) -> str:
    """The median of finite values with a 95% bootstrap interval (scipy), as shares of the grid's seconds."""
    if not np.isfinite(x).all():
        return "—"
    if np.ptp(x) == 0:
        return f"{x[0]:.2f}"
    ci = stats.bootstrap((x,), np.median, confidence_level=0.95, n_resamples=2000, random_state=0,
                         method="percentile").confidence_interval
    return f"{np.median(x):.2f} ({ci.low:.2f}–{ci.high:.2f})"


def _share(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "not reached"


def markdown(table, charges: dict, command: str) -> str:
    """charges: method -> one list of replay.Charge per seed."""
    runs = {m: [regret_curve(table, c) for c in per_seed] for m, per_seed in charges.items()}
    to_grid = {m: [regret_curve(table, c, "grid") for c in per_seed] for m, per_seed in charges.items()}
    total = table.total_seconds
    scale = 100.0 if table.metric.endswith(("accuracy", "f1", "exact_match")) else 1.0
    unit = "pts" if scale == 100 else table.metric
    pick, oracle = table.best(), table.best(test=True)
    label = lambda key: ", ".join(f"{p.split('.')[-1]}={v}" for p, v in zip(table.params, key))  # noqa: E731
    seeds = len(next(iter(runs.values())))
    lines = [
        "# Search benchmark, replayed", "",
        f"Rebuild: `{command}`", "",
        f"Each method ran {seeds} times (seeds 0-{seeds - 1}) over the stored exhaustive grid of "
        f"{len(table.rows)} configurations ({', '.join(table.params)}), with the product's own samplers, pruners, "
        f"search loop and race. A trial is answered from the table and charged the seconds it took; a pruned or "
        f"race-stopped one only up to its last evaluation. Random and TPE stop at the grid's compute "
        f"({total:,.0f} trial seconds); the grid and the race run to their end.", "",
        f"- The grid's pick (best on validation): **{label(pick)}**, {scale * table.rows[pick].values[-1]:.1f} on "
        f"validation, {scale * table.rows[pick].test:.1f} on test.",
        f"- The best on test, for reference: {label(oracle)}, {scale * table.rows[oracle].test:.1f}.",
        f"- Regret = the best test {table.metric.removeprefix('eval_')} in the grid minus the test score of the "
        f"method's current pick (its best complete trial on validation), in {unit}. The full grid's own regret is "
        f"{_pts(table.rows[oracle].test - table.rows[pick].test, scale)}: validation, not test, chooses.", "",
        "## Test regret against compute (median / worst over seeds)", "",
        "| Method | " + " | ".join(f"{int(100 * f)}% of the grid's seconds" for f in FRACTIONS) + " |",
        "|:--|" + "--:|" * len(FRACTIONS)]
    for method, curves in runs.items():
        cells = []
        for f in FRACTIONS:
            vals = [at(c, f * total) for c in curves]
            if any(v is None for v in vals):
                done = sum(v is not None for v in vals)
                cells.append(f"{done}/{len(vals)} have a pick")
                continue
            cells.append(f"{_pts(float(np.median(vals)), scale)} / {_pts(max(vals) if table.maximize else min(vals), scale)}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "## Compute until the pick is as good on test as the full grid's", "",
              "Shares of the grid's seconds until the method's pick scores at least the grid's pick on test; median "
              "with its 95% bootstrap interval over seeds; worst; and a Mann-Whitney test against random (two-sided; "
              "seeds that never get there rank last).", "",
              "| Method | Seeds there | Median (95% CI) | Worst | Against random | Trials (median) | Pruned or stopped "
              "(median) | Seconds spent (median) |", "|:--|--:|--:|--:|:--|--:|--:|--:|"]
    base = np.array([to_pick(c) / total for c in to_grid.get("random", [])])
    for method, curves in to_grid.items():
        x = np.array([to_pick(c) / total for c in curves])
        there = np.isfinite(x)
        worst = f"{x.max():.2f}" if there.all() else "not within budget"
        versus = "—"
        if method != "random" and len(base):  # never there: inf, ranked last
            test = stats.mannwhitneyu(x, base, alternative="two-sided")
            versus = f"p={test.pvalue:.2g} (median {_share(np.median(x))} vs {_share(np.median(base))})"
        n = [len(c) for c in curves]
        stopped = [sum(c.state != "complete" for c in ch) for ch in charges[method]]
        lines.append(f"| {method} | {there.sum()}/{len(x)} | {_median_ci(x[there]) if there.any() else '—'} | {worst} | "
                     f"{versus} | {np.median(n):.0f} | {np.median(stopped):.0f} | "
                     f"{np.median([c[-1][0] for c in curves]):,.0f} |")
    lines += ["", "## The stored table", "",
              "| " + " | ".join(p.split(".")[-1] for p in table.params) + " | Validation at each evaluation | "
              "Test | Seconds |", "|" + ":--|" * len(table.params) + ":--|--:|--:|"]
    for key, s in table.rows.items():
        curve = " → ".join(f"{scale * v:.1f}" for v in s.values) + (" (failed)" if s.failed else "")
        lines.append("| " + " | ".join(map(str, key)) + f" | {curve} | {scale * s.test:.1f} | "
                     f"{s.seconds[-1] if s.seconds else 0:,.0f} |")
    return "\n".join(lines) + "\n"


def plot(table, charges: dict, path) -> None:
    runs = {m: [regret_curve(table, c) for c in per_seed] for m, per_seed in charges.items()}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = table.total_seconds
    scale = 100.0 if table.metric.endswith(("accuracy", "f1", "exact_match")) else 1.0
    xs = np.linspace(0.02, 1.0, 50)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (method, curves) in enumerate(runs.items()):
        med, worst = [], []
        for f in xs:
            vals = [at(c, f * total) for c in curves]
            ok = [v for v in vals if v is not None]
            full = len(ok) == len(vals)
            med.append(scale * float(np.median(ok)) if full else np.nan)
            worst.append(scale * (max(ok) if table.maximize else min(ok)) if full else np.nan)
        line, = ax.plot(xs, med, label=f"{method} (median)", color=f"C{i}")
        ax.plot(xs, worst, linestyle="--", color=line.get_color(), alpha=0.7)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("compute: share of the exhaustive grid's trial seconds")
    ax.set_ylabel("test regret (points)" if scale == 100 else "test regret")
    ax.set_title("Replayed search: median (solid) and worst (dashed) over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
