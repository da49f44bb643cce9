"""Benchmark: a lora_sweep sweep against the hand-written Trainer-per-config script, side by side.

    python -m lora_sweep.bench                                   # the default rank sweep
    python -m lora_sweep.bench data.train_size=1000              # the same at 1000 tweets
    python -m lora_sweep.bench +sweep=bias                       # any grid sweep, any overrides
    python -m lora_sweep.bench '+space.train.seed="choice(42,43,44)"'   # each configuration on 3 seeds

In one run, on the same configurations, data and epochs, it runs
  (a) `python -m lora_sweep <overrides>`: one process, base model loaded once, data tokenized once,
      length-grouped batches;
  (b) lora_sweep.bench.baseline once per configuration, each a fresh process (what users do today),
      half of them before (a) and half after, so a machine whose speed drifts weighs on both sides;
and prints the wall-time ratio a/b (target <= 0.5 at equal accuracy within 1 point), the sweep's
overhead 1 - sum(train + eval seconds) / wall (target <= 3%), and the training FLOP/s achieved by (a)
against this machine's fp32 matmul peak measured in the same run (target >= 50% on CPU). With
train.seed in the space, accuracy is compared on each configuration's mean over its seeds.
Results go to reports/bench/<fp32|bf16>[-<n>seeds]/ (bench.md, bench.json); train.mixed_precision=bf16
runs the sweep under bf16 autocast (the baseline script stays fp32, as users write it).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lora_sweep import record

TARGETS = {"wall_ratio": 0.5, "overhead": 0.03, "mfu": 0.5, "accuracy_points": 1.0}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from lora_sweep.cli import CONF_DIR, normalise_argv
    from lora_sweep.config import from_mapping

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=normalise_argv(overrides))
    return from_mapping(OmegaConf.to_container(cfg, resolve=True))


def like_for_like(overrides: list[str]) -> list[str]:
    """No held-out test split unless asked for: the baseline scores none, and its time would count on the
    sweep's side alone."""
    if any(o.split("=", 1)[0].lstrip("+~") == "data.test_size" for o in overrides):
        return list(overrides)
    return [*overrides, "data.test_size=null"]


def with_default_sweep(argv: list[str]) -> list[str]:
    """The rank sweep unless the overrides name a sweep: `bench data.train_size=1000` means the
    default sweep at 1000 tweets, not the single base configuration."""
    if any(a.startswith(("+sweep=", "sweep=")) for a in argv):
        return list(argv)
    return ["+sweep=rank", *argv]


def grid_points(config):
    from lora_sweep.config import ConfigError
    from lora_sweep.search.space import SearchSpace

    space = SearchSpace(config)
    if not space.is_grid:
        raise ConfigError("lora_sweep.bench compares every configuration of a grid sweep; give a sweep whose "
                          "space is all choice(...)/range(...), e.g. +sweep=rank.")
    grid = space.grid()
    return [space.point({k: space.params[k].decode(v) for k, v in zip(grid, combo)})
            for combo in itertools.product(*grid.values())]


def baseline_spec(point, config, output_dir: str) -> dict:
    from lora_sweep.trial import data
    from lora_sweep.trial import models
    from lora_sweep.trial.adapters import resolve_targets
    from lora_sweep.config import resolve_path

    s = point.settings
    labels = list(data.load_splits(s.data).labels)
    base = models.load_base(s.model, tuple(labels), s.train.seed)
    return {
        "model": resolve_path(s.model.name_or_path), "csv": resolve_path(s.data.name_or_path),
        "encoding": s.data.encoding, "text_column": s.data.text_column, "label_column": s.data.label_column,
        "labels": labels, "train_size": s.data.train_size, "eval_size": s.data.eval_size,
        "data_seed": s.data.seed, "max_length": s.data.max_length, "seed": s.train.seed,
        **{k: v for k, v in s.lora.peft_kwargs().items() if k in ("r", "lora_alpha", "lora_dropout", "bias")},
        "target_modules": list(resolve_targets(s.lora.target_modules, base.model).modules),
        "learning_rate": s.train.learning_rate, "weight_decay": s.train.weight_decay,
        # the rest of what lora_sweep.trial.train gives TrainingArguments: a bench with train.warmup_steps=0.1
        # must train both sides with it
        "warmup_steps": s.train.warmup_steps, "lr_scheduler_type": s.train.lr_scheduler_type,
        "max_grad_norm": s.train.max_grad_norm, "gradient_accumulation_steps": s.train.gradient_accumulation_steps,
        "epochs": s.train.num_train_epochs, "batch_size": s.train.per_device_train_batch_size,
        "eval_batch_size": s.train.per_device_eval_batch_size, "output_dir": output_dir,
    }


def seed_groups(config, points, rows: list[dict]) -> list[dict]:
    """With train.seed in the space, the runs of each configuration over its seeds: accuracy mean
    and sample standard deviation on both sides. One seed's accuracy moves by 1-2 points with the
    batch order alone (reports/bench: 1.8 points between the two sides on one seed, mean -0.3), so
    "equal accuracy within 1 point" is judged on the means. Empty without a seed dimension."""
    import statistics

    from lora_sweep.search.space import SearchSpace

    if not any("train.seed" in p.values for p in points):
        return []
    space = SearchSpace(config)
    by_label = {r["configuration"]: r for r in rows}
    groups: dict[str, list[dict]] = {}
    for p in points:
        rest = {k: v for k, v in p.values.items() if k != "train.seed"}
        groups.setdefault(space.point(rest).label, []).append(by_label[p.label])
    out = []
    for label, members in groups.items():
        sweep = [m["sweep_accuracy"] for m in members]
        base = [m["baseline_accuracy"] for m in members]
        out.append({"configuration": label, "n": len(members),
                    "sweep_mean": statistics.fmean(sweep), "baseline_mean": statistics.fmean(base),
                    "sweep_sd": statistics.stdev(sweep) if len(sweep) > 1 else 0.0,
                    "baseline_sd": statistics.stdev(base) if len(base) > 1 else 0.0})
    return out


def run_sweep(overrides: list[str], work: Path) -> tuple[float, list, dict, dict]:
    import optuna

    cmd = [sys.executable, "-m", "lora_sweep", *overrides, f"paths.sweeps_dir={work / 'sweeps'}",
           f"paths.reports_dir={work / 'reports'}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the sweep failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    db = next((work / "sweeps").glob("*/study.db"))
    study = optuna.load_study(study_name=db.parent.name, storage=f"sqlite:///{db}")
    return wall, [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE], \
        record.timings(study), record.precision(study)


def run_baseline(spec: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lora_sweep.bench.baseline", json.dumps(spec)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BASELINE_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"the baseline failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, json.loads(line.split(" ", 1)[1])


def main(argv: list[str]) -> int:
    if argv[:1] == ["--render"]:  # re-render a stored bench.json (after a change to the text only)
        path = Path(argv[1]) if len(argv) == 2 else None
        if path is None or not path.is_file():
            raise SystemExit(f"lora_sweep.bench --render: expected one stored bench.json, got {argv[1:]}; "
                             "e.g. python -m lora_sweep.bench --render reports/bench/fp32/bench.json")
        text = render(json.loads(path.read_text()))
        path.with_name("bench.md").write_text(text)
        print(text)
        return 0
    import torch

    from lora_sweep.trial import environment
    from lora_sweep.cli import quiet_third_party
    from lora_sweep.bench.flops import matmul_peak_gflops, per_sequence_flops, training_flops

    quiet_third_party()
    overrides = like_for_like(with_default_sweep(argv))
    config = compose(overrides)
    points = grid_points(config)
    print(f"bench: {len(points)} configurations ({'; '.join(p.label for p in points)}), "
          f"{config.base.data.train_size} train / {config.base.data.eval_size} eval examples, "
          f"{config.base.train.num_train_epochs} epoch(s); load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lora-sweep-bench-") as tmp:
        work = Path(tmp)
        specs = {p.label: baseline_spec(p, config, str(work / "baseline")) for p in points}
        # The sweep's achieved FLOP/s is held against the peak of the precision it trains in.
        precision = "bf16" if config.base.train.mixed_precision == "bf16" else "fp32"
        from lora_sweep.trial.models import resolve_device

        device = resolve_device(config.base.train.device)  # the peak of the device the sweep trains on
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        # Shared VMs drift: one run here measured its matmul peak 28% lower after the baseline than
        # before the sweep. Half the baseline processes run before the sweep and half after, so a
        # machine that slows (or speeds up) steadily slows both sides alike; the peak is measured
        # at each hand-over, and the report says how far it moved.
        labels = list(specs)
        before, after = labels[: len(labels) // 2], labels[len(labels) // 2:]
        peak = [matmul_peak_gflops(dtype=dtype, device=device)]
        print(f"bench: {precision} matmul peak {peak[-1]:.1f} GFLOP/s on {device}; running (b) {len(before)} of "
              f"{len(points)} baseline processes, then (a) the sweep, then (b) the other {len(after)} ...", flush=True)
        baseline, schedule, start = {}, [], time.perf_counter()

        def run_baselines(which: list[str]) -> None:
            for label in which:
                t0 = time.perf_counter() - start
                baseline[label] = run_baseline(specs[label])
                schedule.append({"run": f"baseline {label}", "start_s": t0, "end_s": time.perf_counter() - start})
                print(f"bench: (b) {label}: {baseline[label][0]:.1f} s wall", flush=True)

        run_baselines(before)
        peak.append(matmul_peak_gflops(dtype=dtype, device=device))
        t0 = time.perf_counter() - start
        wall_a, trials, timings, decision = run_sweep(overrides, work)
        schedule.append({"run": "sweep", "start_s": t0, "end_s": time.perf_counter() - start})
        print(f"bench: (a) sweep: {wall_a:.1f} s wall", flush=True)
        peak.append(matmul_peak_gflops(dtype=dtype, device=device))
        run_baselines(after)
        peak.append(matmul_peak_gflops(dtype=dtype, device=device))
    wall_b = sum(w for w, _ in baseline.values())

    rows, flops_total, train_total = [], 0.0, 0.0
    coeffs = {}
    by_label = {rec.label: rec for rec in map(record.TrialRecord.from_trial, trials)}
    used = " / ".join(sorted({rec.precision for rec in by_label.values() if rec.precision})) or "not recorded"
    if decision:  # train.mixed_precision=auto on a CPU: the sweep's own measurement chose
        from lora_sweep.trial.precision import describe
        used += f" (auto: {describe(decision)})"
    print(f"bench: (a) the sweep trained in {used}", flush=True)
    for p in points:
        rec = by_label[p.label]
        key = (p.settings.model, p.settings.lora)
        if key not in coeffs:
            coeffs[key] = per_sequence_flops(p.settings)
        f = training_flops(coeffs[key], rec.batch_shapes)
        train_s = rec.epoch_time_s * len(rec.epochs)
        flops_total += f
        train_total += train_s
        b = baseline[p.label][1]
        rows.append({"configuration": p.label, "sweep_accuracy": rec.eval_accuracy,
                     "baseline_accuracy": b["eval_accuracy"], "sweep_epoch_s": rec.epoch_time_s,
                     "baseline_epoch_s": b["epoch_time_s"], "baseline_process_s": baseline[p.label][0],
                     "sweep_train_plus_eval_s": rec.train_seconds + rec.eval_seconds,
                     "train_gflop_per_s": f / train_s / 1e9})
    groups = seed_groups(config, points, rows)
    busy = sum(r["sweep_train_plus_eval_s"] for r in rows)
    peak_gflops = max(peak)
    # Where the sweep's non-training seconds went (lora_sweep.run.sweep records its phases).
    between = timings.get("trials_s", busy) - busy
    breakdown = {"startup (interpreter, imports, Hydra, validation)": timings.get("startup_s"),
                 "preflight (data, base model, every corner of the space)": timings.get("preflight_s"),
                 "Optuna study + MLflow set-up": timings.get("setup_s"),
                 "between trials (model copy, LoRA, MLflow runs, adapters)": between,
                 "report, plots, closing MLflow": timings.get("report_s")}
    if all(v is not None for v in breakdown.values()):
        breakdown["interpreter start, exit and the rest"] = wall_a - busy - sum(breakdown.values())
    result = {
        "command": " ".join(["python -m lora_sweep.bench", *argv]),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "rows": rows,
        "sweep_wall_s": wall_a, "baseline_wall_s": wall_b, "wall_ratio": wall_a / wall_b,
        "overhead": 1 - busy / wall_a,
        "eval_size": config.base.data.eval_size,
        "accuracy_gap_points": max(abs(r["sweep_accuracy"] - r["baseline_accuracy"]) for r in rows) * 100,
        # with train.seed in the space: each configuration's accuracy is its mean over the seeds
        "seed_groups": groups,
        "mean_accuracy_gap_points": 100 * sum(r["sweep_accuracy"] - r["baseline_accuracy"] for r in rows) / len(rows),
        "sweep_precision": used, "precision": precision, "matmul_peak_gflops": peak_gflops, "matmul_peak_each_gflops": peak,
        "train_gflops": flops_total / train_total / 1e9,
        "mfu": flops_total / train_total / 1e9 / peak_gflops,
        "load_average_end": os.getloadavg()[0],
        # Recorded with the measurement, so --render on another machine does not describe that one.
        "device": environment.device_description("cpu"), "versions": environment.versions(),
        "overhead_breakdown_s": breakdown,
        "schedule": schedule,  # what ran when (seconds from the first baseline's start)
        "targets": TARGETS,
    }
    text = render(result)
    print(text)
    seeds = max((g["n"] for g in groups), default=1)
    out = Path(config.paths.reports_dir) / "bench" / (f"{precision}-{seeds}seeds" if seeds > 1 else precision)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(text)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    print(f"bench: wrote {out / 'bench.md'}")
    return 0


def render(r: dict) -> str:
    import pandas as pd

    def verdict(ok: bool) -> str:
        return "meets target" if ok else "misses target"

    table = pd.DataFrame([{
        "Configuration": x["configuration"],
        "Accuracy sweep / baseline": f"{100 * x['sweep_accuracy']:.1f}% / {100 * x['baseline_accuracy']:.1f}%",
        "Epoch time (s) sweep / baseline": f"{x['sweep_epoch_s']:.1f} / {x['baseline_epoch_s']:.1f}",
        "Baseline process (s)": f"{x['baseline_process_s']:.1f}",
        "Training GFLOP/s (sweep)": f"{x['train_gflop_per_s']:.1f}",
    } for x in r["rows"]])
    t = r["targets"]
    each = r["matmul_peak_each_gflops"]
    drift = 1 - min(each) / max(each)
    groups = r.get("seed_groups") or []
    seed_table = pd.DataFrame([{
        "Configuration": g["configuration"], "Seeds": g["n"],
        "Accuracy sweep (mean ± sd)": f"{100 * g['sweep_mean']:.1f}% ± {100 * g['sweep_sd']:.1f}",
        "Accuracy baseline (mean ± sd)": f"{100 * g['baseline_mean']:.1f}% ± {100 * g['baseline_sd']:.1f}",
        "Gap (points)": f"{100 * (g['sweep_mean'] - g['baseline_mean']):+.1f}",
    } for g in groups])
    lines = [
        "# Benchmark: lora_sweep sweep vs hand-written Trainer-per-config script", "",
        f"- **Command**: `{r['command']}`",
        f"- **Date**: {r['date']}; **device**: {r.get('device', 'not recorded')}; "
        f"load average at the end {r['load_average_end']:.2f}"
        + (f"; **sweep precision**: {r['sweep_precision']}" if "sweep_precision" in r else ""),
        f"- **Versions**: {', '.join(f'{k} {v}' for k, v in r.get('versions', {}).items()) or 'not recorded'}", "",
        table.to_markdown(index=False), "",
        *([seed_table.to_markdown(index=False), ""] if groups else []),
        f"- Wall time: sweep {r['sweep_wall_s']:.1f} s, baseline {r['baseline_wall_s']:.1f} s (sum of its "
        f"processes); **ratio {r['wall_ratio']:.2f}** (target <= {t['wall_ratio']}; "
        f"{verdict(r['wall_ratio'] <= t['wall_ratio'])}), " + accuracy_text(r, verdict) + ".",
        f"- Sweep overhead: 1 - (sum of train + eval seconds) / wall = **{100 * r['overhead']:.1f}%** "
        f"(target <= {100 * t['overhead']:.0f}%; {verdict(r['overhead'] <= t['overhead'])}). The wall time "
        "includes the process's imports, data loading, model load and MLflow set-up"
        + (": " + "; ".join(f"{k} {v:.1f} s" for k, v in r.get("overhead_breakdown_s", {}).items() if v is not None)
           if r.get("overhead_breakdown_s") else "") + ".",
        f"- Training FLOP/s of the sweep: {r['train_gflops']:.1f} GFLOP/s against a {r['precision']} matmul peak of "
        f"{r['matmul_peak_gflops']:.1f} GFLOP/s measured in this run (2048x2048 torch.mm, best of 8, "
        + ("at the start, before the sweep, after it and at the end" if len(each) == 4 else "before and after")
        + f": {', '.join(f'{x:.1f}' for x in each)}): **{100 * r['mfu']:.0f}%** "
        f"(target >= {100 * t['mfu']:.0f}%; {verdict(r['mfu'] >= t['mfu'])}). FLOPs are torch's FlopCounterMode "
        "counts (matmuls and attention) of the padded batches each trial trained on."
        + (f" The machine's peak moved {100 * drift:.0f}% during the run: time figures here carry noise of that "
           "order." if drift > 0.1 else ""),
        "",
    ]
    return "\n".join(lines)


def accuracy_text(r: dict, verdict) -> str:
    """The accuracy half of the wall-time line: per configuration, on the mean over seeds when the
    space has train.seed (then single runs are reported too), on the single run otherwise."""
    t = r["targets"]["accuracy_points"]
    single = (f"mean sweep - baseline {r['mean_accuracy_gap_points']:+.1f} points"
              + (f"; the largest gap is {round(r['accuracy_gap_points'] * r['eval_size'] / 100)} of the "
                 f"{r['eval_size']} eval examples" if r.get("eval_size") else ""))
    groups = r.get("seed_groups") or []
    if not groups:
        # accuracies are k/eval_size: 80.4% vs 81.4% is a gap of 1.0000000000000009 points in floats
        return (f"with accuracy within {r['accuracy_gap_points']:.1f} points per configuration (target {t}; "
                f"{verdict(r['accuracy_gap_points'] <= t + 1e-9)}; {single})")
    gap = max(abs(g["sweep_mean"] - g["baseline_mean"]) for g in groups) * 100
    n = sorted({g["n"] for g in groups})
    return (f"with accuracy, each configuration's mean over its {'/'.join(map(str, n))} seeds, within {gap:.1f} "
            f"points (target {t}; {verdict(gap <= t + 1e-9)}); single runs differ by up to "
            f"{r['accuracy_gap_points']:.1f} points ({single})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
