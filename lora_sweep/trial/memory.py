"""Memory a trial needs: predicted from shapes before it trains, measured over one training step.

predict() adds up, from the model's parameters and config and the trial's settings: the weights at
their dtype (4-bit packed where quantized), the trainable parameters (LoRA, DoRA magnitudes, a
classifier head's trained copy, trained biases) with their gradients and AdamW's two states, the
activations a training step keeps for its backward pass at the trial's largest batch shape plus
the gradients its backward pass holds at once, and the eval batch's forward pass. Activations
follow the two layouts measured (reports/memory): an encoder (BERT: post-norm, GELU, eager
attention on a CPU) and a decoder (LLaMA: pre-RMSNorm, gated SiLU, SDPA, a vocabulary-wide loss).

measure_step() is what the prediction is held to on a CPU (whose torch build keeps no allocator
statistics): the peak of live tensor bytes over one optimizer step at the largest batch shape,
counted by a TorchDispatchMode that follows every tensor storage an op creates until it is freed.
It runs outside the timed epoch and leaves the weights, gradients and random state as it found them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MB = 2**20


class LiveTensors(TorchDispatchMode):
    """with LiveTensors() as live: ...  ->  live.peak (bytes): the most tensor storage alive at once,
    counting the storages registered with track() before entering and every one an op creates inside."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def track(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        known = self._refs.get(key)
        if known is not None and known() is storage:
            return
        size = storage.nbytes()

        def freed(_, key=key, size=size) -> None:
            if self._refs.pop(key, None) is not None:
                self.now -= size

        self._refs[key] = weakref.ref(storage, freed)  # a storage's Python object lives as long as it does
        self.now += size
        self.peak = max(self.peak, self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            self.track(leaf)
        return out
