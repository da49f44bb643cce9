"""PNG plots beside report.md (matplotlib's Agg backend: no display needed).

accuracy_vs_trainable.png   accuracy against trainable %, Pareto front drawn
epoch_curves.png            eval accuracy per epoch, one line per trial (Optuna user attr "epochs")
cost.png                    peak memory and seconds per epoch, one bar per configuration
param_importances.png       optuna.visualization.matplotlib, when two or more parameters vary
parallel_coordinate.png     likewise
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pandas as pd

from lora_sweep.record import TrialRecord

log = logging.getLogger("lora_sweep")

TITLES = {
    "accuracy_vs_trainable.png": "Accuracy vs trainable parameters (Pareto front)",
    "epoch_curves.png": "Eval accuracy per epoch",
    "cost.png": "Peak memory and training time per epoch",
    "param_importances.png": "Parameter importances for accuracy (fANOVA)",
    "parallel_coordinate.png": "Parallel coordinates",
    "forgetting.png": "Task metric vs forgetting of general English",  # lora_sweep.report.forgetting.plot
}


def fresh_plots(out: Path, draw) -> list[Path]:
    """Remove every plot an earlier report left in `out`, then draw() (which writes those the data supports)."""
    for name in TITLES:  # a plot the data no longer supports must not linger from an earlier run
        (out / name).unlink(missing_ok=True)
    return draw()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_plots(done: pd.DataFrame, pareto: pd.Series, out: Path, study=None, metric: str = "eval_accuracy",
                names: pd.Series | None = None, noise_sd: float | None = None) -> list[Path]:
    """Write every plot that the data supports; returns the paths written (in TITLES order).
    `names` labels the rows (defaults to the label column); `noise_sd` (accuracy points, one run)
    draws ~95% error bars on the scatter."""
    if not len(done):
        return []
    names = done["label"].astype(str) if names is None else names
    plt = _pyplot()
    written = [
        _scatter(plt, done, pareto, names, out / "accuracy_vs_trainable.png", noise_sd),
        _curves(plt, done, names, out / "epoch_curves.png"),
        _cost(plt, done, names, out / "cost.png"),
    ]
    if study is not None:
        written += _optuna_plots(plt, study, metric, out)
    return [p for p in written if p is not None]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scatter(plt, done, pareto, names, path, noise_sd):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x, y = done["trainable_pct"].astype(float), 100 * done["eval_accuracy"].astype(float)
    if noise_sd:
        ax.errorbar(x, y, yerr=1.96 * noise_sd, fmt="none", ecolor="tab:gray", alpha=0.4, capsize=3,
                    label=f"±{1.96 * noise_sd:.1f} points (noise, one run)", zorder=1)
    ax.scatter(x[~pareto], y[~pareto], color="tab:gray", label="dominated", zorder=2)
    ax.scatter(x[pareto], y[pareto], color="tab:red", label="Pareto-optimal", zorder=3)
    front = pd.DataFrame({"x": x[pareto], "y": y[pareto]}).sort_values("x")
    ax.step(front["x"], front["y"], where="post", color="tab:red", alpha=0.6, zorder=1)
    for xi, yi, name in zip(x, y, names):
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("Trainable parameters (% of all)")
    ax.set_ylabel("Eval accuracy (%)")
    ax.set_title(TITLES[path.name], fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _curves(plt, done, names, path):
    if "epochs" not in done or not any(isinstance(e, list) and e for e in done["epochs"]):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (_, row), name in zip(done.iterrows(), names):
        acc = [100 * e["eval_accuracy"] for e in (row["epochs"] or []) if "eval_accuracy" in e]
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{name} (#{row['trial']})")
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Eval accuracy (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(TITLES[path.name], fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def _cost(plt, done, names, path):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 0.45 * len(done) + 1.8))
    pos = range(len(done))
    a1.barh(pos, done["peak_memory_mb"].astype(float), color="tab:blue")
    a1.set_xlabel("Peak memory (MB)")
    a2.barh(pos, done["epoch_time_s"].astype(float), color="tab:orange")
    a2.set_xlabel("Training time (s per epoch)")
    for ax in (a1, a2):
        ax.set_yticks(list(pos), list(names), fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    a2.set_yticklabels([])
    fig.suptitle(TITLES[path.name], fontsize=10)
    return _save(plt, fig, path)


def _optuna_plots(plt, study, metric: str, out: Path) -> list[Path]:
    """Optuna's own matplotlib plots, on the stored accuracy (works for multi-objective studies too)."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    vary = [p for p in {k for t in done for k in t.params}
            if len({repr(t.params.get(p)) for t in done}) > 1]
    if len(vary) < 2 or len(done) < 3:
        return []

    def target(t):
        return TrialRecord.from_trial(t).figure(metric)

    written = []
    fanova = optuna.importance.FanovaImportanceEvaluator(seed=0)  # seeded: a rebuilt report matches
    draws = (("param_importances.png", lambda: ovm.plot_param_importances(
                 study, evaluator=fanova, target=target, target_name=metric)),
             ("parallel_coordinate.png", lambda: ovm.plot_parallel_coordinate(
                 study, target=target, target_name=metric)))
    for name, draw in draws:
        try:
            with warnings.catch_warnings(), plt.rc_context():  # optuna switches the global style to ggplot
                warnings.simplefilter("ignore")
                ax = draw()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 4.5)
            written.append(_save(plt, fig, out / name))
        except Exception as e:  # a plot is a nicety: a report without it beats no report
            log.warning("Could not draw %s: %s", name, e)
    return written
