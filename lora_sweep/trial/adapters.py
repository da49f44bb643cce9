"""LoRA adapters: target-module presets resolved per architecture, LoraConfig, peft's counts."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from torch import nn

from lora_sweep.config import ConfigError, LoraSettings

# Roles by the last part of a module's name, across BERT, DistilBERT, LLaMA/Mistral/Qwen, T5, GPT-2.
_ROLES = {
    "q": ("query", "q_lin", "q_proj", "q"),
    "k": ("key", "k_lin", "k_proj", "k"),
    "v": ("value", "v_lin", "v_proj", "v"),
    "o": ("out_lin", "o_proj", "out_proj", "o", "attention.output.dense", "attn.c_proj"),
    "mlp": ("intermediate.dense", "output.dense", "lin1", "lin2", "gate_proj", "up_proj", "down_proj",
            "fc1", "fc2", "wi", "wo", "wi_0", "wi_1", "mlp.c_fc", "mlp.c_proj"),
}
PRESETS = {
    "query": ("q",),
    "qv": ("q", "v"),
    "qkv": ("q", "k", "v"),
    "qkvo": ("q", "k", "v", "o"),
    "mlp": ("mlp",),
    "all-linear": None,  # every Linear layer but the task head
}
# Task heads: trained in full through peft's modules_to_save, never given LoRA.
_HEADS = ("classifier", "score", "pre_classifier", "lm_head", "qa_outputs")
_LAYER = re.compile(r"\.\d+\.(.+)$")


def linear_modules(model: nn.Module) -> dict[str, str]:
    """Full name -> name within its transformer block, for every Linear layer outside the head."""
    from transformers.pytorch_utils import Conv1D

    linear_types = (nn.Linear, Conv1D)
    try:
        import bitsandbytes as bnb  # noqa: F401  (only present for QLoRA)

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, linear_types) and name.split(".")[0] not in _HEADS:
            m = _LAYER.search(name)
            out[name] = m.group(1) if m else name
    return out


def role(relative: str) -> str | None:
    # Longest, most specific patterns first: "attention.output.dense" before "output.dense".
    for role, patterns in sorted(_ROLES.items(), key=lambda kv: kv[0] != "o"):
        for p in patterns:
            if relative == p or relative.endswith("." + p):
                return role
    return None


@dataclass(frozen=True)
class Targets:
    modules: tuple[str, ...]   # passed to peft: full module names (exact matches)
    names: tuple[str, ...]     # distinct names within a block, for humans and MLflow params


def resolve_targets(target_modules, model: nn.Module) -> Targets:
    """A preset or list of names -> the model's actual modules; a clear error if none match."""
    linears = linear_modules(model)
    kind = type(model).__name__
    available = sorted(set(linears.values()))
    if isinstance(target_modules, str) and target_modules in PRESETS:
        roles = PRESETS[target_modules]
        chosen = [n for n, rel in linears.items() if roles is None or role(rel) in roles]
        if not chosen:
            raise ConfigError(
                f"lora.target_modules={target_modules!r} found no matching layers in {kind}. Its Linear "
                f"modules are: {', '.join(available)}. Give lora.target_modules as a list of these names.")
    else:
        wanted = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
        chosen = []
        for w in wanted:
            hits = [n for n in linears if n == w or n.endswith("." + w)]
            if not hits:
                raise ConfigError(
                    f"lora.target_modules: {w!r} is not a Linear module of {kind}. Its Linear modules are: "
                    f"{', '.join(available)}; presets: {', '.join(PRESETS)}.")
            chosen += [h for h in hits if h not in chosen]
    names = tuple(dict.fromkeys(linears[n] for n in chosen))
    return Targets(modules=tuple(chosen), names=names)


def lora_config(settings: LoraSettings, targets: Targets):
    from peft import LoraConfig

    return LoraConfig(**settings.peft_kwargs(), target_modules=list(targets.modules))


def apply_lora(model: nn.Module, settings: LoraSettings, *, quantized: bool = False):
    """Wrap `model` with a LoRA adapter; returns (peft model, Targets)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    targets = resolve_targets(settings.target_modules, model)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(settings, targets)), targets


def check_lora(settings: LoraSettings, model: nn.Module, varied=()) -> None:
    """peft's own verdict on these settings, before any trial: the LoraConfig a trial builds, applied
    by peft to a copy of one module it targets (an init_lora_weights peft does not know fails only when
    applied), and a ConfigError naming the field if peft rejects it. One module keeps the check cheap
    for any model size; running out of memory is left to the trial, which records it. varied: the
    parameter paths this point of the space sets, the first suspects."""
    import copy

    import peft

    targets = resolve_targets(settings.target_modules, model)
    one = nn.Module()
    one.add_module("target", copy.deepcopy(model.get_submodule(targets.modules[0])))
    try:
        peft.inject_adapter_in_model(lora_config(settings, Targets(modules=("target",), names=())), one)
    except (ValueError, TypeError, NotImplementedError, KeyError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        field = _culprit(settings, varied, reason)
        value = getattr(settings, field.split(".", 1)[1])
        shown = str(value).lower() if isinstance(value, bool) else value
        raise ConfigError(f"{field}={shown}: peft {peft.__version__} rejects it ({reason}); "
                          f"{_allowed(field)}") from None
    except (RuntimeError, MemoryError):
        pass  # out of memory for this rank: a run-time failure the trial records, not a bad value


def _culprit(settings: LoraSettings, varied, reason: str) -> str:
    """The lora.* field to blame: the one this point of the space varies, else the first that
    peft's message names (by field name, then by value), else lora.init_lora_weights."""
    from dataclasses import fields

    names = [f.name for f in fields(settings)]
    lora_varied = [p for p in varied if p.startswith("lora.") and p.split(".", 1)[1] in names]
    if len(lora_varied) == 1:
        return lora_varied[0]
    text = reason.lower()
    named = sorted((text.find(n.lower()), n) for n in names if n.lower() in text)
    if named:
        return f"lora.{named[0][1]}"
    by_value = [n for n in names if isinstance(getattr(settings, n), str) and getattr(settings, n).lower() in text]
    return f"lora.{(by_value or ['init_lora_weights'])[0]}"


def _allowed(field: str) -> str:
    """What peft's LoraConfig declares for the field (its Literal values), or where to look."""
    import dataclasses

    from peft import LoraConfig

    declared = {f.name: str(f.type) for f in dataclasses.fields(LoraConfig)}.get(field.split(".", 1)[1], "")
    values = re.findall(r"'([^']+)'", declared) if "Literal" in declared else []
    if values:
        head = "true, false, " if "bool" in declared else ""
        return f"allowed: {head}{', '.join(values)} (peft's LoraConfig)"
    return f"see peft's LoraConfig for what {field.split('.', 1)[1]} accepts, or change this value"


def parameter_counts(peft_model) -> tuple[int, int]:
    """(trainable, total) as peft counts them: 4-bit packed weights count at their real size."""
    return peft_model.get_nb_trainable_parameters()


def rank_cost(lora: LoraSettings, model: nn.Module) -> tuple[int, int]:
    """(LoRA parameters per unit of r, those independent of r) over the modules lora.target_modules
    resolves to: A is r x in and B is out x r per module; DoRA adds one magnitude per output feature."""
    per_rank = fixed = 0
    for name in resolve_targets(lora.target_modules, model).modules:
        module = model.get_submodule(name)
        # nn.Linear (and bitsandbytes' subclasses) name their sizes; transformers' Conv1D holds (in, out) weights
        n_in, n_out = ((module.in_features, module.out_features) if hasattr(module, "in_features")
                       else tuple(module.weight.shape))
        per_rank += n_in + n_out
        fixed += n_out if lora.use_dora else 0
    return per_rank, fixed


def apply_budget(lora: LoraSettings, model: nn.Module) -> LoraSettings:
    """A copy of `lora` whose r is the largest rank whose LoRA parameters fit lora.param_budget on this
    model (lora_alpha follows through alpha_ratio); `lora` itself when it has no budget."""
    if lora.param_budget is None:
        return lora
    per_rank, fixed = rank_cost(lora, model)
    r = (lora.param_budget - fixed) // per_rank
    if r < 1:
        raise ConfigError(
            f"lora.param_budget={lora.param_budget} gives r={max(r, 0)} for lora.target_modules={lora.target_modules!r} on "
            f"{type(model).__name__}: one rank there costs {per_rank + fixed:,} LoRA parameters. Allowed: an "
            f"integer >= {per_rank + fixed} for these modules (or fewer target modules).")
    return replace(lora, r=int(r))


def lora_parameter_count(peft_model: nn.Module) -> int:
    """Trainable LoRA weights alone (lora_A, lora_B, DoRA's magnitudes): no head, no bias."""
    return sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n)
