"""FLOP accounting for the benchmark: what training computed, and what this machine's matmul peak is.

Training FLOPs are counted by torch's own FlopCounterMode (matmuls, attention; elementwise ops are not
counted, as in the usual MFU definition) on a forward+backward of single sequences, fitted to an exact
polynomial in the sequence length, and summed over the padded batch shapes the trial really trained on
(recorded by lora_sweep.trial.train).
"""

from __future__ import annotations

import torch

from lora_sweep.config import TrialSettings, resolve_path
from lora_sweep.trial.environment import matmul_gflops


def matmul_peak_gflops(n: int = 2048, repeats: int = 8, dtype: torch.dtype = torch.float32,
                       device: str = "cpu") -> float:
    """The dense matmul peak of the device the sweep trains on: an n x n x n torch.mm (see matmul_gflops)."""
    return matmul_gflops(n, n, n, dtype, repeats, device=device)


def _model(settings: TrialSettings, num_labels: int, device: str):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lora_sweep.trial.adapters import apply_lora

    config = AutoConfig.from_pretrained(resolve_path(settings.model.name_or_path), num_labels=num_labels)
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(config)
    peft_model, _ = apply_lora(model, settings.lora)
    peft_model.train()
    return peft_model


def _step_flops(model, batch: int, length: int, device: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.ones(batch, length, dtype=torch.long, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def per_sequence_flops(settings: TrialSettings, num_labels: int = 2) -> tuple[float, float, float]:
    """(c0, c1, c2) with FLOPs of one sequence of length L = c0 + c1*L + c2*L**2, exactly: linear layers
    grow with L, attention scores with L**2, the pooler/head not at all. Fitted from three counted
    single-sequence steps on the CPU (the meta device cannot run transformers' mask checks)."""
    model = _model(settings, num_labels, "cpu")
    ls = (8, 16, 32)
    f = [_step_flops(model, 1, length, "cpu") for length in ls]
    # Second differences give c2 exactly for equally spaced points in L**2's sense; solve the 3x3 system.
    import numpy as np

    a = np.array([[1.0, length, length**2] for length in ls])
    return tuple(float(x) for x in np.linalg.solve(a, np.array(f, dtype=float)))


def training_flops(coeffs: tuple[float, float, float], batch_shapes: dict[str, int]) -> float:
    """Total training FLOPs of a trial from its recorded batch shapes ("BxL" -> count)."""
    c0, c1, c2 = coeffs
    total = 0.0
    for key, n in batch_shapes.items():
        b, length = (int(x) for x in key.split("x"))
        total += n * b * (c0 + c1 * length + c2 * length**2)
    return total
