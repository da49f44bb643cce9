"""Memory a trial needs: predicted from shapes before it trains, measured over one training step.

predict() adds up, from the model's parameters and config and the trial's settings: the weights at
their dtype (4-bit packed where quantized), the trainable parameters (LoRA, DoRA magnitudes, a
classifier head's trained copy, trained biases) with their gradients and AdamW's two states, the
activations a training step keeps for its backward pass at the trial's largest batch shape plus
the gradients its backward pass holds at once, and the eval batch's forward pass. Activations
follow the two layouts measured (reports/memory): an encoder (BERT: post-norm, GELU, eager
attention on a CPU) and a decoder (LLaMA: pre-RMSNorm, gated SiLU, SDPA, a vocabulary-wide loss).

measure() is what the prediction is held to on a CPU (whose torch build keeps no allocator
statistics): the peak of live tensor bytes over one optimizer step at the largest training batch,
then over one forward pass at the largest eval batch, counted by a TorchDispatchMode that follows
every tensor storage an op creates until it is freed. A trial runs it outside its timed epoch, and
it leaves the weights, gradients, training mode and random state as it found them.
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


def measure(model, batch: dict, eval_batch: dict | None = None, learning_rate: float = 1e-3,
            weight_decay: float = 0.0, autocast_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """MB: (the peak of live tensor bytes over one AdamW step of `model` (a peft model) on `batch`, and
    over one evaluation forward pass on `eval_batch` right after it, 0 without one), with the
    optimizer's moments there as in every step after the first. Trainable weights, gradients, the
    training mode and every random generator are restored afterwards: the trial trains as if this had
    not run. autocast_dtype: the half precision the Trainer's forward passes run in (mixed precision)."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    was_training = model.training
    model.train()  # as the Trainer will: dropout keeps its masks and dropped copies
    on = params[0].device if params else torch.device("cpu")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    evaluation = LiveTensors()
    with torch.random.fork_rng(devices=[on] if on.type == "cuda" else []):
        for p in params:  # AdamW's moments exist before the measured step, as they do in training
            p.grad = torch.zeros_like(p)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        step = _tracking(model, batch, optimizer)
        with step, _autocast(on, autocast_dtype):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
            del loss
        if eval_batch is not None:  # the Trainer evaluates with the optimizer's state still held
            model.eval()
            evaluation = _tracking(model, eval_batch, optimizer)
            with torch.no_grad(), evaluation, _autocast(on, autocast_dtype):
                out = model(**eval_batch)
                del out
    with torch.no_grad():
        for p, before in zip(params, saved):
            p.copy_(before)
    model.train(was_training)
    del optimizer
    return step.peak / MB, evaluation.peak / MB


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _tracking(model, batch: dict, optimizer) -> LiveTensors:
    live = LiveTensors()
    for t in (*model.parameters(), *model.buffers(), *batch.values(),
              *(v for state in optimizer.state.values() for v in state.values())):
        live.track(t)
    return live


def largest_batch(dataset, collate, size: int) -> dict:
    """The collated `size` longest training examples: the trial's largest batch shape under dynamic
    padding (model inputs only)."""
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
    lengths = [len(ids) for ids in dataset["input_ids"]]
    longest = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:size]
    return collate([{k: v for k, v in dataset[i].items() if k in keys} for i in longest])


@dataclass(frozen=True)
class Prediction:
    """A trial's predicted peak, in MB, by part; peak_mb is what a cap or a GPU is held to."""
    weights_mb: float       # the base model's parameters and buffers, at their dtype (4-bit packed: NF4)
    trainable_mb: float     # trainable parameters with their gradients and AdamW's two moments
    activations_mb: float   # kept for the backward pass at the largest batch, plus what backward holds at once
    eval_mb: float          # the eval batch's forward pass beyond the weights
    layout: str             # encoder | decoder: whose activation layout was assumed
    batch: tuple[int, int]  # the largest training batch: examples x tokens
    eval_batch: tuple[int, int]

    @property
    def step_mb(self) -> float:
        return self.weights_mb + self.trainable_mb + self.activations_mb

    @property
    def eval_peak_mb(self) -> float:  # the gradients are gone by then (set to None), the moments stay
        return self.weights_mb + 0.75 * self.trainable_mb + self.eval_mb

    @property
    def peak_mb(self) -> float:
        return max(self.step_mb, self.eval_peak_mb)


def predict(model, settings, targets, batch: tuple[int, int], eval_batch: tuple[int, int], device: str,
            precision: str = "fp32") -> Prediction:
    """The peak a trial with `settings` (a TrialSettings within its budget) needs on `device`, from the
    base `model` (not yet wrapped; real or on the meta device), the modules `targets` names
    (adapters.Targets) and its largest training and eval batch shapes."""
    from lora_sweep.trial import adapters

    quantized = bool(settings.model.load_in_4bit)
    linear_weights = {id(model.get_submodule(name).weight) for name in adapters.linear_modules(model)}
    weights = sum(_stored_bytes(p, quantized and id(p) in linear_weights) for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    per_rank, fixed = adapters.rank_cost(settings.lora, model)
    copied = per_rank * settings.lora.r + fixed + _head_params(model, settings.lora.task_type)
    in_place = _trained_biases(model, settings.lora.bias, targets.modules)
    trainable = 4 * (4 * copied + 3 * in_place)  # fp32: the weight (a copy only), gradient, two moments
    act = 4 if precision == "fp32" else 2      # autocast keeps matmul outputs in half precision
    layout = "decoder" if settings.lora.task_type == "CAUSAL_LM" else "encoder"
    train, evaluation = _activations(model, settings, targets, batch, eval_batch, device, act, layout)
    if precision != "fp32":  # autocast's half-precision copy of each fp32 matmul weight, kept for backward
        train += sum(2 * model.get_submodule(n).weight.numel() for n in adapters.linear_modules(model)
                     if model.get_submodule(n).weight.element_size() == 4)
    return Prediction(weights / MB, trainable / MB, train / MB, evaluation / MB, layout, tuple(batch),
                      tuple(eval_batch))


def _stored_bytes(p, packed: bool) -> int:
    # NF4: two weights a byte; double quantization: one 8-bit absmax per 64 weights (+ fp32 per 256 blocks)
    return p.numel() // 2 + p.numel() // 64 + p.numel() // (64 * 256) * 4 if packed else p.numel() * p.element_size()


def _head_params(model, task_type: str) -> int:
    """A classifier head peft trains as a full copy (modules_to_save), its original kept beside it."""
    if task_type != "SEQ_CLS":
        return 0
    return sum(p.numel() for name, module in model.named_children() if name in ("classifier", "score")
               for p in module.parameters())


def _trained_biases(model, bias: str, modules: tuple) -> int:
    if bias == "all":
        return sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    if bias == "lora_only":
        return sum(getattr(model.get_submodule(m), "bias", None).numel() for m in modules
                   if getattr(model.get_submodule(m), "bias", None) is not None)
    return 0


def _activations(model, settings, targets, batch, eval_batch, device: str, act: int, layout: str) -> tuple[int, int]:
    """Bytes kept for backward (plus backward's own largest transient), and the eval forward's transient."""
    cfg = model.config
    b, length = batch
    tokens, eval_tokens = b * length, eval_batch[0] * eval_batch[1]
    h = _dim(cfg, "hidden_size", "d_model", "n_embd", "dim")
    layers = _dim(cfg, "num_hidden_layers", "n_layer", "n_layers") or (
        _dim(cfg, "num_layers") + (_dim(cfg, "num_decoder_layers") or 0))  # T5: encoder and decoder stacks
    heads = _dim(cfg, "num_attention_heads", "num_heads", "n_head", "n_heads")
    ffn = _dim(cfg, "intermediate_size", "d_ff", "n_inner", "hidden_dim") or 4 * h
    torch_dropout = device != "cpu" or not settings.train.fast_dropout  # keeps a one-byte mask per element
    kept = 0
    if layout == "encoder":
        p_attn = float(getattr(cfg, "attention_probs_dropout_prob", 0.0) or 0.0)
        if device == "cpu":  # eager attention: the probabilities (and their dropped copy) are kept
            scores = tokens * heads * length
            attention = scores * act * (1 + (p_attn > 0)) + (scores if p_attn > 0 and torch_dropout else 0)
            transient = 2 * scores * 4
        else:  # SDPA's fused kernels keep the output and a log-sum-exp per query instead
            attention = tokens * h * act + tokens * heads * 4
            transient = 2 * tokens * ffn * act
        per_layer = 3 * tokens * h * act + tokens * ffn * act + 2 * tokens * h * 4 + attention
        kept = layers * per_layer + tokens * h * 4  # + the embeddings' norm input
        eval_scores = eval_tokens * heads * eval_batch[1] * act if device == "cpu" else 0
        evaluation = 2 * max(eval_scores, eval_tokens * ffn * act) + 2 * eval_tokens * h * 4
    else:
        kv = _dim(cfg, "num_key_value_heads") or heads
        head_dim = _dim(cfg, "head_dim") or h // heads
        vocab = cfg.vocab_size
        per_layer = 2 * tokens * h * 4 + (2 * tokens * h + 2 * tokens * kv * head_dim) * act + 3 * tokens * ffn * act
        kept = layers * per_layer + tokens * h * 4 + tokens * vocab * 4  # final norm, log-softmax over the vocabulary
        transient = 2 * tokens * vocab * 4                                # its gradient and the logits'
        evaluation = 2 * eval_tokens * vocab * 4 + 2 * eval_tokens * ffn * act
        evaluation += eval_tokens * vocab * act if act != 4 else 0  # half-precision logits beside their fp32 copy
    kept += _lora_kept(model, settings.lora, targets.modules, tokens, act, torch_dropout)
    widest = max((_features(model.get_submodule(m))[1] for m in targets.modules), default=0)
    # an adapter's output before it is added to its layer's (under autocast also in the layer's dtype)
    evaluation += eval_tokens * widest * act * (1 if act == 4 else 2)
    return kept + transient, evaluation


def _dim(cfg, *names) -> int:
    """The first of these config attributes the model's config sets (families name their sizes differently)."""
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def _features(module) -> tuple[int, int]:
    """(in, out) of a Linear, or of transformers' Conv1D (whose weight is in x out)."""
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)


def _lora_kept(model, lora, modules: tuple, tokens: int, act: int, torch_dropout: bool) -> int:
    """What each adapted module keeps: its (dropped-out) input for lora_A's gradient, once per shared
    input without dropout, and lora_A's output for lora_B's."""
    from lora_sweep.trial import adapters

    linears = adapters.linear_modules(model)
    kept, inputs = 0, set()
    for name in modules:
        n_in = _features(model.get_submodule(name))[0]
        if lora.lora_dropout > 0:
            kept += tokens * n_in * act + (tokens * n_in if torch_dropout else 0)
        else:
            role = adapters.role(linears.get(name, name))
            source = (name.rsplit(".", 2)[0], "qkv" if role in ("q", "k", "v") else role, n_in)
            if source not in inputs:
                inputs.add(source)
                kept += tokens * n_in * act
        kept += tokens * lora.r * act
    return kept

