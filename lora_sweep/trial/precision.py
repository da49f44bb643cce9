"""Which precision `train.mixed_precision=auto` trains in on a CPU: bf16 only where it measured faster.

Whether bf16 pays on a CPU depends on the CPU (AMX, AVX512-BF16, or emulated) and on the model's
shapes, not on its flags alone, so it is timed: training steps (forward + backward) of the trial's
own model with its LoRA adapter on one padded batch of per_device_train_batch_size x data.max_length,
in fp32 and under bf16 autocast. lora_sweep.run.sweep times it once a study and stores the decision
on it (lora_sweep.record.precision), so every worker, resume and report uses the same precision.
"""

from __future__ import annotations

import time

from lora_sweep.config import TrialSettings
from lora_sweep.trial.environment import cpu_has_native_bf16

THRESHOLD = 1.3  # bf16 must be this much faster: below it, fp32's exact arithmetic is worth the time


def time_steps(settings: TrialSettings, repeats: int = 3) -> tuple[float, float]:
    """(fp32 seconds, bf16 seconds) of one training step at the trial's batch shape: best of
    `repeats`, interleaved, after one warm-up step each (a shared CPU slows one side less so)."""
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
    shape = (settings.train.per_device_train_batch_size, settings.data.max_length)
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

    step(False), step(True)
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        best[0] = min(best[0], step(False))
        best[1] = min(best[1], step(True))
    return best[0], best[1]


def decide(settings: TrialSettings) -> dict:
    """Time bf16 against fp32 for these settings and choose: bf16 only at >= THRESHOLD x faster."""
    shape = f"{settings.train.per_device_train_batch_size}x{settings.data.max_length}"
    if not cpu_has_native_bf16():  # emulated bf16 ran a MiniLM step 11x slower: not worth minutes of timing
        return {"choice": "fp32", "emulated": True, "threshold": THRESHOLD, "shape": shape}
    fp32_s, bf16_s = time_steps(settings)
    speedup = fp32_s / bf16_s
    return {"choice": "bf16" if speedup >= THRESHOLD else "fp32", "fp32_s": round(fp32_s, 4),
            "bf16_s": round(bf16_s, 4), "speedup": round(speedup, 3), "threshold": THRESHOLD, "shape": shape}


def mixed_precision_value(decision: dict) -> str:
    """The train.mixed_precision value a stored decision stands for."""
    return "bf16" if decision.get("choice") == "bf16" else "no"


def describe(decision: dict) -> str:
    """One line: 'bf16 chosen: 1.7x faster than fp32 at 32x128' or 'fp32 (bf16 1.1x, below 1.3x) at 32x128'."""
    speedup, shape = decision.get("speedup", float("nan")), decision.get("shape", "?")
    if decision.get("emulated"):
        return "fp32 (bf16 is emulated on this CPU: no AVX512-BF16 or AMX; not timed)"
    if decision.get("choice") == "bf16":
        return f"bf16 chosen: {speedup:.2f}x faster than fp32 at {shape}"
    return f"fp32 (bf16 {speedup:.2f}x, below {decision.get('threshold', THRESHOLD):g}x) at {shape}"
