"""run: the sweep loop in one process (sweep), or N worker processes sharing one study (workers);
the Optuna objective that records each trial; progress lines."""

from __future__ import annotations


def sweep_or_launch(config):
    """Run the sweep here (study.workers=1, study.trials_per_gpu=1) and return its study, or start the
    workers and return their exit status (or the study, when one worker runs in this process)."""
    if config.study.workers != 1 or config.study.trials_per_gpu != 1:  # auto may still come to one
        from lora_sweep.run.workers import launch
        from lora_sweep.search.samplers import sampler_name
        from lora_sweep.search.space import SearchSpace

        space = SearchSpace(config)
        sampler_name(config, space)  # a grid over interval(...) fails here, before workers start
        return launch(config, space)
    from lora_sweep.run.sweep import run_sweep

    return run_sweep(config)
