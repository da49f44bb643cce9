"""The baseline lora_sweep is measured against: what users write today, one fresh process per config.

A plain transformers Trainer + peft script: read the csv, split, tokenize, random batches padded to
their longest example, evaluate every epoch. It deliberately imports nothing from lora_sweep, so its
start-up (imports, model load, tokenization) is paid in full once per configuration, as it is for
users. Run by `python -m lora_sweep.bench`; prints one JSON line with its result.

    python -m lora_sweep.bench.baseline '{"model": DIR, "csv": FILE, "r": 16, ...}'
"""

from __future__ import annotations

import json
import sys
import time


def main(spec: dict) -> dict:
    t_start = time.perf_counter()
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    datasets.disable_progress_bars()
    labels = spec["labels"]
    df = read_table(spec["csv"], spec.get("encoding"))
    df = df[df[spec["label_column"]].isin(labels)]
    ds = datasets.Dataset.from_dict({"text": df[spec["text_column"]].astype(str).tolist(),
                                     "labels": [labels.index(v) for v in df[spec["label_column"]]]})
    ds = ds.cast_column("labels", datasets.ClassLabel(names=labels))
    split = ds.train_test_split(train_size=spec["train_size"], test_size=spec["eval_size"], seed=spec["data_seed"],
                                stratify_by_column="labels")
    tok = AutoTokenizer.from_pretrained(spec["model"])
    enc = split.map(lambda b: tok(b["text"], truncation=True, max_length=spec["max_length"]), batched=True,
                    remove_columns=["text"])
    set_seed(spec["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=len(labels))
    model = get_peft_model(model, LoraConfig(
        task_type="SEQ_CLS", r=spec["r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
        target_modules=spec["target_modules"], bias=spec["bias"]))

    epoch_times, evals = [], []

    class Timer(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kw):
            epoch_times.append(time.perf_counter() - self.t0)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            evals.append(metrics)

    args = TrainingArguments(
        output_dir=spec["output_dir"], learning_rate=spec["learning_rate"], weight_decay=spec["weight_decay"],
        warmup_steps=spec["warmup_steps"], lr_scheduler_type=spec["lr_scheduler_type"],
        max_grad_norm=spec["max_grad_norm"], gradient_accumulation_steps=spec["gradient_accumulation_steps"],
        num_train_epochs=spec["epochs"], per_device_train_batch_size=spec["batch_size"],
        per_device_eval_batch_size=spec["eval_batch_size"], seed=spec["seed"], eval_strategy="epoch",
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=enc["train"], eval_dataset=enc["test"],
                      data_collator=DataCollatorWithPadding(tok), callbacks=[Timer()],
                      compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
    trainer.train()
    return {"eval_accuracy": evals[-1]["eval_accuracy"], "epoch_time_s": sum(epoch_times) / len(epoch_times),
            "eval_seconds": sum(e["eval_runtime"] for e in evals),
            "process_seconds": time.perf_counter() - t_start}


def read_table(path: str, encoding: str | None = None):
    """The data file as pandas reads it, by its suffix, as the sweep reads csv/json/jsonl/parquet."""
    import pandas as pd

    suffix = path.rsplit(".", 1)[-1].lower()
    if encoding in (None, "auto") and suffix != "parquet":  # data.encoding=auto: the sweep's own choice
        from pathlib import Path

        from lora_sweep.trial.reading import choose_encoding

        encoding = choose_encoding(Path(path).read_bytes(), "auto")[0]
    if suffix == "parquet":
        return pd.read_parquet(path)
    if suffix in ("json", "jsonl"):
        return pd.read_json(path, lines=suffix == "jsonl", encoding=encoding or "utf-8")
    return pd.read_csv(path, encoding=encoding or "utf-8")


if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    result = main(json.loads(sys.argv[1]))
    print("BASELINE_RESULT " + json.dumps(result), flush=True)

