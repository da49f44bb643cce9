"""One report over several stored sweeps (the guide's table mixes rank, target-module, bias and
QLoRA rows): python -m lora_sweep report sweep=rank,target_modules -> reports/rank+target_modules/.

Each sweep's study is loaded from where that sweep stored it (paths.sweeps_dir/<name>/study.db, or
study.storage under the sweep's name); rows keep their sweep and trial number, so every figure
still leads back to one trial.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from lora_sweep import record
from lora_sweep.report import findings, notes, table
from lora_sweep.config import Config
from lora_sweep.report.plots import fresh_plots, write_plots

# Settings that must match for rows of different sweeps to be compared like for like.
_LIKE_FOR_LIKE = ("model", "data", "train_size", "eval_size", "max_length", "device")


def for_sweep(config: Config, name: str) -> Config:
    return dataclasses.replace(config, study=dataclasses.replace(config.study, name=name))


def load(config: Config) -> dict:
    from lora_sweep.search.study import load_study

    studies = {}
    for name in config.report.sweeps:
        c = for_sweep(config, name)
        table.check_exists(c)  # a missing sweep fails before anything is written
        studies[name] = load_study(c)
    return studies


def write_combined(config: Config) -> tuple[Path, str]:
    """Write reports/<a+b>/report.md, report.csv and plots; returns the path and the table."""
    studies = load(config)
    frames = [table.trials_frame(s).assign(sweep=name) for name, s in studies.items()]
    df = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) \
        else pd.DataFrame(columns=["status", "sweep"])
    out = config.paths.reports_dir / config.report.folder
    out.mkdir(parents=True, exist_ok=True)
    done = findings.complete(df)
    pareto = findings.pareto_mask(done) if len(done) else pd.Series(dtype=bool)
    names = done["label"].astype(str) + " [" + done["sweep"].astype(str) + "]" if len(done) else None
    sizes = {record.meta(s).get("eval_size") for s in studies.values()}
    nz = findings.noise(done, next(iter(sizes)) if len(sizes) == 1 else None) if len(done) else None
    plots = fresh_plots(out, lambda: write_plots(done, pareto, out, None, names=names,
                                                 noise_sd=nz.sd if nz else None))
    text = markdown(config, studies, df, plots)
    md = table.write_files(out, text, df)
    rows = table.guide_table(df, sweep_column=True) if len(df) else pd.DataFrame()
    return md, "\n" + (table.to_markdown(rows) if len(rows) else "No complete trials.") + "\n"


def markdown(config: Config, studies: dict, df: pd.DataFrame, plots: list[Path]) -> str:
    metas = {name: record.meta(s) for name, s in studies.items()}
    lines = [f"# LoRA sweeps: {', '.join(studies)}", "", "One table over several sweeps; each row names "
             "its sweep and its trial number in that sweep's study.", ""]
    for name, meta in metas.items():
        sub = df[df["sweep"] == name] if len(df) else df
        counts = sub["status"].value_counts().to_dict() if len(sub) else {}
        space = ", ".join(f"`{k}: {v}`" for k, v in meta.get("space", {}).items()) or "the base config"
        lines.append(f"- **{name}**: {meta.get('sampler', '?')} over {space}; "
                     f"{', '.join(f'{v} {k}' for k, v in counts.items()) or 'no trials'}; "
                     f"{meta.get('date', '?')}; git {meta.get('git_commit', '?')}")
    common = {k: {str(m.get(k, '?')) for m in metas.values()} for k in _LIKE_FOR_LIKE}
    same = {k: next(iter(v)) for k, v in common.items() if len(v) == 1}
    differ = [k for k, v in common.items() if len(v) > 1]
    lines += ["", "Shared: " + "; ".join(f"{k} `{v}`" for k, v in same.items()) + "."]
    if differ:
        lines.append(f"**Not like for like**: the sweeps differ in {', '.join(differ)}; compare rows across "
                     f"sweeps with care.")
    lines += ["", "## Results", ""]
    rows = table.guide_table(df, sweep_column=True) if len(df) else pd.DataFrame()
    lines.append(table.to_markdown(rows) if len(rows) else "_No complete trials yet._")
    lines += ["", *notes.notes_lines(df), "", "## Findings", ""]
    eval_sizes = {m.get("eval_size") for m in metas.values()}
    eval_size = next(iter(eval_sizes)) if len(eval_sizes) == 1 else None
    done = findings.complete(df)
    if len(done):
        nz = findings.noise(done, eval_size)
        lines += [f"- {f}" for f in findings.overall_findings(done, nz)]
        lines.append("- " + findings.pareto_sentence(done, findings.pareto_mask(done), sweep_col=True))
    for name, study in studies.items():
        sub = df[df["sweep"] == name] if len(df) else df
        lines += ["", f"### {name}", ""]
        # each sweep's own trials and per-example files: paired tests where all its trials stored them
        examples = table.load_examples(for_sweep(config, name).study_dir, sub)
        found = findings.sweep_findings(sub, metas[name].get("eval_size"),
                                        findings.param_importances(study, config.study.metric), examples)
        lines += [f"- {f}" for f in found]
    lines += table.plots_section(plots)
    named = df.assign(label=df["label"] + " [" + df["sweep"] + "]") if len(df) else df
    lines += notes.infeasible_section(named)
    lines += notes.problems_section(named)
    lines.append("")
    return "\n".join(lines)
