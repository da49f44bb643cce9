"""study.workers=N | auto: N worker processes on this machine share one study; study.trials_per_gpu=N |
auto runs that many of them at once on each worker's device.

    python -m lora_sweep +sweep=rank study.workers=auto     # one worker per visible GPU
    python -m lora_sweep +sweep=rank study.workers=2        # CPU: the cores split in two
    python -m lora_sweep +sweep=rank study.trials_per_gpu=auto   # as many trials per GPU as fit

Each worker is the same command with study.workers=1 study.trials_per_gpu=1 and the shared storage:
PostgreSQL when study.storage names it, else Optuna's journal file (never SQLite, which parallel
writers lock or corrupt). GPU workers are pinned with CUDA_VISIBLE_DEVICES; CPU workers get a
disjoint set of cores (sched_setaffinity) and as many torch threads (OMP_NUM_THREADS). Workers
on other hosts run the plain command pointed at the same PostgreSQL (see README: SLURM).

Packing (study.trials_per_gpu=N): each device slot is taken by N workers. On a GPU they share its
CUDA_VISIBLE_DEVICES id; on a CPU they share the slot's cores, each with len(cores) // N threads, so
a packed trial computes exactly what a sequential run at that thread count computes. auto on GPUs:
min(8, CPU cores per device slot, 90% of the free CUDA memory / the space's largest predicted peak);
on a CPU 1 (study.workers=N is what splits CPU cores).
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
from lora_sweep.config.urls import kind, redact
from lora_sweep.run.sweep import LAUNCHED_ENV, preflight, run_sweep
from lora_sweep.search.space import SearchSpace
from lora_sweep.search.study import create_study, fail_orphans

log = logging.getLogger("lora_sweep")
_DROP = ("study.workers=", "+study.workers=", "study.storage=", "+study.storage=", "study.trials_per_gpu=",
         "+study.trials_per_gpu=")
AUTO_CAP = 8         # trials_per_gpu=auto at most: beyond it the trials mostly wait on each other's kernels
MEMORY_SHARE = 0.9   # of the free CUDA memory auto packs against; the rest: CUDA contexts, fragmentation
MB = 2**20


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one worker runs: a GPU, or a set of CPU cores; `packed` workers share it (study.trials_per_gpu),
    this one in trial slot `place` of them."""

    index: int
    gpu: str | None = None
    cores: tuple[int, ...] = ()
    place: int = 1
    packed: int = 1
    gpu_threads: int = 0  # packed GPU workers: torch CPU threads each, so they do not oversubscribe the cores

    @property
    def threads(self) -> int:
        """CPU: torch threads, a fixed share of the cores: a sequential run at this count computes the same."""
        return max(1, len(self.cores) // self.packed)

    def env(self) -> dict[str, str]:
        if self.gpu is not None:
            threads = {"OMP_NUM_THREADS": str(self.gpu_threads), "MKL_NUM_THREADS": str(self.gpu_threads)}
            return {"CUDA_VISIBLE_DEVICES": self.gpu, **(threads if self.gpu_threads else {})}
        threads = str(self.threads)
        return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": ""}

    def describe(self) -> str:
        where = f"GPU {self.gpu}" if self.gpu is not None else f"CPU cores {','.join(map(str, self.cores))}"
        if self.packed == 1:
            return where
        threads = "" if self.gpu is not None else f", {self.threads} thread{'s' * (self.threads > 1)}"
        return f"{where} (trial slot {self.place}/{self.packed}{threads})"


def visible_gpus(env=os.environ) -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_count(workers, gpus: list[str]) -> int:
    """Device slots study.workers asks for: auto = one per visible GPU (one on a CPU)."""
    return max(1, len(gpus)) if workers == "auto" else int(workers)


def plan(workers, gpus: list[str], cores: list[int], trials_per_gpu: int = 1) -> list[Slot]:
    """One device slot per study.workers: GPUs round-robin, else the cores split into contiguous shares;
    then trials_per_gpu workers on each slot, sharing its GPU or its cores."""
    n = worker_count(workers, gpus)
    if gpus:
        if n > len(gpus):
            log.warning("study.workers=%d on %d GPU(s): workers share GPUs round-robin", n, len(gpus))
        devices = [Slot(i, gpu=gpus[i % len(gpus)]) for i in range(n)]
    else:
        if n > len(cores):
            raise ConfigError(f"study.workers={workers} exceeds the {len(cores)} CPU core(s) this process may "
                              f"use; use at most {len(cores)}, or auto.")
        share, extra = divmod(len(cores), n)
        devices, start = [], 0
        for i in range(n):
            size = share + (i < extra)
            devices.append(Slot(i, cores=tuple(cores[start:start + size])))
            start += size
        if trials_per_gpu > len(devices[-1].cores):
            log.warning("study.trials_per_gpu=%d on %d CPU core(s) per worker: one thread each, more trials "
                        "than cores (slower, same results)", trials_per_gpu, len(devices[-1].cores))
    k = trials_per_gpu
    gpu_threads = max(1, len(cores) // (n * k)) if gpus and k > 1 else 0
    return [dataclasses.replace(d, index=i * k + j, place=j + 1, packed=k, gpu_threads=gpu_threads)
            for i, d in enumerate(devices) for j in range(k)]


def trials_per_device(config: Config, space: SearchSpace, gpus: list[str], cores: list[int]) -> int:
    """study.trials_per_gpu as a number: N as given; auto on GPUs min(AUTO_CAP, CPU cores per device slot,
    MEMORY_SHARE x the least free CUDA memory / the space's largest predicted peak), at least 1; auto on a CPU 1."""
    value = config.study.trials_per_gpu
    if value != "auto":
        return int(value)
    if not gpus:
        log.info("study.trials_per_gpu=auto: one trial at a time on a CPU; packing applies to GPUs "
                 "(study.workers=N splits the CPU cores between N workers)")
        return 1
    import torch

    from lora_sweep.trial.runner import largest_prediction  # lazy: torch-heavy, and only auto on a GPU needs it

    slots = worker_count(config.study.workers, gpus)
    sharing = -(-slots // len(gpus))  # device slots on the busiest GPU (study.workers > GPUs)
    peak = float(largest_prediction([p.settings for p in space.corner_points()], "cuda"))
    free = min(torch.cuda.mem_get_info(i)[0] for i in range(len(gpus))) / MB
    fit = int(MEMORY_SHARE * free / peak / sharing) if peak > 0 else AUTO_CAP
    per_gpu = "" if sharing == 1 else f" shared by {sharing} workers per GPU"
    bounds = [(AUTO_CAP, f"capped at {AUTO_CAP}"),
              (max(1, len(cores) // slots), f"capped by the CPU: {len(cores)} core(s) for {slots} GPU worker(s)"),
              (fit, f"as many as fit in {MEMORY_SHARE:.0%} of it{per_gpu}")]
    n, why = min(bounds, key=lambda b: b[0])
    if n < 1:
        n, why = 1, f"one: the predicted peak is over {MEMORY_SHARE:.0%} of the free memory{per_gpu}"
    where = f"GPU {gpus[0]}" if len(gpus) == 1 else f"each of GPUs {','.join(gpus)}"
    log.info("study.trials_per_gpu=auto: %d trial%s at once on %s (predicted peak %s MB, %s MB free, %s)", n,
             "s" * (n > 1), where, f"{peak:,.0f}", f"{free:,.0f}", why)
    return n


def worker_args(argv: list[str], url: str) -> list[str]:
    """The launcher's own overrides, with this worker's study.workers, trials_per_gpu and storage."""
    kept = [a for a in argv if not a.startswith(_DROP)]
    quoted = f"'{url}'" if "'" not in url else url
    return [*kept, "study.workers=1", "study.trials_per_gpu=1", f"study.storage={quoted}"]


def launch(config: Config, space: SearchSpace):
    gpus = [] if config.base.train.device == "cpu" else visible_gpus()
    cores = sorted(os.sched_getaffinity(0))
    checked = config.study.trials_per_gpu == "auto" and bool(gpus)
    if checked:  # a bad space fails with its own message before the memory model reads its points
        preflight(config, space)
    slots = plan(config.study.workers, gpus, cores, trials_per_device(config, space, gpus, cores))
    if len(slots) == 1:  # auto on a CPU-only machine: one worker using every core, in this process
        single = dataclasses.replace(config, study=dataclasses.replace(config.study, workers=1, trials_per_gpu=1))
        return run_sweep(single)  # its study: the CLI's exit code reads whether any trial completed
    if not checked:
        preflight(config, space)  # a bad space fails here, once, before anything is written
    # study.workers=1 with packing: storage_url would be SQLite, which parallel writers lock or corrupt
    url = dataclasses.replace(config, study=dataclasses.replace(config.study, workers=len(slots))).storage_url
    if kind(url) == "sqlite":
        raise ConfigError(f"study.storage={redact(url)!r} is SQLite, which the {len(slots)} workers of "
                          f"study.workers={config.study.workers} study.trials_per_gpu={config.study.trials_per_gpu} "
                          f"would lock or corrupt; leave study.storage=null (a journal file is used) or give "
                          f"postgresql://user@host:5432/db.")
    worker_config = dataclasses.replace(config, study=dataclasses.replace(config.study, workers=1, trials_per_gpu=1,
                                                                          storage=url))
    owner = None
    if storage.is_local(url):  # the journal serves this launcher's workers only
        owner = storage.OwnerLock(worker_config)
        owner.acquire()
    try:
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
