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
the same mask. The backward pass keeps the 1-byte mask. torch's dropout on a CPU keeps its float
noise tensor instead (4 bytes an element; only its fused CUDA kernel keeps a bool mask), so peak
memory is lower with these masks: one r=16 MiniLM epoch, 1807 MB against 2082 MB with
train.fast_dropout=false. The masks differ from torch's bit for bit, not in distribution (keep
rate and independence checked); given torch's own bits, a swapped model trains exactly as the
original (test_dropout.py). Mean accuracy, MiniLM rank sweep: r=8 over seeds 42-44, 86.5% against
86.1% with torch's masks; r=16 over seeds 42-70, 86.9% against 87.1% (paired t = 1.2, 16 of 29
seeds lower, 12 higher; README, "Accuracy over seeds").

Attention-probability dropout does not go through an nn.Dropout module: transformers passes its p to
the attention function, and on a CPU torch's SDPA then takes its math path and draws the mask with
bernoulli_ (measured here: 7% of a MiniLM step at 60 tokens, ~50 ms a step). `use_fast_dropout`
therefore also switches a model from "sdpa" to ATTENTION, registered through transformers'
AttentionInterface: the same math with FastDropout's mask in training on a CPU, and transformers'
own SDPA function, unchanged, everywhere else (evaluation, GPUs, p = 0, causal masks left to SDPA).

Only CPU tensors take these paths; CUDA's Philox dropout is already fast. `train.fast_dropout=false`
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


ATTENTION = "lora_sweep_sdpa"
# Arguments of transformers' SDPA function that the fast path does not implement: SDPA handles them.
_SDPA_ONLY = ("softcap", "position_bias", "cache", "sliding_window", "s_aux", "is_causal")


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    """transformers' attention-function signature (q, k, v: batch x heads x length x head_dim).
    Training with dropout on a CPU: softmax(q k^T * scaling + mask) with FastDropout's mask, then
    times v, which is what SDPA's math path computes there. Anything else: transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (module.training and dropout > 0.0 and query.device.type == "cpu"
             and key.shape[1] == query.shape[1]  # grouped-query attention: SDPA repeats the heads
             and not (attention_mask is None and getattr(module, "is_causal", False))
             and all(kwargs.get(k) is None for k in _SDPA_ONLY))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:  # SDPA's masks: bool (True = attend) or additive floats
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    probs = _MaskedScale.apply(probs, _keep_mask(probs.numel(), dropout), 1.0 / (1.0 - dropout))
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _attention_dropout(config) -> float:
    """The attention-probability dropout a transformers config declares, under its family's name."""
    names = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")  # BERT, LLaMA/DistilBERT, GPT-2
    return max((float(getattr(config, n)) for n in names if isinstance(getattr(config, n, None), (int, float))),
               default=0.0)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, attention)
    # transformers builds the mask each implementation expects: ours takes SDPA's.
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every nn.Dropout with p > 0 in `model` (its own and peft's lora_dropout) for a
    FastDropout of the same p, in place, and move a transformers model that attends with "sdpa"
    to ATTENTION (its attention-probability dropout). Returns how many modules were swapped."""
    from transformers import PreTrainedModel

    pretrained = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if (pretrained is not None and pretrained.config._attn_implementation == "sdpa"
            and _attention_dropout(pretrained.config) > 0):  # otherwise ATTENTION would only call SDPA
        _register_attention()
        pretrained.set_attn_implementation(ATTENTION)
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                fast = FastDropout(child.p, inplace=child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped += 1
    return swapped
