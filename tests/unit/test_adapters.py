"""Target-module presets resolved per architecture, and LoRA parameter counts, on tiny random models."""

from __future__ import annotations

import pytest
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from lora_sweep.trial.adapters import apply_lora, parameter_counts, resolve_targets
from lora_sweep.config import ConfigError, LoraSettings

# peft calls a transformers method that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def tiny_bert():
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2))


def tiny_distilbert():
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, num_labels=2))


def tiny_llama():
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0))


MODELS = {"bert": tiny_bert, "distilbert": tiny_distilbert, "llama": tiny_llama}

# Expected names within a block, per preset and architecture.
EXPECTED = {
    "bert": {
        "query": ["attention.self.query"],
        "qv": ["attention.self.query", "attention.self.value"],
        "qkv": ["attention.self.query", "attention.self.key", "attention.self.value"],
        "qkvo": ["attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense"],
        "mlp": ["intermediate.dense", "output.dense"],
    },
    "distilbert": {
        "query": ["attention.q_lin"],
        "qv": ["attention.q_lin", "attention.v_lin"],
        "qkv": ["attention.q_lin", "attention.k_lin", "attention.v_lin"],
        "qkvo": ["attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"],
        "mlp": ["ffn.lin1", "ffn.lin2"],
    },
    "llama": {
        "query": ["self_attn.q_proj"],
        "qv": ["self_attn.q_proj", "self_attn.v_proj"],
        "qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "qkvo": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    },
}
LAYER_PREFIX = {"bert": "bert.encoder.layer.", "distilbert": "distilbert.transformer.layer.",
                "llama": "model.layers."}
HEADS = {"bert": ("classifier",), "distilbert": ("pre_classifier", "classifier"), "llama": ("score",)}


def _linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


CASES = [(arch, preset) for arch in EXPECTED for preset in EXPECTED[arch]]


@pytest.mark.parametrize("arch, preset", CASES, ids=[f"{a}-{p}" for a, p in CASES])
def test_preset_resolves_to_exactly_these_modules(arch, preset):
    model = MODELS[arch]()
    targets = resolve_targets(preset, model)
    names = EXPECTED[arch][preset]
    assert list(targets.names) == names
    expected_modules = {f"{LAYER_PREFIX[arch]}{i}.{n}" for i in range(2) for n in names}
    assert set(targets.modules) == expected_modules
    assert len(targets.modules) == len(expected_modules)  # no duplicates
    for name in targets.modules:
        assert isinstance(model.get_submodule(name), nn.Linear)


def test_bert_qkvo_takes_the_attention_output_not_the_mlp_output():
    targets = resolve_targets("qkvo", tiny_bert())
    assert "bert.encoder.layer.0.attention.output.dense" in targets.modules
    assert "bert.encoder.layer.0.output.dense" not in targets.modules
    mlp = resolve_targets("mlp", tiny_bert())
    assert "bert.encoder.layer.0.output.dense" in mlp.modules
    assert "bert.encoder.layer.0.attention.output.dense" not in mlp.modules


@pytest.mark.parametrize("arch", MODELS)
def test_all_linear_is_every_linear_but_the_head(arch):
    model = MODELS[arch]()
    targets = resolve_targets("all-linear", model)
    heads = HEADS[arch]
    expected = {n for n in _linears(model) if n.split(".")[0] not in heads}
    assert set(targets.modules) == expected
    assert not any(n.split(".")[0] in heads for n in targets.modules)
    assert all(h in _linears(model) for h in heads)  # the heads do exist and were left out


def test_explicit_list_of_names():
    targets = resolve_targets(("query", "value"), tiny_bert())
    assert targets.names == ("attention.self.query", "attention.self.value")
    assert targets.modules == ("bert.encoder.layer.0.attention.self.query",
                               "bert.encoder.layer.1.attention.self.query",
                               "bert.encoder.layer.0.attention.self.value",
                               "bert.encoder.layer.1.attention.self.value")


def test_explicit_single_name_as_a_string():
    targets = resolve_targets("q_proj", tiny_llama())
    assert targets.modules == ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")


@pytest.mark.parametrize("arch, listed", [
    ("bert", ["attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value",
              "bert.pooler.dense", "intermediate.dense", "output.dense"]),
    ("distilbert", ["attention.k_lin", "attention.out_lin", "attention.q_lin", "attention.v_lin", "ffn.lin1",
                    "ffn.lin2"]),
    ("llama", ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
               "self_attn.q_proj", "self_attn.v_proj"]),
])
def test_unknown_name_lists_the_models_linear_modules(arch, listed):
    model = MODELS[arch]()
    with pytest.raises(ConfigError) as err:
        resolve_targets(["query", "nonexistent"] if arch == "bert" else ["nonexistent"], model)
    message = str(err.value)
    assert "lora.target_modules: 'nonexistent' is not a Linear module of" in message
    assert type(model).__name__ in message
    assert "Its Linear modules are: " + ", ".join(listed) + ";" in message
    assert "presets: query, qv, qkv, qkvo, mlp, all-linear" in message


def test_head_is_not_a_valid_target():
    with pytest.raises(ConfigError, match="'classifier' is not a Linear module"):
        resolve_targets(["classifier"], tiny_bert())


# -- parameter counts ----------------------------------------------------------------------

def _lora_params(model, modules, r):
    return sum(r * (model.get_submodule(n).in_features + model.get_submodule(n).out_features) for n in modules)


def _head_params(model, heads):
    return sum(p.numel() for h in heads for p in model.get_submodule(h).parameters())


@pytest.mark.parametrize("r", [4, 8])
@pytest.mark.parametrize("preset", ["qkvo", "query"])
def test_trainable_count_is_lora_matrices_plus_head(r, preset):
    reference = tiny_bert()  # apply_lora mutates its model: count on an untouched twin
    modules = resolve_targets(preset, reference).modules
    base_total = sum(p.numel() for p in reference.parameters())
    head = _head_params(reference, ("classifier",))
    assert head == 32 * 2 + 2
    expected = _lora_params(reference, modules, r) + head
    # by hand for the tiny BERT: every targeted Linear is 32 -> 32, two layers
    assert expected == {"qkvo": 8, "query": 2}[preset] * r * 64 + 66

    peft_model, targets = apply_lora(tiny_bert(), LoraSettings(r=r, target_modules=preset))
    trainable, total = parameter_counts(peft_model)
    assert targets.modules == modules
    assert trainable == expected
    # total: the base, the LoRA matrices and peft's trainable copy of the head
    assert total == base_total + _lora_params(reference, modules, r) + head


@pytest.mark.parametrize("arch", ["distilbert", "llama"])
def test_trainable_count_on_other_architectures(arch):
    reference = MODELS[arch]()
    modules = resolve_targets("qkvo", reference).modules
    expected = _lora_params(reference, modules, 4) + _head_params(reference, HEADS[arch])
    peft_model, _ = apply_lora(MODELS[arch](), LoraSettings(r=4, target_modules="qkvo"))
    assert parameter_counts(peft_model)[0] == expected


def test_lora_config_gets_the_effective_alpha_and_settings():
    settings = LoraSettings(r=8, lora_alpha=32, alpha_ratio=2, lora_dropout=0.05, target_modules="query")
    peft_model, targets = apply_lora(tiny_bert(), settings)
    cfg = peft_model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (8, 16, 0.05, "none")
    assert set(cfg.target_modules) == set(targets.modules)
    layer = peft_model.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.query")
    assert layer.scaling["default"] == 16 / 8
    assert layer.lora_A["default"].weight.shape == (8, 32)


def test_bias_all_also_trains_every_base_bias():
    reference = tiny_bert()
    biases = {n: p.numel() for n, p in reference.named_parameters() if n.endswith("bias")}
    # the head's bias is already trained through modules_to_save
    extra = sum(v for n, v in biases.items() if not n.startswith("classifier."))
    assert extra == sum(biases.values()) - 2

    none, _ = parameter_counts(apply_lora(tiny_bert(), LoraSettings(r=4, bias="none"))[0])
    every, _ = parameter_counts(apply_lora(tiny_bert(), LoraSettings(r=4, bias="all"))[0])
    assert every - none == extra


def test_bias_lora_only_trains_the_biases_of_adapted_layers():
    reference = tiny_bert()
    modules = resolve_targets("qkvo", reference).modules
    adapted_biases = sum(reference.get_submodule(n).bias.numel() for n in modules)
    none, _ = parameter_counts(apply_lora(tiny_bert(), LoraSettings(r=4, bias="none"))[0])
    lora_only, _ = parameter_counts(apply_lora(tiny_bert(), LoraSettings(r=4, bias="lora_only"))[0])
    assert lora_only - none == adapted_biases == 8 * 32
