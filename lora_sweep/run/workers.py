"""study.workers=N | auto: N worker processes on this machine share one study.

    python -m lora_sweep +sweep=rank study.workers=auto     # one worker per visible GPU
    python -m lora_sweep +sweep=rank study.workers=2        # CPU: the cores split in two

Each worker is the same command with study.workers=1 and the shared storage spelled out:
PostgreSQL when study.storage names it, else Optuna's journal file (never SQLite, which parallel
writers lock or corrupt). GPU workers are pinned with CUDA_VISIBLE_DEVICES; CPU workers get a
disjoint set of cores (sched_setaffinity) and as many torch threads (OMP_NUM_THREADS). Workers
on other hosts run the plain command pointed at the same PostgreSQL (see README: SLURM).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys

from lora_sweep import report
from lora_sweep.search import storage
from lora_sweep.config import Config, ConfigError
from lora_sweep.config.urls import redact
from lora_sweep.run.sweep import LAUNCHED_ENV, preflight, run_sweep
from lora_sweep.search.space import SearchSpace
from lora_sweep.search.study import create_study, fail_orphans

log = logging.getLogger("lora_sweep")
_DROP = ("study.workers=", "+study.workers=", "study.storage=", "+study.storage=")


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one worker runs: a GPU, or a set of CPU cores."""

    index: int
    gpu: str | None = None
    cores: tuple[int, ...] = ()

    def env(self) -> dict[str, str]:
        if self.gpu is not None:
            return {"CUDA_VISIBLE_DEVICES": self.gpu}
        threads = str(len(self.cores))
        return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": ""}

    def describe(self) -> str:
        return f"GPU {self.gpu}" if self.gpu is not None else f"CPU cores {','.join(map(str, self.cores))}"


def visible_gpus(env=os.environ) -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def plan(workers, gpus: list[str], cores: list[int]) -> list[Slot]:
    """One slot per worker: GPUs round-robin, else the cores split into contiguous shares."""
    n = max(1, len(gpus)) if workers == "auto" else int(workers)
    if gpus:
        if n > len(gpus):
            log.warning("study.workers=%d on %d GPU(s): workers share GPUs round-robin", n, len(gpus))
        return [Slot(i, gpu=gpus[i % len(gpus)]) for i in range(n)]
    if n > len(cores):
        raise ConfigError(f"study.workers={workers} exceeds the {len(cores)} CPU core(s) this process may use; "
                          f"use at most {len(cores)}, or auto.")
    share, extra = divmod(len(cores), n)
    slots, start = [], 0
    for i in range(n):
        size = share + (i < extra)
        slots.append(Slot(i, cores=tuple(cores[start:start + size])))
        start += size
    return slots


def worker_args(argv: list[str], url: str) -> list[str]:
    """The launcher's own overrides, with this worker's study.workers and storage."""
    kept = [a for a in argv if not a.startswith(_DROP)]
    quoted = f"'{url}'" if "'" not in url else url
    return [*kept, "study.workers=1", f"study.storage={quoted}"]


def launch(config: Config, space: SearchSpace):
    slots = plan(config.study.workers, visible_gpus(), sorted(os.sched_getaffinity(0)))
    if len(slots) == 1:  # auto on a CPU-only machine: one worker using every core, in this process
        single = dataclasses.replace(config, study=dataclasses.replace(config.study, workers=1))
        return run_sweep(single)  # its study: the CLI's exit code reads whether any trial completed
    preflight(config, space)  # a bad space fails here, once, before anything is written
    url = config.storage_url
    owner = None
    if storage.is_local(url):  # the journal serves this launcher's workers only
        owner = storage.OwnerLock(config)
        owner.acquire()
    try:
        worker_config = dataclasses.replace(config, study=dataclasses.replace(config.study, workers=1, storage=url))
        orphans = fail_orphans(create_study(worker_config, space)) if owner else []
        if orphans:
            log.warning("Trial(s) %s were left RUNNING by a previous run; marked failed and queued again",
                        ", ".join(map(str, orphans)))
        log.info("Starting %d workers on %s: %s", len(slots), redact(url),
                 "; ".join(f"w{s.index}: {s.describe()}" for s in slots))
        procs = [_start(slot, worker_args(sys.argv[1:], url), LAUNCHED_ENV) for slot in slots]

        def forward(signum, frame):  # Ctrl-C / SIGTERM: every worker ends its trial cleanly
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            codes = [p.wait() for p in procs]
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        path = report.write_report(worker_config)
        print(report.summary(worker_config, create_study(worker_config, space)), flush=True)
        log.info("Workers exited with %s; report: %s", codes, path)
        return max(codes, key=abs)
    finally:
        if owner is not None:
            owner.release()


def _start(slot: Slot, args: list[str], launched_env: str) -> subprocess.Popen:
    env = {**os.environ, **slot.env(), "LORA_SWEEP_WORKER": str(slot.index), launched_env: str(os.getpid()),
           "PYTHONUNBUFFERED": "1"}
    cores = set(slot.cores)
    # Own session: Ctrl-C reaches the launcher only, which forwards one SIGTERM to each worker.
    return subprocess.Popen([sys.executable, "-m", "lora_sweep", *args], env=env, start_new_session=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
