"""Dropout whose random mask is cheap on a CPU: same distribution as nn.Dropout, a fifth of the cost.

Why: profiling a MiniLM LoRA training step on the CPU (torch.profiler, 20 steps of r=16 q/k/v/o,
batch 32) put 25% of all CPU time in `aten::bernoulli_`, the mask draw of nn.Dropout: torch's CPU
generator is a single mt19937 stream, drawn serially at about 4 ns per element, as costly as the
matmul the mask sits next to. A LoRA model draws many masks: BERT's own hidden dropouts plus one
per adapted module (peft's `lora_dropout`, applied to the module's input).

FastDropout draws the mask from numpy's SFC64 bit generator instead (32 random bits per element,
about 1 ns), compares against round(p * 2**32) (a keep probability exact to 2**-32, finer than
torch's 24-bit float uniforms), and scales the kept values by 1/(1-p), as nn.Dropout does. Each
mask's seed is drawn from torch's default generator, so `transformers.set_seed` makes the masks,
and the trial, reproducible, and activation checkpointing (which restores torch's RNG state) redraws
the same mask. The backward pass keeps a 1-byte mask, as torch's dropout does, so peak memory is
unchanged. The masks differ from torch's bit for bit, not in distribution: `lora_sweep.bench`
shows accuracy equal to the plain Trainer script within noise.

Only CPU tensors take this path; CUDA's Philox dropout is already fast. `train.fast_dropout=false`
keeps torch's own dropout everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _keep_mask(numel: int, p: float) -> np.ndarray:
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # torch's stream: set_seed governs it
    bits = np.random.SFC64(seed).random_raw((numel + 1) // 2).view(np.uint32)[:numel]
    return bits >= np.uint32(min(round(p * 2**32), 2**32 - 1))


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: np.ndarray, scale: float) -> torch.Tensor:
        ctx.keep, ctx.scale, ctx.shape = keep, scale, x.shape
        return x * _scaled(keep, scale, x.shape, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * _scaled(ctx.keep, ctx.scale, ctx.shape, grad.dtype), None, None


def _scaled(keep: np.ndarray, scale: float, shape, dtype: torch.dtype) -> torch.Tensor:
    # numpy's bool -> float32 is vectorized (~0.05 ms for 0.5M elements); torch's is 6x slower
    mask = keep.astype(np.float32)
    mask *= np.float32(scale)
    out = torch.from_numpy(mask).view(shape)
    return out if dtype == torch.float32 else out.to(dtype)


class FastDropout(nn.Dropout):
    """nn.Dropout with a cheap CPU mask (see the module docstring). Same `p`, same train/eval
    behaviour; tensors on other devices go through nn.Dropout unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p >= 1.0 or self.inplace:
            return super().forward(x)
        return _MaskedScale.apply(x, _keep_mask(x.numel(), self.p), 1.0 / (1.0 - self.p))


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every nn.Dropout with p > 0 in `model` (its own and peft's lora_dropout) for a
    FastDropout of the same p, in place. Returns how many were swapped."""
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                fast = FastDropout(child.p, inplace=child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped += 1
    return swapped
