"""lora-sweep: which LoRA configuration should I use? Answered by measurement.

    cli.py      the entry of `lora-sweep` and `python -m lora_sweep`; the one error boundary
    config/     frozen config dataclasses and their validation; imports nothing from later stages
    search/     search-space grammar, conditions/exclusions, samplers and pruners, study, storages
    trial/      one trial, free of Optuna and MLflow: data, model, adapter, task, training, metrics
    run/        the sweep loop, local workers, the Optuna objective, progress lines
    report/     report.md/report.csv, findings, plots, Pareto front, several sweeps in one
    record.py   the typed record of one trial
    tracking.py the only mlflow import
    bench/      benchmarks, never imported by the product (python -m lora_sweep.bench)

Importing the package is cheap: torch, transformers, peft and mlflow load only when a sweep runs.
"""

import time as _time

__version__ = "0.1.0"
# When this process reached lora_sweep: a sweep's "startup" (imports, Hydra, validation) counts from here.
IMPORTED_AT = _time.perf_counter()
