"""study.trials_per_gpu: several workers on one device slot (lora_sweep.run.workers). The plan and auto's
arithmetic, with the GPU's free memory and the memory model's peak stood in; that packed trials equal
sequential ones runs for real in tests/integration/test_workers.py."""

from __future__ import annotations

import logging

import pytest
import torch

import lora_sweep.run
from lora_sweep.config import ConfigError
from lora_sweep.run import workers
from lora_sweep.run.workers import Slot, plan, trials_per_device, worker_args
from lora_sweep.search.space import SearchSpace
from lora_sweep.trial import runner

GRID2 = {"lora.r": "choice(4, 8)"}
MB = 2**20


def test_gpu_packing_puts_n_workers_on_each_gpu():
    slots = plan(1, ["0"], list(range(16)), trials_per_gpu=4)
    assert [(s.index, s.gpu, s.place, s.packed) for s in slots] == [(i, "0", i + 1, 4) for i in range(4)]
    # 16 cores for 4 packed workers: 4 torch threads each, none oversubscribes
    assert all(s.env() == {"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
               for s in slots)
    assert plan(1, ["0"], list(range(16)))[0].env() == {"CUDA_VISIBLE_DEVICES": "0"}  # unpacked: as before
    assert slots[1].describe() == "GPU 0 (trial slot 2/4)"
    two = plan("auto", ["3", "5"], list(range(16)), trials_per_gpu=3)
    assert [s.gpu for s in two] == ["3", "3", "3", "5", "5", "5"] and [s.index for s in two] == list(range(6))
    assert plan("auto", ["0"], [0, 1])[0].describe() == "GPU 0"  # unpacked: as before


def test_cpu_packing_shares_the_cores_at_a_fixed_thread_count(caplog):
    both = plan(1, [], [0, 1, 2, 3], trials_per_gpu=2)
    assert [s.cores for s in both] == [(0, 1, 2, 3)] * 2  # shared, not split: each trial sees every core
    two_threads = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    assert [s.env() for s in both] == [two_threads] * 2
    assert both[0].describe() == "CPU cores 0,1,2,3 (trial slot 1/2, 2 threads)"
    split = plan(2, [], [0, 1, 2, 3], trials_per_gpu=2)  # two core shares, two trials on each
    assert [(s.cores, s.threads) for s in split] == [((0, 1), 1), ((0, 1), 1), ((2, 3), 1), ((2, 3), 1)]
    with caplog.at_level(logging.WARNING, logger="lora_sweep"):
        over = plan(1, [], [0, 1], trials_per_gpu=3)
    assert [s.threads for s in over] == [1, 1, 1] and "more trials than cores" in caplog.text


def test_workers_never_launch_again():
    args = worker_args(["+sweep=rank", "study.trials_per_gpu=auto", "+study.trials_per_gpu=2", "train.seed=1"],
                       "journal:///s/study.journal")
    assert args == ["+sweep=rank", "train.seed=1", "study.workers=1", "study.trials_per_gpu=1",
                    "study.storage='journal:///s/study.journal'"]


@pytest.fixture
def gpu(monkeypatch):
    """gpu(free_mb, peak_mb) stands in torch's free CUDA memory and the memory model's largest peak;
    returns the calls the memory model got."""
    calls = []

    def _set(free_mb: float, peak_mb: float):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (int(free_mb * MB), int(80_000 * MB)))
        monkeypatch.setattr(runner, "largest_prediction", lambda settings, device: calls.append(
            (len(settings), device)) or peak_mb)
        return calls

    return _set


@pytest.mark.parametrize("workers_n, gpus, cores, free_mb, peak_mb, expected, why", [
    (1, ["0"], 16, 70_000, 570, 8, "on GPU 0 (predicted peak 570 MB, 70,000 MB free, capped at 8)"),
    (1, ["0"], 16, 70_000, 20_000, 3, "(predicted peak 20,000 MB, 70,000 MB free, as many as fit in 90% of it)"),
    ("auto", ["0", "1"], 8, 70_000, 570, 4, "on each of GPUs 0,1 (predicted peak 570 MB, 70,000 MB free, capped "
                                            "by the CPU: 8 core(s) for 2 GPU worker(s))"),
    (2, ["0"], 32, 40_000, 3_000, 6, "as many as fit in 90% of it shared by 2 workers per GPU"),
    (1, ["0"], 16, 10_000, 50_000, 1, "one: the predicted peak is over 90% of the free memory"),
], ids=["cap", "memory", "cores", "gpu-shared-by-workers", "too-big"])
def test_auto_packs_what_fits_in_memory_and_cores(make_config, gpu, caplog, workers_n, gpus, cores, free_mb,
                                                   peak_mb, expected, why):
    config = make_config(GRID2, study={"trials_per_gpu": "auto", "workers": workers_n})
    space = SearchSpace(config)
    calls = gpu(free_mb, peak_mb)
    with caplog.at_level(logging.INFO, logger="lora_sweep"):
        assert trials_per_device(config, space, gpus, list(range(cores))) == expected
    assert calls == [(len(space.corner_points()), "cuda")]  # every corner of the space, on the GPU
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study.trials_per_gpu=auto")]
    assert len(line) == 1 and line[0].startswith(f"study.trials_per_gpu=auto: {expected} trial") and why in line[0]


def test_auto_on_a_cpu_is_one_trial_at_a_time(make_config, gpu, caplog):
    config = make_config(GRID2, study={"trials_per_gpu": "auto"})
    calls = gpu(70_000, 570)
    with caplog.at_level(logging.INFO, logger="lora_sweep"):
        assert trials_per_device(config, SearchSpace(config), [], [0, 1]) == 1
    assert calls == []  # no memory model, no CUDA on a CPU
    assert "packing applies to GPUs" in caplog.text and "study.workers=N splits the CPU cores" in caplog.text
    assert trials_per_device(make_config(GRID2, study={"trials_per_gpu": 3}), None, [], [0, 1]) == 3


def test_packing_launches_even_with_one_worker(make_config, monkeypatch):
    launched = []
    monkeypatch.setattr(workers, "launch", lambda config, space: launched.append(config) or 0)
    monkeypatch.setattr("lora_sweep.run.sweep.run_sweep", lambda config: pytest.fail("ran in-process"))
    packed = make_config(GRID2, study={"trials_per_gpu": 2})
    assert lora_sweep.run.sweep_or_launch(packed) == 0 and launched == [packed]
    assert lora_sweep.run.sweep_or_launch(make_config(GRID2, study={"trials_per_gpu": "auto"})) == 0


def test_auto_that_comes_to_one_runs_in_this_process(make_config, monkeypatch, caplog):
    ran = []
    monkeypatch.setattr(workers, "visible_gpus", lambda: [])
    monkeypatch.setattr(workers, "run_sweep", lambda config: ran.append(config) or "study")
    monkeypatch.setattr(workers, "_start", lambda *a: pytest.fail("started a worker"))
    config = make_config(GRID2, study={"trials_per_gpu": "auto"})
    with caplog.at_level(logging.INFO, logger="lora_sweep"):
        assert workers.launch(config, SearchSpace(config)) == "study"
    assert (ran[0].study.workers, ran[0].study.trials_per_gpu) == (1, 1)
    assert "packing applies to GPUs" in caplog.text


def test_packed_workers_refuse_sqlite(make_config, monkeypatch):
    monkeypatch.setattr(workers, "visible_gpus", lambda: [])
    monkeypatch.setattr(workers, "preflight", lambda config, space: "cpu")
    monkeypatch.setattr(workers, "_start", lambda *a: pytest.fail("started a worker"))
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1})
    config = make_config(GRID2, study={"trials_per_gpu": 2, "storage": "sqlite:///x.db"})
    with pytest.raises(ConfigError, match=r"study.storage='sqlite:///x.db' is SQLite, which the 2 workers of "
                                          r"study.workers=1 study.trials_per_gpu=2 would lock or corrupt"):
        workers.launch(config, SearchSpace(config))


def test_slot_defaults_are_one_unpacked_worker():
    assert Slot(0, cores=(0, 1)).env()["OMP_NUM_THREADS"] == "2"
    assert Slot(0, cores=(0, 1)).describe() == "CPU cores 0,1"
