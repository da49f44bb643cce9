"""Dropout whose random mask is cheap on a CPU: same distribution as nn.Dropout, a fifth of the cost.

Why: torch's CPU mask draw (`aten::bernoulli_`, one serial mt19937 stream) costs as much as the
matmul the mask sits next to, and a LoRA model draws many masks (measurements: reports/bench/README.md).

FastDropout draws the mask from numpy's SFC64 bit generator instead (32 random bits per element),
compares against round(p * 2**32) (a keep probability exact to 2**-32, finer than torch's 24-bit
float uniforms), and scales the kept values by 1/(1-p), as nn.Dropout does. Each mask's seed is
drawn from torch's default generator, so `transformers.set_seed` makes the masks, and the trial,
reproducible, and activation checkpointing (which restores torch's RNG state) redraws the same mask.
The backward pass keeps the 1-byte mask, where torch's CPU dropout keeps a 4-byte noise tensor, so
peak memory is lower. The masks differ from torch's bit for bit, not in distribution (keep rate and
independence checked); given torch's own bits, a swapped model trains exactly as the original
(test_dropout.py).

Attention-probability dropout does not go through an nn.Dropout module: transformers passes its p to
the attention function, and on a CPU torch's SDPA then takes its math path and draws the mask with
bernoulli_, the same serial draw. With train.fast_attention (the default), `use_fast_dropout`
therefore also switches a model from "sdpa" to ATTENTION, registered through transformers'
AttentionInterface: the same math with FastDropout's mask in training on a CPU, and transformers'
own SDPA function everywhere else (evaluation, GPUs, p = 0, causal masks, and any argument the fast
path does not take).

Only CPU tensors take these paths; CUDA's Philox dropout is already fast. `train.fast_dropout=false`
keeps torch's own dropout everywhere; `train.fast_attention=false` keeps SDPA's attention dropout.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

log = logging.getLogger("lora_sweep")


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
# The only keyword arguments the fast path takes with a value: ones transformers' SDPA function never
# reads, so ignoring them computes what SDPA computes (the Trainer passes num_items_in_batch down to
# every layer). Any other argument that is not None (is_causal, position_bias, softcap,
# sliding_window, output_attentions, one a later transformers adds) goes to SDPA.
_UNREAD_BY_SDPA = frozenset({"num_items_in_batch", "position_ids", "encoder_hidden_states", "output_hidden_states",
                             "output_router_logits", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                             "max_length_k", "seq_idx"})


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    """transformers' attention-function signature (q, k, v: batch x heads x length x head_dim).
    Training with dropout on a CPU: softmax(q k^T * scaling + mask) with FastDropout's mask, then
    times v, which is what SDPA's math path computes there. Anything else: transformers' SDPA."""
    plain = (module.training and dropout > 0.0 and query.device.type == "cpu"
             and key.shape[1] == query.shape[1]  # grouped-query attention: SDPA repeats the heads
             and not (attention_mask is None and getattr(module, "is_causal", False))
             and all(v is None for k, v in kwargs.items() if k not in _UNREAD_BY_SDPA))
    if not plain:  # the function the model had before the swap (use_fast_dropout swaps only "sdpa")
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
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


_announced = False  # the attention swap is logged once per process (once per sweep, or per worker)


def use_fast_dropout(model: nn.Module, attention: bool = True) -> int:
    """Swap every nn.Dropout with p > 0 in `model` (its own and peft's lora_dropout) for a
    FastDropout of the same p, in place, and, with `attention` (train.fast_attention), move a
    transformers model that attends with "sdpa" to ATTENTION (its attention-probability dropout).
    Returns how many modules were swapped."""
    global _announced
    from transformers import PreTrainedModel

    pretrained = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if (attention and pretrained is not None and pretrained.config._attn_implementation == "sdpa"
            and _attention_dropout(pretrained.config) > 0):  # otherwise ATTENTION would only call SDPA
        _register_attention()
        pretrained.set_attn_implementation(ATTENTION)
        if not _announced:
            _announced = True
            log.info("Attention dropout on the CPU: numpy masks through the %r attention function in place of "
                     "sdpa (train.fast_attention=false keeps sdpa)", ATTENTION)
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                fast = FastDropout(child.p, inplace=child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped += 1
    return swapped
