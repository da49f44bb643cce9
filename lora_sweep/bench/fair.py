"""Check a raced sweep (study.tune, study.race=true) against the exhaustive arm-by-candidate grid of the
same space (study.race=false): the same arms, every candidate trained to the end.

    python -m lora_sweep.bench.fair --raced sweeps/rank_fair --exhaustive sweeps/rank_fair_exhaustive \\
        --out reports/rank_fair/exhaustive_check.md

For each arm: the raced choice, the exhaustive grid's best on validation, and the two compared on the
same validation examples from the exhaustive runs (the raced choice's candidate trained to the end there;
exact McNemar, Holm over the arms): "within noise" when the grid's best is not beyond noise of it. Then
the two verdicts (which arms the paired tests tell apart, on validation) side by side, and what each
sweep trained: optimizer steps and trial seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lora_sweep import record
from lora_sweep.report import arms, compare, findings, stats
from lora_sweep.report.frame import reported_frame


def load(study_dir: Path) -> optuna.Study:
    """The search study kept in a sweep's folder (study.db, or study.journal where workers shared it)."""
    if (study_dir / "study.db").exists():
        storage = f"sqlite:///{study_dir / 'study.db'}"
    else:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(str(study_dir / "study.journal")))
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(storage) if "confirm" not in s.study_name]
    return optuna.load_study(study_name=name, storage=storage)


def steps_trained(study: optuna.Study, only: dict | None = None) -> tuple[int, int, float]:
    """Trials, optimizer steps over them (a stopped one: its evaluations' epochs times a complete run's steps
    per epoch) and their summed seconds; `only`: the trials with these params."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
              if all(t.params.get(k) == v for k, v in (only or {}).items())]
    per_epoch = None
    for t in trials:
        rec = record.TrialRecord.from_trial(t)
        if t.state == TrialState.COMPLETE and rec.batch_shapes:
            epochs = int(rec.params.get("num_train_epochs") or len(rec.epochs))
            per_epoch = sum(rec.batch_shapes.values()) / epochs
            break
    steps = sum(per_epoch * (t.last_step or 0) for t in trials)
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
    return len(trials), round(steps), seconds


def verdict(study_dir: Path, study: optuna.Study, metric: str, direction: str):
    df, examples = reported_frame(study_dir, study)
    done = findings.compared(df, metric)
    chosen, choices = arms.choose(done, metric, direction)
    return df, examples, chosen, choices, findings.verdict_of(df, examples, metric, direction)


def outcomes(v) -> dict:
    """(first arm, second arm) -> +1 / -1 (beyond noise, that way) / 0 (not told apart)."""
    out = {}
    for r in v.results:
        a, b = v.levels[r.first].name, v.levels[r.second].name
        out[(a, b)] = 0 if not r.significant() or r.estimate == 0 else (1 if r.estimate > 0 else -1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_sweep.bench.fair", description=__doc__.split("\n")[0])
    parser.add_argument("--raced", type=Path, required=True, help="the raced sweep's folder (sweeps/<name>)")
    parser.add_argument("--exhaustive", type=Path, required=True, help="the exhaustive sweep's folder")
    parser.add_argument("--one", metavar="PATH=VALUE", help="the one-rate sweep inside the exhaustive grid, e.g. "
                        "train.learning_rate=0.001 (the rank sweep's own setting): its runs' steps and seconds")
    parser.add_argument("--out", type=Path, required=True, help="the markdown file to write")
    args = parser.parse_args(argv)
    raced, full = load(args.raced), load(args.exhaustive)
    meta = record.meta(raced)
    metric, direction = "eval_accuracy", "maximize"
    _, rex, _, race_choices, race_v = verdict(args.raced, raced, metric, direction)
    fdf, fex, _, full_choices, full_v = verdict(args.exhaustive, full, metric, direction)
    by_arm = {c.arm: c for c in full_choices}
    rows, ps = [], []
    for c in race_choices:
        g = by_arm[c.arm]
        mine = [t for cand in g.candidates if cand.tuned == c.chosen for t in cand.complete]
        runs = [compare.Runs((None,), (fex[int(t)],)) for t in (mine[0], g.trials[0])]
        r = compare.family(metric, runs, [(1, 0)])[0]
        ps.append(r.p)
        rows.append((c, g, r))
    adjusted = stats.holm(ps)
    lines = [f"# {meta.get('model', '')}: raced against exhaustive", "",
             f"Raced: `{args.raced}` ({len(raced.trials)} trials); exhaustive: `{args.exhaustive}` "
             f"({len(full.trials)} trials). Rebuild: `python -m lora_sweep.bench.fair "
             + " ".join(sys.argv[1:] if argv is None else argv) + "`", "",
             "## Each arm's choice", "",
             "| Arm | Raced choice | Exhaustive best | Raced choice, trained to the end (exhaustive run) | "
             "Exhaustive best | Best minus raced (McNemar, Holm) | Within noise |", "|:--|:--|:--|--:|--:|--:|:--|"]
    within = []
    for (c, g, r), p_adj in zip(rows, adjusted):
        same = c.chosen == g.chosen
        ok = same or p_adj >= 0.05
        within.append(ok)
        value = dict((cand.key, cand.value) for cand in g.candidates)
        lines.append(f"| {c.arm} | {arms.show(c.chosen)} | {arms.show(g.chosen)} | "
                     f"{100 * value[arms._key(c.chosen)]:.1f}% | {100 * value[arms._key(g.chosen)]:.1f}% | "
                     f"{100 * r.estimate:+.1f} pts (p={p_adj:.2g}, n={r.n}) | {'yes' + (' (same)' if same else '') if ok else 'no'} |")
    twins = [(int(t), int(u)) for t in rex for u in fex if raced.trials[int(t)].params == full.trials[int(u)].params]
    same_runs = sum(rex[t]["prediction"].equals(fex[u]["prediction"]) for t, u in twins)
    lines += ["", f"Runs of one (arm, candidate) in both sweeps: {same_runs} of {len(twins)} predict every "
              "validation example alike (training is deterministic under one seed)."]
    a, b = outcomes(race_v), outcomes(full_v)
    same_verdict = a == b
    one = {}
    if args.one:  # what a sweep at that one rate alone concludes: the exhaustive grid's runs at it
        path, value = args.one.split("=", 1)
        at = fdf[fdf[f"param.{path}"] == float(value)].assign(tuned="{}")
        one_v = findings.verdict_of(at, fex, metric, direction)
        one = outcomes(one_v)
    lines += ["", f"**{sum(within)} of {len(within)} raced choices are within noise of the exhaustive best.**", "",
              "## The verdict, raced and exhaustive (validation, paired tests, Holm)", "",
              "| Comparison | Raced | Exhaustive |" + (f" At {args.one} alone |" if one else ""),
              "|:--|:--|:--|" + (":--|" if one else "")]
    word = {1: "first better", -1: "second better", 0: "not told apart"}
    for key in dict.fromkeys([*a, *b, *one]):
        lines.append(f"| {key[0]} vs {key[1]} | {word.get(a.get(key), 'not compared')} | "
                     f"{word.get(b.get(key), 'not compared')} |"
                     + (f" {word.get(one.get(key), 'not compared')} |" if one else ""))
    lines += ["", f"**The verdict is {'the same' if same_verdict else 'different'}**: pick "
              f"{race_v.pick.name} (raced) and {full_v.pick.name} (exhaustive)"
              + (f"; at {args.one} alone: {one_v.pick.name}, best {one_v.best.name}" if one else "") + ".",
              "", "## Cost", "",
              "| Sweep | Trials | Optimizer steps | Trial seconds |", "|:--|--:|--:|--:|"]
    costs = {"raced": steps_trained(raced), "exhaustive": steps_trained(full)}
    if args.one:
        path, value = args.one.split("=", 1)
        costs = {f"one rate ({args.one}, inside the exhaustive grid)": steps_trained(full, {path: float(value)}),
                 **costs}
    for name, (n, steps, seconds) in costs.items():
        lines.append(f"| {name} | {n} | {steps:,} | {seconds:,.0f} |")
    if args.one:
        _, base_steps, base_s = next(iter(costs.values()))
        lines += ["", "Against one rate: " + "; ".join(
            f"{k} {costs[k][1] / base_steps:.2f}x the steps and {costs[k][2] / base_s:.2f}x the trial seconds"
            for k in ("raced", "exhaustive")) + "."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(within) and same_verdict else 1


if __name__ == "__main__":
    sys.exit(main())
