"""The confirmation stage in one worker: once the search is over, the queued (configuration, seed)
runs of lora_sweep.search.confirm, recorded like trials but in the companion study and tagged
stage=confirm under the same MLflow parent run."""

from __future__ import annotations

import logging
import time

import optuna

from lora_sweep.config import Config
from lora_sweep.run.objective import Objective
from lora_sweep.run.progress import progress_for
from lora_sweep.search import confirm, storage
from lora_sweep.search.space import SearchSpace
from lora_sweep.search.study import QueueEmpty, create_study, fail_orphans, fail_stale, queue_study

log = logging.getLogger("lora_sweep")
POLL_S = 5.0  # how often a worker waiting for the search's last trials looks again


def run_confirm(config: Config, search: optuna.Study, tracker, parent: str, device: str, tags: dict,
                owner: bool) -> int:
    """Run this worker's share of the confirmation runs; returns how many were queued when it began.
    owner: this process holds the local store's owner lock (RUNNING runs there are orphans)."""
    stage_config = confirm.stage_config(config)
    space = SearchSpace(stage_config)
    waited = False
    while busy := [t.number for t in search.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]:
        if not waited:  # the top-k is not final until every search trial has ended
            log.info("Confirmation waits for search trial(s) %s (other workers) to finish",
                     ", ".join(map(str, busy)))
            waited = True
        if not owner:
            fail_stale(search)
        time.sleep(POLL_S)
    with storage.study_lock(config):  # one worker at a time queues the runs
        stage = create_study(stage_config, space)
        stale = fail_orphans(stage) if owner else fail_stale(stage)
        if stale:
            log.warning("Confirmation run(s) %s were left RUNNING by a worker that died; marked failed and "
                        "queued again", ", ".join(map(str, stale)))
        also = _recommended(config, search)
        n = confirm.plan(config, search, stage, also)
    top = confirm.top_trials(config, search, also)
    seeds = confirm.seeds(config)
    if n == 0:
        log.info("Confirmation of %d configuration(s) under seeds %s: nothing left to run", len(top),
                 ", ".join(map(str, seeds)))
        return 0
    log.info("Confirmation: %d configuration(s) (%s) re-trained under seeds %s (seed %d is the "
             "search's own run): %d run(s) queued", len(top), "; ".join(
                 f"trial {t.number}: {t.user_attrs.get('label', t.params)}" for t in top),
             ", ".join(map(str, seeds[1:])), seeds[0], n)
    with progress_for(n, config.base.train.num_train_epochs, config.study.metric,
                      config.study.direction) as progress:
        objective = Objective(stage_config, space, tracker, parent, device, {**tags, "stage": confirm.STAGE},
                              planned=n, progress=progress, examples_dir=config.study_dir / confirm.STAGE)
        try:
            queue_study(stage).optimize(objective, catch=(Exception,), timeout=config.study.timeout)
        except QueueEmpty:
            pass
    return n


def _recommended(config: Config, search: optuna.Study) -> tuple:
    """The search's one-seed recommendation (report/recommend.py, before any confirmation): confirmed too,
    so that the cheap configuration the search could not tell from the best is tested over seeds."""
    from lora_sweep.report.recommend import recommend

    chosen = recommend(config, search, confirmed=False)
    return () if chosen is None else (chosen.trial.number,)
