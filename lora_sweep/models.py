"""Base models and tokenizers: loaded once per worker, copied per trial.

`get_peft_model` mutates the model it wraps, and bias="all"/"lora_only" or a classifier head train
base weights. Each trial therefore gets a deep copy of the pristine base (a MiniLM copy takes ~50 ms),
so nothing a trial trains can leak into the next one.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from lora_sweep.config import ConfigError, ModelConfig, resolve_path

log = logging.getLogger(__name__)


class TrialError(RuntimeError):
    """A trial that cannot run in this environment (recorded as a failed trial, with this reason)."""


@dataclass
class BaseModel:
    model: nn.Module
    tokenizer: object
    config: ModelConfig
    labels: tuple


_CACHE: dict[tuple, BaseModel] = {}


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible (torch.cuda.is_available() is "
                          "False). Use train.device=auto or cpu.")
    return requested


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_path(config.name_or_path)
    tok = AutoTokenizer.from_pretrained(path, revision=config.revision, trust_remote_code=config.trust_remote_code)
    if tok.pad_token is None:  # LLaMA-style tokenizers ship without one; batching needs one
        tok.pad_token = tok.eos_token
    return tok


def load_base(config: ModelConfig, labels: tuple, seed: int) -> BaseModel:
    """The pristine base model for (config, labels), loaded at most once per process."""
    key = (config, labels, seed)
    if key in _CACHE:
        return _CACHE[key]
    from transformers import AutoModelForSequenceClassification, set_seed

    if config.load_in_4bit and not torch.cuda.is_available():
        raise TrialError("QLoRA (model.load_in_4bit=true) needs a CUDA GPU: bitsandbytes' 4-bit layers "
                         "fail on CPU (bitsandbytes 0.50, fix_4bit_weight_quant_state_from_module). "
                         "Run this trial on a GPU machine, or set model.load_in_4bit=false.")
    path = resolve_path(config.name_or_path)
    kwargs = {}
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=config.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=getattr(torch, config.bnb_4bit_compute_dtype),
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": 0}
    log.info("Loading base model %s (%d labels)", config.name_or_path, len(labels))
    set_seed(seed)  # the freshly initialised classifier head is the same in every process
    tokenizer = load_tokenizer(config)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)}, revision=config.revision,
        trust_remote_code=config.trust_remote_code, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    base = BaseModel(model=model, tokenizer=tokenizer, config=config, labels=labels)
    if not config.load_in_4bit:  # quantized weights do not deep-copy; those are reloaded per trial
        _CACHE[key] = base
    return base


def fresh_copy(base: BaseModel) -> nn.Module:
    if base.config.load_in_4bit:
        return base.model  # loaded for this trial only (see load_base)
    return copy.deepcopy(base.model)


def clear_cache() -> None:
    _CACHE.clear()
