"""A sweep, start to end: validate everything -> study -> trials -> report.

Nothing is written (no study database, no MLflow run, no report) until every point the space can
produce has been validated against the real model and data: a typo fails in seconds, not after
the first trial.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import logging
import os
import signal
import sys
import time

import optuna
from optuna.trial import TrialState

import lora_sweep
from lora_sweep import record, report
from lora_sweep.trial import adapters, runner
from lora_sweep.trial import data
from lora_sweep.trial import environment
from lora_sweep.trial import interrupt
from lora_sweep.trial import models
from lora_sweep.trial import precision
from lora_sweep.trial.train import precision_name
from lora_sweep.report import pareto
from lora_sweep.search import storage
from lora_sweep.config import Config, ConfigError
from lora_sweep.config.load import to_stored
from lora_sweep.config.urls import RedactFilter, redact
from lora_sweep.run.confirm import run_confirm
from lora_sweep.run.objective import Objective
from lora_sweep.run.progress import progress_for
from lora_sweep.search.space import SearchSpace
from lora_sweep.search.samplers import make_pruner, make_sampler, sampler_name
from lora_sweep.search import confirm, race
from lora_sweep.search.study import (QueueEmpty, budget_callbacks, create_study, enqueue_warm_start, fail_orphans,
                                     fail_stale, queue_study, resume, trials_to_run, warm_start_points)

LAUNCHED_ENV = "LORA_SWEEP_LAUNCHER"  # set by workers.launch for the workers it starts

log = logging.getLogger("lora_sweep")


def preflight(config: Config, space: SearchSpace) -> str:
    """Validate every corner of the space; returns the device trials will use."""
    device = models.resolve_device(config.base.train.device)
    points = space.corner_points()
    for point in points:
        try:
            point.settings.validate()
        except ConfigError as e:
            where = f" (in the search space, at {dict(point.values)})" if point.values else ""
            raise ConfigError(f"{e}{where}") from None
    checked = set()
    for point in points:
        s = point.settings
        labels = data.load_splits(s.data).labels
        runner.check_data(s, config.study.metric)  # instruction/chat data: task type and metric, before the model
        if s.model.load_in_4bit:
            continue  # needs CUDA; on a CPU the trial itself records why it cannot run
        base = models.load_base(s.model, labels, s.train.seed, s.lora.task_type)
        runner.check_data(s, config.study.metric, base.tokenizer)  # ... and every example renders and fits
        adapters.resolve_targets(s.lora.target_modules, base.model)
        try:  # a budget below one rank of this point's targets: refused before anything is written
            lora = adapters.apply_budget(s.lora, base.model)
        except ConfigError as e:
            raise ConfigError(f"{e}{f' (in the search space, at {dict(point.values)})' if point.values else ''}") from None
        if (s.model, lora) not in checked:  # peft's verdict on the LoRA settings (lora.init_lora_weights, ...)
            checked.add((s.model, lora))
            adapters.check_lora(lora, base.model, varied=tuple(point.values))
    return device


def run_sweep(config: Config, callbacks: tuple = ()) -> optuna.Study:
    """Run (or resume) the sweep in this process (study.workers=1). callbacks: extra Optuna
    callbacks (the search benchmark stops a search at its target)."""
    if config.study.workers != 1:
        raise ValueError("run_sweep runs one process; lora_sweep.run.sweep_or_launch starts study.workers=N")
    space = SearchSpace(config)
    sampler = sampler_name(config, space)
    log.info("Sweep %r: %s sampler, %s pruner, over %s", config.study.name, sampler, config.study.pruner,
             ", ".join(f"{k}={v}" for k, v in config.space.items()) or "the base configuration")
    for reason in space.dropped.values():
        log.info("Condition: %s", reason)
    if config.study.multi_objective:
        log.info("Multi-objective: %s; no pruning (Optuna prunes single-objective studies only)",
                 ", ".join(f"{d} {o}" for o, d in zip(config.study.objectives, config.study.directions)))
    # Sampler/pruner arguments and warm-start points fail here, before anything is written.
    make_sampler(config, space), make_pruner(config, space), warm_start_points(config, space)
    timings = {"startup_s": time.perf_counter() - lora_sweep.IMPORTED_AT}
    t0 = time.perf_counter()
    device = preflight(config, space)
    timings["preflight_s"] = time.perf_counter() - t0

    # A local store (SQLite, journal) serves one process tree: its owner knows RUNNING trials
    # there are orphans. Workers started by `study.workers=N` run under their launcher's lock.
    owner = None
    if storage.is_local(config.storage_url) and not os.environ.get(LAUNCHED_ENV):
        owner = storage.OwnerLock(config)
        owner.acquire()
    try:
        return _run(config, space, sampler, device, orphans=owner is not None, callbacks=callbacks,
                    timings=timings)
    finally:
        if owner is not None:
            owner.release()


def _run(config: Config, space: SearchSpace, sampler: str, device: str, orphans: bool,
         callbacks: tuple = (), timings: dict | None = None) -> optuna.Study:
    timings = dict(timings or {})
    t0 = time.perf_counter()
    study = create_study(config, space)
    _log_to_file(config)
    with storage.study_lock(config):  # one worker at a time queues the grid and creates the parent run
        if config.raw and not study.get_trials(deepcopy=False) and not record.settings(study):
            record.set_settings(study, to_stored(config))  # a new study: once, for export, report and ui to read
        stale = fail_orphans(study) if orphans else fail_stale(study)
        if stale:
            log.warning("Trial(s) %s were left RUNNING by a worker that died; marked failed and queued again",
                        ", ".join(map(str, stale)))
        n = resume(config, space, study)
        tracker = parent = None
        if n > 0 or record.parent_run_id(study) is not None:
            from lora_sweep.tracking import Tracker

            tracker = Tracker(config.tracking_uri, config.experiment_name,
                              config.paths.sweeps_dir / "mlartifacts")
            meta = _meta(config, sampler, device)
            config = _with_precision(config, study, device, planned=n)  # decided once a study, under this lock
            space = SearchSpace(config)
            if not record.has_meta(study):
                record.set_meta(study, meta)
            parent = tracker.parent_run(study, f"sweep {config.study.name}", {
                "study_name": config.study.name, "sampler": sampler, "device": meta["device"],
                "git_commit": meta["git_commit"]}, reopen=n > 0 or confirm.enabled(config))
            _close_orphan_runs(tracker, parent, study)
    if n == 0 and not (confirm.enabled(config) and parent is not None):
        log.info("Sweep %r is complete (%d trials done); nothing to run. Delete %s to start over.",
                 config.study.name, len(study.trials), config.study_dir)
        report.write_report(config, study)
        if config.study.multi_objective:
            print(pareto.format_front(config, pareto.store(config, study)[0]), flush=True)
        return study
    if enqueue_warm_start(config, space, study):
        log.info("Warm start: %d point(s) enqueued as the first trials (%s)", len(config.study.warm_start),
                 ", ".join(map(str, config.study.warm_start)))
    elif config.study.warm_start:
        log.info("Warm start ignored: a grid visits every point anyway (study.sampler=%s)", sampler)

    log.info("Device: %s. Running %d trial(s)%s; MLflow experiment %r at %s", meta["device"], n,
             ", then the confirmation stage" if confirm.enabled(config) else "", config.experiment_name,
             redact(_where(config, tracker, parent)))
    tags = {"study_name": config.study.name, "device": meta["device"], "git_commit": meta["git_commit"],
            **{f"version.{k}": v for k, v in meta["versions"].items()}}
    grid = sampler == "grid"
    status = "FINISHED"
    previous = interrupt.install()
    timings["setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # Everything alive now (libraries, data, base model) lives as long as the sweep: frozen, the
    # collector stops re-scanning its ~0.5M objects at every release_memory (0.2 s a call, 4 a trial).
    gc.collect()
    gc.freeze()
    try:
        if n:
            with progress_for(n, config.base.train.num_train_epochs, config.study.metric,
                              config.study.direction) as progress:
                objective = Objective(config, space, tracker, parent, device, tags, planned=n, progress=progress)
                _search(config, space, study, objective, grid, callbacks)
        if confirm.enabled(config):
            why = _stopped_early(config, space, study, time.perf_counter() - t0)
            if why:
                log.warning("Confirmation stage not started: %s. Run the same command again to finish the "
                            "search, then confirm.", why)
            else:
                timings["search_s"] = time.perf_counter() - t0
                run_confirm(config, study, tracker, parent, device, tags, owner=orphans)
    except BaseException:
        status = "KILLED"
        raise
    finally:
        gc.unfreeze()
        signal.signal(signal.SIGTERM, previous)
        timings["trials_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with storage.study_lock(config):  # workers finishing together must not both write the parent
            _close_orphan_runs(tracker, parent, study)
            path = report.write_report(config, study)
            # The last worker out closes the parent (a later start reopens it). Queued points may
            # remain (an interrupted sweep): only trials in flight mean another worker is still busy.
            if not _running(study):
                if path is not None:
                    report.publish(config, study, path, tracker)
                tracker.finish_parent(parent, status)
        timings["report_s"] = time.perf_counter() - t0
    if not os.environ.get(LAUNCHED_ENV):  # where this process's time went (lora_sweep.bench reads it)
        record.set_timings(study, timings)
    print(report.summary(config, study), flush=True)
    if config.study.multi_objective:
        front, path = pareto.store(config, study)
        print(pareto.format_front(config, front) + f"\nPareto front: {path}", flush=True)
    return study


def _search(config: Config, space: SearchSpace, study: optuna.Study, objective, grid: bool, callbacks) -> None:
    if not grid:  # study-wide budgets: n_trials and budget_s count every worker's trials
        study.optimize(objective, n_trials=objective.planned, timeout=config.study.timeout, catch=(Exception,),
                       callbacks=[*budget_callbacks(config, space), *callbacks])
        return
    racing = race.racing(config, space)
    extra = [race.Promote(config, race.make_plan(config, space))] if racing else []
    start = time.monotonic()
    while True:  # workers pop queued points until none is left
        left = None if config.study.timeout is None else config.study.timeout - (time.monotonic() - start)
        if left is not None and left <= 0:
            return
        try:
            queue_study(study).optimize(objective, catch=(Exception,), timeout=left,
                                        callbacks=[*budget_callbacks(config, space), *extra, *callbacks])
            return  # stopped: a budget or the timeout
        except QueueEmpty:
            pass
        # A race queues a rung's survivors when its last candidate there finishes, maybe on another worker.
        if not racing or not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not (racing and race.enqueue_under_lock(config, race.make_plan(config, space), study)):
                return
        else:
            fail_stale(study)  # a dead worker's race trial must not keep this one waiting
            time.sleep(2)


def _with_precision(config: Config, study: optuna.Study, device: str, planned: int = 1) -> Config:
    """train.mixed_precision=auto on a CPU: the study's stored bf16-or-fp32 decision (the first time:
    this machine's cached one, else a probe bounded by `planned` trials' expected training time; see
    lora_sweep.trial.precision), written into the config every trial is built from. Other settings
    pass unchanged."""
    train = config.base.train
    if train.mixed_precision != "auto" or device != "cpu":
        log.info("Precision: %s (train.mixed_precision=%s)", precision_name(train, device), train.mixed_precision)
        return config
    decision = record.precision(study)
    if not decision:
        decision = precision.choose(config.base, planned)
        record.set_precision(study, decision)
    log.info("Precision: %s (train.mixed_precision=auto%s)", precision.describe(decision), "" if "fp32_s" not in
             decision else f"; a training step took {decision['fp32_s']:.3f} s in fp32, {decision['bf16_s']:.3f} s in bf16")
    train = dataclasses.replace(train, mixed_precision=precision.mixed_precision_value(decision))
    return dataclasses.replace(config, base=dataclasses.replace(config.base, train=train))


def _stopped_early(config: Config, space: SearchSpace, study: optuna.Study, elapsed: float) -> str:
    """Why the search is not over for this worker (study.timeout, queued points left), or ''."""
    if config.study.timeout is not None and elapsed >= config.study.timeout:
        return f"study.timeout={config.study.timeout:g} s ran out during the search"
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if waiting and trials_to_run(config, space, study):
        return f"{len(waiting)} search point(s) are still queued"
    return ""


def _running(study: optuna.Study) -> bool:
    """Trials in flight in the search or its confirmation stage: another worker is still busy."""
    stage = confirm.load_stage(study)
    return any(s.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) for s in (study, stage) if s is not None)


def _where(config: Config, tracker, parent: str) -> str:
    """The tracking store, or on a tracking server the parent run's page (model-training view)."""
    from lora_sweep.tracking import ui_base

    base = ui_base(config.tracking_uri)
    return tracker.experiment_url(base, parent) if base else config.tracking_uri


def _close_orphan_runs(tracker, parent, study: optuna.Study) -> None:
    if tracker is None:
        return
    states = {str(t.number): t.state.name for t in study.get_trials(deepcopy=False)}
    stage = confirm.load_stage(study)
    if stage is not None:
        states.update({f"{confirm.STAGE}:{t.number}": t.state.name for t in stage.get_trials(deepcopy=False)})
    closed = tracker.close_orphans(parent, states)
    if closed:
        log.warning("Closed %d MLflow run(s) left RUNNING by a dead worker (marked KILLED)", len(closed))


def _meta(config: Config, sampler: str, device: str) -> dict:
    return {
        "model": config.base.model.name_or_path,
        "data": config.base.data.name_or_path,
        "train_size": config.base.data.train_size,
        "eval_size": config.base.data.eval_size,
        "test_size": config.base.data.test_size,
        "max_length": config.base.data.max_length,
        "labels": list(data.load_splits(config.base.data).labels),
        "task_type": config.base.lora.task_type,
        "device": environment.device_description(device),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "sampler": sampler,
        "space": dict(config.space),
        "command": redact("python -m lora_sweep " + " ".join(sys.argv[1:])),
        "versions": environment.versions(),
        "git_commit": environment.git_commit(),
        "tracking_uri": redact(config.tracking_uri),
        "storage": redact(config.storage_url),
        "experiment_name": config.experiment_name,
    }


def _log_to_file(config: Config) -> None:
    config.study_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(config.study_dir / "sweep.log")
    handler.addFilter(RedactFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("lora_sweep").addHandler(handler)
