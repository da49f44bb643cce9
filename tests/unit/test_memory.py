"""The memory model against the live-tensor count on tiny real models (a BERT and a LLaMA), the count
leaving the trial as it found it, and a cap below a trial's prediction pruning it before any step."""

from __future__ import annotations

import copy

import pytest
import torch
from optuna.trial import TrialState

from lora_sweep.config import from_mapping
from lora_sweep.config.schema import LoraSettings, ModelConfig, TrainConfig, TrialSettings
from lora_sweep.run.sweep import run_sweep
from lora_sweep.trial import adapters, memory
from lora_sweep.trial.dropout import use_fast_dropout
from test_trial_tiny import assets  # noqa: F401  (the tiny model and csv fixture)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches")]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128))


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128,
                                                    max_position_embeddings=128, num_labels=2))


def predicted_and_measured(base, task_type: str, r: int, b: int, length: int, targets: str = "qv",
                           precision: str = "fp32"):
    lora = LoraSettings(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.1, task_type=task_type)
    settings = TrialSettings(ModelConfig("tiny"), None, lora, TrainConfig())
    resolved = adapters.resolve_targets(targets, base)
    predicted = memory.predict(base, settings, resolved, (b, length), (b, length), "cpu", precision)
    model, _ = adapters.apply_lora(copy.deepcopy(base), lora)
    use_fast_dropout(model, attention=True)
    model.train()
    ids = torch.randint(3, 500, (b, length))
    labels = ids if task_type == "CAUSAL_LM" else torch.randint(0, 2, (b,))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    half = torch.bfloat16 if precision == "bf16" else None
    return predicted.peak_mb, max(memory.measure(model, batch, batch, autocast_dtype=half))


@pytest.mark.parametrize("family, precision", [("bert", "fp32"), ("llama", "fp32"), ("bert", "bf16"),
                                               ("llama", "bf16")])
def test_prediction_is_within_20_percent_of_the_live_tensor_peak_which_grows_with_r_batch_and_length(family, precision):
    base, task_type = (tiny_bert(), "SEQ_CLS") if family == "bert" else (tiny_llama(), "CAUSAL_LM")
    shapes = {"base": (4, 8, 32), "r": (64, 8, 32), "batch": (4, 16, 32), "length": (4, 8, 64)}
    figures = {name: predicted_and_measured(base, task_type, *shape, precision=precision)
               for name, shape in shapes.items()}
    for name, (predicted, measured) in figures.items():
        assert predicted == pytest.approx(measured, rel=0.2), name
    for name in ("r", "batch", "length"):
        assert figures[name][1] > figures["base"][1], name  # the measured column tracks the configuration


def test_measuring_a_step_leaves_weights_gradients_and_random_state_as_found():
    base = tiny_bert()
    lora = LoraSettings(r=4, lora_alpha=8, target_modules="qv", lora_dropout=0.1)
    model, _ = adapters.apply_lora(base, lora)
    use_fast_dropout(model, attention=True)
    model.eval()  # as from_pretrained leaves it: the step is measured in training mode all the same
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 500, (4, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    rng = torch.get_rng_state()
    peak = memory.measure(model, batch, batch, learning_rate=0.5)
    assert not model.training
    model.train()
    assert memory.measure(model, batch, batch, learning_rate=0.5) == peak and min(peak) > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_cap_below_a_prediction_prunes_that_trial_before_any_step_and_resuming_skips_it(raw_config, assets):  # noqa: F811
    from lora_sweep.trial.runner import prepare

    model_dir, csv_path = assets
    raw = copy.deepcopy(raw_config)
    raw["model"]["name_or_path"] = str(model_dir)
    raw["data"].update(name_or_path=str(csv_path), encoding=None, label_column="label", labels=None,
                       train_size=80, eval_size=40, max_length=16)
    raw["train"].update(num_train_epochs=1, device="cpu", per_device_train_batch_size=16, save_adapter=False)
    raw["lora"].update(r=4, lora_alpha=8)
    raw["study"].update(name="capped", sampler="grid")
    raw["space"] = {"train.per_device_train_batch_size": "choice(8, 64)"}
    small, large = (prepare(from_mapping(copy.deepcopy(raw) | {"train": raw["train"] | {
        "per_device_train_batch_size": b}}).base).memory.peak_mb for b in (8, 64))
    assert small < large
    raw["train"]["memory_limit_mb"] = (small + large) / 2
    config = from_mapping(raw)

    study = run_sweep(config)
    by_batch = {t.params["train.per_device_train_batch_size"]: t for t in study.trials}
    fits, capped = by_batch[8], by_batch[64]
    assert fits.state == TrialState.COMPLETE
    assert fits.user_attrs["predicted_memory_mb"] == pytest.approx(small, rel=1e-3)
    assert capped.state == TrialState.PRUNED
    assert capped.user_attrs["infeasible"] == (f"predicted {large:,.0f} MB > {(small + large) / 2:,.0f} MB "
                                               f"allowed (train.memory_limit_mb)")
    assert capped.user_attrs["memory_limit_mb"] == pytest.approx((small + large) / 2, abs=0.1)
    assert not capped.intermediate_values and "epochs" not in capped.user_attrs  # not one step, not one eval
    assert "peak_memory_mb" not in capped.user_attrs
    assert "infeasible" in (config.report_dir / "report.md").read_text()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=config.tracking_uri)
    runs = {r.data.tags.get("optuna_trial_number"): r for r in client.search_runs(
        [client.get_experiment_by_name(config.experiment_name).experiment_id]) if "mlflow.parentRunId" in r.data.tags}
    shown = runs[str(capped.number)]  # in MLflow too: pruned, why, and both figures
    assert shown.data.tags["status"] == "pruned" and "infeasible" in shown.data.tags["reason"]
    assert shown.data.metrics["predicted_memory_mb"] == pytest.approx(large)
    assert shown.data.metrics["memory_limit_mb"] == pytest.approx((small + large) / 2)

    again = run_sweep(config)  # resumed: the grid is done, the infeasible point is not re-run
    assert len(again.trials) == 2


def test_the_largest_prediction_over_a_space_is_its_widest_corner(make_config, assets):  # noqa: F811
    from lora_sweep.search.space import SearchSpace
    from lora_sweep.trial.runner import largest_prediction, prepare

    model_dir, csv_path = assets
    config = make_config({"lora.r": "choice(2, 64)"}, model={"name_or_path": str(model_dir)},
                         data={"name_or_path": str(csv_path), "encoding": None, "label_column": "label",
                               "labels": None, "train_size": 80, "eval_size": 40, "max_length": 16})
    corners = [p.settings for p in SearchSpace(config).corner_points()]
    each = sorted(prepare(s, "cpu").memory.peak_mb for s in corners)
    assert each[0] < each[-1]  # r=64 needs more than r=2
    assert largest_prediction(corners, "cpu") == each[-1]


def test_the_live_tensor_count_follows_storages_not_tensors():
    held = torch.zeros(2**18)  # 1 MiB, made before: counted once registered
    live = memory.LiveTensors()
    live.track(held)
    with live:
        a = torch.ones(2**19)              # 2 MiB
        view = a[: 2**10].view(32, 32)     # a view: no new storage
        b = a * 2                          # 2 MiB more: 5 MiB alive
        del a, view, b                     # freed: back to 1 MiB
        c = torch.ones(2**17)              # 0.5 MiB
    assert live.peak == 5 * memory.MB
    assert live.now == 1.5 * memory.MB
    del c
    assert live.now == memory.MB


def test_a_4bit_base_is_predicted_from_its_config_without_loading_it(make_config, assets):  # noqa: F811
    from lora_sweep.trial.runner import prepare

    model_dir, csv_path = assets
    data = {"name_or_path": str(csv_path), "encoding": None, "label_column": "label", "labels": None,
            "train_size": 80, "eval_size": 40, "max_length": 16}
    full = prepare(make_config({}, model={"name_or_path": str(model_dir)}, data=data).base, "cuda")
    packed = prepare(make_config({}, model={"name_or_path": str(model_dir), "load_in_4bit": True}, data=data).base,
                     "cuda")
    assert packed.base is None and packed.memory is not None  # nothing loaded: a 4-bit base loads in its trial
    linear = sum(m.weight.numel() for n, m in full.base.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.split(".")[0] != "classifier")
    # NF4 halves a byte per linear weight where fp32 takes four; embeddings stay at the compute dtype (bf16)
    assert full.memory.weights_mb - packed.memory.weights_mb > (4 - 0.6) * linear / memory.MB
    assert packed.memory.batch == (full.settings.train.per_device_train_batch_size, 16)  # data.max_length
