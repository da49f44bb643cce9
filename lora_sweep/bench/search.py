"""Benchmark: a pruned TPE search against the exhaustive grid over the same space, in one run.

    python -m lora_sweep.bench.search [hydra overrides...] [--out reports/search_benchmark]

1. Compose conf/sweep/search_benchmark.yaml (+ overrides), load the model and tokenize the data once,
   so that neither search pays the process's warm-up.
2. Grid: every point, no pruning. Its best eval accuracy is the reference; its time is the full grid
   (an exhaustive search only knows its best once every point has run).
3. TPE + median pruner over the same space, trials up to the grid's size, stopped as soon as a complete
   trial is within `--tolerance` accuracy points of the grid's best.
4. Print and store (result.md, result.json) the time to that trial / the grid's time, the ratio, the
   trials each search ran, and how busy the machine was (load average; the same configuration's
   seconds per epoch in both searches).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import optuna

from lora_sweep.record import TrialRecord

TARGET_RATIO = 0.40


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from lora_sweep.cli import CONF_DIR
    from lora_sweep.config import from_mapping

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["+sweep=search_benchmark", *overrides])
    return from_mapping(OmegaConf.to_container(cfg, resolve=True))


def arm(overrides: list[str], work: Path, name: str, extra: list[str]):
    return compose([*overrides, f"study.name={name}", f"paths.sweeps_dir={work / 'sweeps'}",
                    f"paths.reports_dir={work / 'reports'}", *extra])


def finished(study: optuna.Study, t0: float) -> list[dict]:
    rows = []
    for t in study.trials:
        end = t.datetime_complete.timestamp() - t0 if t.datetime_complete else None
        rec = TrialRecord.from_trial(t)
        rows.append({"trial": t.number, "label": rec.label, "state": t.state.name,
                     "params": t.params, "eval_accuracy": rec.eval_accuracy,
                     "epoch_time_s": rec.epoch_time_s, "finished_at_s": end,
                     "pruned_at_epoch": rec.pruned_at_epoch})
    return rows


class StopAtTarget:
    """Stops the search once a complete trial reaches the target accuracy; remembers when."""

    def __init__(self, target: float):
        self.target = target
        self.hit: optuna.trial.FrozenTrial | None = None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        acc = TrialRecord.from_trial(trial).eval_accuracy
        if trial.state == optuna.trial.TrialState.COMPLETE and acc is not None and acc >= self.target:
            self.hit = self.hit or trial
            study.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_sweep.bench.search", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="reports/search_benchmark", help="where result.md/json go")
    parser.add_argument("--tolerance", type=float, default=0.5, help="accuracy points below the grid's best")
    parser.add_argument("--tpe", default="study.sampler=tpe,study.pruner=median,++study.sampler_args.n_startup_trials=4",
                        help="comma-separated overrides of the TPE arm")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both searches (1: steadier on a busy, shared 2-core machine)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both arms (data.train_size=...)")
    args = parser.parse_args(argv)

    from lora_sweep.trial import data
    from lora_sweep.trial import models
    from lora_sweep.cli import quiet_third_party
    from lora_sweep.search.space import SearchSpace
    from lora_sweep.run.sweep import preflight, run_sweep

    quiet_third_party()
    import torch

    torch.set_num_threads(args.threads)
    logger = logging.getLogger("lora_sweep")
    if not logger.handlers:  # Hydra's compose() leaves the root logger configured without a console handler
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    command = "python -m lora_sweep.bench.search " + " ".join(map(shlex.quote, argv if argv is not None
                                                                    else sys.argv[1:]))
    work = Path(tempfile.mkdtemp(prefix="lora-sweep-bench-"))
    grid_cfg = arm(args.overrides, work, "bench-grid", ["study.sampler=grid", "study.pruner=none"])
    space = SearchSpace(grid_cfg)
    n = space.grid_size()
    tpe_cfg = arm(args.overrides, work, "bench-tpe", [*args.tpe.split(","), f"study.n_trials={n}"])

    # Warm-up outside both clocks: the base model and tokenized data are cached per process.
    device = preflight(grid_cfg, space)
    s = grid_cfg.base
    base = models.load_base(s.model, data.load_splits(s.data).labels, s.train.seed)
    data.tokenized(s.data, base.tokenizer, tokenizer_key=s.model.name_or_path)

    load = [os.getloadavg()]
    t0 = time.time()
    grid = run_sweep(grid_cfg)
    grid_s = time.time() - t0
    load.append(os.getloadavg())
    grid_rows = finished(grid, t0)
    done = [r for r in grid_rows if r["state"] == "COMPLETE"]
    best = max(done, key=lambda r: r["eval_accuracy"])
    target = best["eval_accuracy"] - args.tolerance / 100 - 1e-9
    grid_first_hit = min(r["finished_at_s"] for r in done if r["eval_accuracy"] >= target)

    stop = StopAtTarget(target)
    t1 = time.time()
    tpe = run_sweep(tpe_cfg, callbacks=(stop,))
    tpe_wall = time.time() - t1
    load.append(os.getloadavg())
    tpe_rows = finished(tpe, t1)
    hit_s = stop.hit.datetime_complete.timestamp() - t1 if stop.hit else None

    same = []  # the same configuration trained in both searches: how steady was the machine?
    for r in tpe_rows:
        if r["state"] == "COMPLETE":
            twin = next((g for g in done if g["params"] == r["params"]), None)
            if twin:
                same.append((r["label"], twin["epoch_time_s"], r["epoch_time_s"], twin["eval_accuracy"],
                             r["eval_accuracy"]))
    result = {
        "command": command, "device": device, "space": dict(grid_cfg.space), "grid_points": n,
        "data": {"train_size": s.data.train_size, "eval_size": s.data.eval_size,
                 "epochs": s.train.num_train_epochs},
        "tpe_overrides": args.tpe.split(","), "tolerance_points": args.tolerance,
        "grid_best": best, "target_accuracy": target, "grid_seconds": grid_s,
        "grid_seconds_to_first_within_tolerance": grid_first_hit,
        "tpe_seconds_to_target": hit_s, "tpe_seconds_total": tpe_wall,
        "tpe_trials": len(tpe_rows), "tpe_pruned": sum(r["state"] == "PRUNED" for r in tpe_rows),
        "ratio": hit_s / grid_s if hit_s is not None else None, "target_ratio": TARGET_RATIO,
        "loadavg_1_5_15": {"before_grid": load[0], "after_grid": load[1], "after_tpe": load[2]},
        "cpu_count": os.cpu_count(), "torch_threads": args.threads, "same_config_in_both": same,
        "grid_trials": grid_rows, "tpe_trial_rows": tpe_rows,
    }
    text = render(result)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "result.md").write_text(text)
    return 0


def render(r: dict) -> str:
    ratio = r["ratio"]
    verdict = ("not reached: TPE found no configuration within tolerance in its budget" if ratio is None else
               f"{ratio:.2f} ({'meets' if ratio <= r['target_ratio'] else 'misses'} the target of "
               f"<= {r['target_ratio']:.2f})")
    lines = [
        "# Search benchmark: pruned TPE vs exhaustive grid", "",
        f"- **Command**: `{r['command']}`",
        f"- **Space** ({r['grid_points']} points): " + ", ".join(f"`{k}: {v}`" for k, v in r["space"].items()),
        f"- **Task**: default (MiniLM, tweets), {r['data']['train_size']} train / {r['data']['eval_size']} eval, "
        f"{r['data']['epochs']} epochs; device {r['device']}, {r['cpu_count']} CPUs, {r['torch_threads']} torch "
        f"thread(s)",
        f"- **TPE arm**: {', '.join(r['tpe_overrides'])}, at most {r['grid_points']} trials, stopped at the target",
        f"- **Grid best**: {r['grid_best']['label']} at {100 * r['grid_best']['eval_accuracy']:.2f}%; target "
        f">= {100 * r['target_accuracy']:.2f}% (within {r['tolerance_points']} points)", "",
        "| search | seconds | trials | note |", "|---|---:|---:|---|",
        f"| grid (all points) | {r['grid_seconds']:.0f} | {len(r['grid_trials'])} | exhaustive: knows its best only "
        f"at the end (its own order reached the target after {r['grid_seconds_to_first_within_tolerance']:.0f} s) |",
        f"| TPE + median pruner, to target | "
        f"{'-' if r['tpe_seconds_to_target'] is None else format(r['tpe_seconds_to_target'], '.0f')} | "
        f"{r['tpe_trials']} ({r['tpe_pruned']} pruned) | ran {r['tpe_seconds_total']:.0f} s in all |", "",
        f"**Ratio (TPE time to target / grid time): {verdict}**", "",
        "Machine load (1/5/15-min load average): " + "; ".join(
            f"{k.replace('_', ' ')} {', '.join(f'{x:.1f}' for x in v)}" for k, v in r["loadavg_1_5_15"].items()),
    ]
    if r["same_config_in_both"]:
        lines += ["", "Same configuration in both searches (noise check):", "",
                  "| configuration | grid s/epoch | TPE s/epoch | grid acc | TPE acc |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {lab} | {a:.1f} | {b:.1f} | {100 * c:.1f}% | {100 * d:.1f}% |"
                  for lab, a, b, c, d in r["same_config_in_both"]]
    lines += ["", "Trials (seconds since the search started):", "", "| search | trial | configuration | state | "
              "accuracy | finished at s |", "|---|---:|---|---|---:|---:|"]
    for name, rows in (("grid", r["grid_trials"]), ("tpe", r["tpe_trial_rows"])):
        lines += [f"| {name} | {x['trial']} | {x['label']} | {x['state'].lower()}"
                  f"{'' if x['pruned_at_epoch'] is None else ' after epoch ' + str(x['pruned_at_epoch'])} | "
                  f"{'-' if x['eval_accuracy'] is None else format(100 * x['eval_accuracy'], '.1f') + '%'} | "
                  f"{'-' if x['finished_at_s'] is None else format(x['finished_at_s'], '.0f')} |" for x in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
