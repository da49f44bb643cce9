"""Reports from stored trials: findings, Pareto marks, GFM validity (parsed), plots, several sweeps.

The studies here are real Optuna studies (in memory or SQLite) holding synthetic figures, so the
expected sentences can be computed independently from the same numbers.
"""

from __future__ import annotations

import math
import re
import statistics

import optuna
import pandas as pd
import pytest
from markdown_it import MarkdownIt
from optuna.distributions import CategoricalDistribution
from PIL import Image

from lora_sweep import report
from lora_sweep.report import findings
from lora_sweep.report.combined import write_combined
from lora_sweep.config import ConfigError
from lora_sweep.tracking import fit_description

TOTAL = 22_700_000


def add(study, number_params: dict, acc: float, trainable: int, *, epochs=(0.7,), mem=900.0, t=10.0):
    dists = {"lora.r": CategoricalDistribution([4, 8, 16, 32]),
             "lora.target_modules": CategoricalDistribution(["query", "qv", "qkvo"]),
             "train.seed": CategoricalDistribution([1, 2, 3])}
    label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in number_params.items() if k != "train.seed")
    attrs = {"label": label, "eval_accuracy": acc, "trainable_params": trainable, "total_params": TOTAL,
             "trainable_pct": 100 * trainable / TOTAL, "peak_memory_mb": mem, "epoch_time_s": t,
             "epochs": [{"eval_accuracy": a} for a in (*epochs, acc)], "memory_kind": "cuda_max_allocated"}
    study.add_trial(optuna.trial.create_trial(
        params=number_params, distributions={k: dists[k] for k in number_params}, value=acc, user_attrs=attrs))


def rank_study(accs: dict, seeds=(1,), storage=None, name="rank") -> optuna.Study:
    study = optuna.create_study(direction="maximize", storage=storage, study_name=name)
    study.set_user_attr("meta", {"eval_size": 500, "sampler": "grid", "space": {"lora.r": "choice(4, 8, 16, 32)"},
                                 "model": "m", "data": "d", "train_size": 2000, "max_length": 128,
                                 "device": "CPU"})
    for seed in seeds:
        for r, acc in accs.items():
            a = acc[seed - 1] if isinstance(acc, tuple) else acc
            params = {"lora.r": r, "train.seed": seed} if len(seeds) > 1 else {"lora.r": r}
            add(study, params, a, 18_000 * r + 1_538, mem=900 + r, t=10 + r / 8)
    return study


def gfm_tables(text: str) -> list[list[list[str]]]:
    """Every table markdown-it (GFM tables on) finds: rows of cell texts, header first."""
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    tables, rows, row = [], None, None
    for tok in tokens:
        if tok.type == "table_open":
            rows = []
        elif tok.type == "tr_open":
            row = []
        elif tok.type == "inline" and row is not None:
            row.append(tok.content)
        elif tok.type == "tr_close":
            rows.append(row)
            row = None
        elif tok.type == "table_close":
            tables.append(rows)
    return tables


def test_pareto_marks_exactly_the_undominated_rows():
    df = pd.DataFrame({"eval_accuracy": [0.80, 0.85, 0.85, 0.84, 0.90],
                       "trainable_pct": [0.1, 0.2, 0.3, 0.25, 1.0]})
    assert findings.pareto_mask(df).tolist() == [True, True, False, False, True]


def test_report_table_is_valid_gfm_with_the_stored_figures(make_config, tmp_path):
    config = make_config({"lora.r": "choice(4, 8, 16, 32)"})
    study = rank_study({4: 0.80, 8: 0.84, 16: 0.86, 32: 0.862})
    md = report.write_report(config, study)
    text = md.read_text()
    tables = gfm_tables(text)
    assert len(tables) == 1
    header, *body = tables[0]
    assert tuple(header) == report.COLUMNS
    assert all(len(row) == len(header) for row in body) and len(body) == 4
    df = report.trials_frame(study)
    for row, (_, t) in zip(body, df.iterrows()):
        cells = dict(zip(header, row))
        assert cells["Configuration"] == t["label"]
        assert float(cells["Accuracy (%)"]) == pytest.approx(100 * t["eval_accuracy"], abs=0.05)
        assert int(cells["Trainable params"].replace(",", "")) == t["trainable_params"]
        assert float(cells["Trainable (%)"]) == pytest.approx(t["trainable_pct"], abs=0.005)
        assert cells["Trial"] == f"#{t['trial']}"
    # Pareto: every r here is more accurate and larger than the last, so all four are optimal.
    assert [dict(zip(header, r))["Pareto"] for r in body] == ["✓"] * 4
    # The plots the markdown shows exist and are PNG images.
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images == ["accuracy_vs_trainable.png", "epoch_curves.png", "cost.png"]
    for name in images:
        with Image.open(md.parent / name) as im:
            assert im.format == "PNG" and im.size[0] > 300
    csv = pd.read_csv(md.parent / "report.csv")
    assert csv["pareto"].tolist() == [True] * 4


def test_findings_state_the_steps_and_call_small_ones_noise():
    # One run per r: the eval set's binomial error is the band (1.96 * sqrt(2) * sd).
    df = report.trials_frame(rank_study({4: 0.800, 8: 0.860, 16: 0.870, 32: 0.872}))
    lines = findings.sweep_findings(df, eval_size=500)
    p = statistics.mean([0.800, 0.860, 0.870, 0.872])
    band = 1.96 * math.sqrt(2) * 100 * math.sqrt(p * (1 - p) / 500)
    steps = lines[0]
    assert steps.startswith("Raising r from 4 to 8 gained 6.0 points (80.0% → 86.0%")
    assert "8 to 16 gained 1.0 points" in steps and "16 to 32 gained 0.2 points" in steps
    assert f"Within noise (±{band:.1f} points): 8→16, 16→32; beyond it: 4→8." in steps
    assert "Gains diminish" in steps
    assert lines[1].startswith("Best configuration: r=32 (trial #3), 87.2% accuracy")
    assert "the cheapest of these is r=8 (trial #1)" in lines[1]
    assert lines[-1].startswith(f"Noise band: ±{band:.1f} points") and "binomial, 500 examples" in lines[-1]


def test_repeated_seeds_set_the_noise_band_and_no_trend_is_invented():
    accs = {4: (0.80, 0.86, 0.83), 8: (0.84, 0.81, 0.85), 16: (0.82, 0.86, 0.84), 32: (0.85, 0.82, 0.83)}
    df = report.trials_frame(rank_study(accs, seeds=(1, 2, 3)))
    nz = findings.noise(df, eval_size=500)
    # Pooled sample standard deviation over the four configurations, computed here independently.
    pooled = math.sqrt(sum(statistics.variance([100 * a for a in v]) for v in accs.values()) / 4)
    assert nz.source == "seeds" and nz.sd == pytest.approx(pooled)
    lines = findings.sweep_findings(df, eval_size=500)
    assert "Every step is within noise" in lines[0] and "no trend in r" in lines[0]
    mean4 = 100 * statistics.mean(accs[4])
    assert f"({mean4:.1f}% →" in lines[0]
    assert "repeated runs of 4 configuration(s) (12 runs)" in lines[-1]


def test_categorical_levels_are_compared_with_the_most_accurate():
    study = optuna.create_study(direction="maximize")
    add(study, {"lora.target_modules": "query"}, 0.830, 74_498)
    add(study, {"lora.target_modules": "qkvo"}, 0.873, 295_682)
    add(study, {"lora.target_modules": "qv"}, 0.870, 148_226)
    text = findings.sweep_findings(report.trials_frame(study), eval_size=None)[0]
    fewer = round(100 * (1 - 74_498 / 295_682))
    assert text.startswith("Against the most accurate, qkvo (trial #1) at 87.3%: ")
    assert f"query (trial #0) trained {fewer}% fewer parameters and was 4.3 points less accurate" in text


def test_two_varied_parameters_get_importances_and_optuna_plots(make_config):
    config = make_config({"lora.r": "choice(4, 8, 16, 32)", "lora.target_modules": "choice(query, qv, qkvo)"})
    study = optuna.create_study(direction="maximize")
    for i, (r, tm) in enumerate([(4, "query"), (8, "qv"), (16, "qkvo"), (32, "query"), (8, "qkvo"), (16, "qv")]):
        add(study, {"lora.r": r, "lora.target_modules": tm}, 0.80 + 0.01 * i, 10_000 * r)
    text = report.write_report(config, study).read_text()
    assert "2 parameters varied together" in text and "fANOVA importance for accuracy" in text
    for name in ("param_importances.png", "parallel_coordinate.png"):
        assert f"]({name})" in text and (config.report_dir / name).stat().st_size > 1000
    # Rebuilding gives the same markdown (seeded importances), and a later one-factor report removes
    # the plots it no longer supports.
    assert report.write_report(config, study).read_text() == text
    report.write_report(config, rank_study({4: 0.8, 8: 0.81}))
    assert not (config.report_dir / "param_importances.png").exists()


def test_one_report_over_several_sweeps(make_config, tmp_path):
    sweeps = tmp_path / "sweeps"
    for name, accs in (("rank", {4: 0.80, 16: 0.85}), ("target_modules", None)):
        (sweeps / name).mkdir(parents=True)
        storage = f"sqlite:///{sweeps / name / 'study.db'}"
        if accs:
            rank_study(accs, storage=storage, name=name)
        else:
            study = rank_study({}, storage=storage, name=name)
            add(study, {"lora.target_modules": "query"}, 0.83, 74_498)
    # the rank sweep's trials stored per-example results (500 eval examples; r=16 right on 25 more)
    from lora_sweep import record

    for trial, right in ((0, 400), (1, 425)):
        correct = [i < right for i in range(500)]
        record.write_examples(record.examples_path(sweeps / "rank", trial), pd.DataFrame({
            "example_id": range(500), "label": "pos", "prediction": ["pos" if c else "neg" for c in correct],
            "correct": correct, "loss": [0.1 if c else 2.0 for c in correct]}))
    config = make_config({}, report={"sweeps": ["rank", "target_modules"]})
    md, printed = write_combined(config)
    assert md == tmp_path / "reports" / "rank+target_modules" / "report.md"
    text = md.read_text()
    (header, *body), = gfm_tables(text)
    assert header[:2] == ["Sweep", "Configuration"] and len(body) == 3
    assert [(r[0], r[1], r[-1]) for r in body] == [("rank", "r=4", "#0"), ("rank", "r=16", "#1"),
                                                   ("target_modules", "target_modules=query", "#0")]
    assert "### rank" in text and "### target_modules" in text
    assert "Best configuration: r=16 [rank] (trial #1), 85.0% accuracy" in text
    rank, modules = text.split("### rank")[1].split("### target_modules")
    assert "r=16 beat r=4 by 5.0 points" in rank and "500 paired examples" in rank  # paired, per sweep
    assert "Paired tests" not in rank and "Paired tests" in modules  # no files: the fallback line
    assert "| Sweep" in printed

    missing = make_config({}, report={"sweeps": ["rank", "bias"]})
    with pytest.raises(ConfigError, match=r"No results for sweep 'bias'.*python -m lora_sweep \+sweep=bias"):
        write_combined(missing)


def test_report_sweeps_are_validated(make_config):
    with pytest.raises(ConfigError, match=r"report.sweeps must be a list of sweep names"):
        make_config({}, report={"sweeps": ["a/b"]})


def test_parent_description_fits_mlflow_and_keeps_whole_sections():
    text = "# T\n\n## Results\n\n" + "| a |\n|---|\n" + "| 1 |\n" * 100 + "\n## Findings\n\n" + "- x\n" * 3000
    fitted = fit_description(text, limit=8000)
    assert len(fitted) <= 8000 and "## Results" in fitted and "## Findings" not in fitted
    assert "Truncated" in fitted
    assert fit_description("short") == "short"


def test_variant_labels_with_commas_stay_whole():
    from lora_sweep.report.findings import variant_label

    assert variant_label("Text Generation (r=8, q/k/v/o)") == "Text Generation (r=8, q/k/v/o)"
    assert variant_label("Query-Only, r=8") == "Query-Only"
    assert variant_label("Text Generation (r=8, q/k/v/o), learning_rate=0.001, seed=2") == \
        "Text Generation (r=8, q/k/v/o)"
