"""Which precision `train.mixed_precision=auto` trains in on a CPU: bf16 only where it measured faster,
found by a short, bounded probe whose answer is cached per machine.

Whether bf16 pays on a CPU depends on the CPU (AMX, AVX512-BF16, or emulated) and on the model, not
on its flags alone, so it is timed: training steps (forward + backward) of the trial's own model with
its LoRA adapter on one small random batch (PROBE_BATCH x min(data.max_length, PROBE_TOKENS)), in
fp32 and under bf16 autocast, interleaved, best of REPEATS after a warm-up step each.

The probe's cost is bounded: it stops before a step would take it past min(BUDGET_S, SHARE x the
sweep's expected training time) and then decides fp32, saying so. The expected training time is
estimated from the fastest fp32 step so far, scaled by tokens: step seconds / probe tokens x
data.train_size x data.max_length x train.num_train_epochs x planned trials (padded lengths: an
upper bound, as a rough figure should be here). Loading the model is not counted: trials load it anyway.

A completed decision is cached per machine in cache_file() ($LORA_SWEEP_CACHE_DIR, else
$XDG_CACHE_HOME/lora_sweep, else ~/.cache/lora_sweep; precision.json), keyed by cache_key(): CPU model
and flags, torch threads, torch version, model and probe shape; a decision cut short by its budget is
not cached (a larger sweep has more to spend). lora_sweep.run.sweep stores the decision used on the
study (lora_sweep.record.precision), so every worker, resume and report agrees on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

from lora_sweep.config import TrialSettings
from lora_sweep.trial.environment import _cpu_model, cpu_has_native_bf16

log = logging.getLogger(__name__)

THRESHOLD = 1.3  # bf16 must be this much faster: below it, fp32's exact arithmetic is worth the time
BUDGET_S = 10.0  # the probe's ceiling, in seconds of timed steps ...
SHARE = 0.02     # ... or this share of the sweep's expected training time, whichever is smaller
PROBE_BATCH = 4
PROBE_TOKENS = 64
REPEATS = 3
CACHE_ENV = "LORA_SWEEP_CACHE_DIR"


def probe_shape(settings: TrialSettings) -> tuple[int, int]:
    """(batch, tokens) the probe times: small, so that it costs seconds, not minutes."""
    return (min(PROBE_BATCH, settings.train.per_device_train_batch_size),
            min(PROBE_TOKENS, settings.data.max_length))


def expected_training_s(step_s: float, settings: TrialSettings, planned: int) -> float:
    """The sweep's training seconds, guessed from one fp32 step at the probe shape (module docstring)."""
    batch, tokens = probe_shape(settings)
    per_token = step_s / (batch * tokens)
    return (per_token * settings.data.train_size * settings.data.max_length * settings.train.num_train_epochs
            * max(1, planned))


def budget_s(step_s: float, settings: TrialSettings, planned: int) -> float:
    """min(BUDGET_S, SHARE x the expected training time): what the probe may spend."""
    return min(BUDGET_S, SHARE * expected_training_s(step_s, settings, planned))


def training_step(settings: TrialSettings, shape: tuple[int, int]):
    """step(bf16) -> seconds: one timed training step of the trial's model + LoRA adapter on a random
    batch of `shape` (the probe's step timer; tests replace it)."""
    import torch

    from lora_sweep.trial import adapters, models
    from lora_sweep.trial.dropout import use_fast_dropout
    from lora_sweep.trial.runner import labels_of

    base = models.load_base(settings.model, labels_of(settings), settings.train.seed, settings.lora.task_type)
    lora = adapters.apply_budget(settings.lora, base.model)
    model, _ = adapters.apply_lora(models.fresh_copy(base), lora)
    if settings.train.fast_dropout:
        use_fast_dropout(model, attention=settings.train.fast_attention)
    model.train()
    gen = torch.Generator().manual_seed(0)
    vocab = base.model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, shape, generator=gen)  # past most special tokens
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.zeros(shape[0], dtype=torch.long) if lora.task_type == "SEQ_CLS" else ids}

    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def time_steps(settings: TrialSettings, planned: int = 1, repeats: int = REPEATS) -> dict:
    """Best fp32 and bf16 step seconds at the probe shape, within budget_s: fp32_s, bf16_s (None where
    not timed), spent_s (the timed steps' sum), budget_s, expected_s, complete (all steps ran)."""
    step = training_step(settings, probe_shape(settings))
    first = step(False)  # fp32's warm-up: also the first guess at the sweep's training time
    spent, best, last = first, {False: math.inf, True: math.inf}, {False: first, True: first}
    plan = [True] + [False, True] * repeats  # bf16's warm-up, then the pairs that count
    complete = True
    for k, bf16 in enumerate(plan):
        budget = budget_s(min(first, best[False]), settings, planned)
        if spent + last[bf16] > budget:  # the next step would likely overrun: stop before it
            complete = False
            break
        seconds = step(bf16)
        spent, last[bf16] = spent + seconds, seconds
        if k:
            best[bf16] = min(best[bf16], seconds)
    fastest = min(first, best[False])
    return {"fp32_s": None if math.isinf(best[False]) else best[False],
            "bf16_s": None if math.isinf(best[True]) else best[True], "spent_s": spent,
            "budget_s": budget_s(fastest, settings, planned),
            "expected_s": expected_training_s(fastest, settings, planned), "complete": complete}


def decide(settings: TrialSettings, planned: int = 1) -> dict:
    """Time bf16 against fp32 for these settings (time_steps) and choose: bf16 only at >= THRESHOLD x
    faster; fp32 where the budget ran out first, or where bf16 is emulated (not timed)."""
    shape = "x".join(map(str, probe_shape(settings)))
    if not cpu_has_native_bf16():  # emulated bf16 ran a MiniLM step 11x slower: not worth timing
        return {"choice": "fp32", "emulated": True, "threshold": THRESHOLD, "shape": shape}
    m = time_steps(settings, planned)
    out = {"threshold": THRESHOLD, "shape": shape, "budget_s": round(m["budget_s"], 3),
           "probe_s": round(m["spent_s"], 3), "expected_train_s": round(m["expected_s"], 1)}
    if not m["complete"]:
        return {"choice": "fp32", "budget_out": True, **out}
    speedup = m["fp32_s"] / m["bf16_s"]
    return {"choice": "bf16" if speedup >= THRESHOLD else "fp32", "fp32_s": round(m["fp32_s"], 4),
            "bf16_s": round(m["bf16_s"], 4), "speedup": round(speedup, 3), **out}


# -- the per-machine cache -------------------------------------------------------------------------

def cache_file() -> Path:
    """$LORA_SWEEP_CACHE_DIR/precision.json, else $XDG_CACHE_HOME/lora_sweep/, else ~/.cache/lora_sweep/."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_sweep"
    return Path(folder) / "precision.json"


def cache_key(settings: TrialSettings) -> str:
    """What a decision depends on: the CPU (model, flags), torch (threads, version), the model and the
    probe shape. Not the study: every sweep on this machine and model shares one decision."""
    import torch

    m = settings.model
    dtype = f"4bit/{m.bnb_4bit_quant_type}/{m.bnb_4bit_compute_dtype}" if m.load_in_4bit else "as stored"
    key = {"cpu": _cpu_model() or "?", "cpu_flags": _cpu_flags(), "capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "model": "|".join(str(x) for x in (m.name_or_path, m.revision, m.gguf_file) if x is not None),
           "dtype": dtype, "task_type": settings.lora.task_type, "shape": list(probe_shape(settings))}
    return json.dumps(key, sort_keys=True)


def _cpu_flags() -> str:
    """A short digest of /proc/cpuinfo's flags (virtual machines of one CPU model differ in them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha256(" ".join(sorted(line.split(":", 1)[1].split())).encode()).hexdigest()[:16]
    except OSError:
        pass
    return "?"


def _read_cache(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
        return entries if isinstance(entries, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a damaged cache costs one probe, never the sweep
        log.warning("Precision cache %s unreadable (%s): probing again", path, e)
        return {}


def choose(settings: TrialSettings, planned: int = 1) -> dict:
    """The cached decision for this machine and model (cached: True), else decide() and cache it where
    it completed. `planned`: trials the sweep expects to run (sets the probe's budget)."""
    path, key = cache_file(), cache_key(settings)
    hit = _read_cache(path).get(key)
    if isinstance(hit, dict) and hit.get("choice") in ("bf16", "fp32"):
        return {**hit, "cached": True}
    decision = decide(settings, planned)
    if decision.get("budget_out") or decision.get("emulated"):  # cut short, or not timed: nothing to keep
        return decision
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(path)
        entries[key] = decision
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: a worker reading at the same time sees the old or the new file
        log.info("Precision decision cached for this machine and model in %s", path)
    except OSError as e:
        log.warning("Precision cache %s not written (%s): the next sweep probes again", path, e)
    return decision


def mixed_precision_value(decision: dict) -> str:
    """The train.mixed_precision value a stored decision stands for."""
    return "bf16" if decision.get("choice") == "bf16" else "no"


def describe(decision: dict) -> str:
    """One line: 'bf16 chosen: 1.70x faster than fp32 at 4x64', 'fp32 (bf16 1.10x, below 1.3x) at 4x64',
    or why fp32 was chosen untimed or with its timing cut short; '(cached)' where the cache gave it."""
    speedup, shape = decision.get("speedup", float("nan")), decision.get("shape", "?")
    cached = " (cached for this machine)" if decision.get("cached") else ""
    if decision.get("emulated"):
        return "fp32 (bf16 is emulated on this CPU: no AVX512-BF16 or AMX; not timed)"
    if decision.get("budget_out"):
        return (f"fp32 (timing stopped at its {decision.get('budget_s', float('nan')):.2f} s budget, "
                f"min({BUDGET_S:g} s, {SHARE:.0%} of ~{decision.get('expected_train_s', float('nan')):.0f} s "
                f"expected training), before bf16 and fp32 were compared at {shape})")
    if decision.get("choice") == "bf16":
        return f"bf16 chosen: {speedup:.2f}x faster than fp32 at {shape}{cached}"
    return f"fp32 (bf16 {speedup:.2f}x, below {decision.get('threshold', THRESHOLD):g}x) at {shape}{cached}"
