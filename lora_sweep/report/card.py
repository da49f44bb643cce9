"""The model card (README.md) of an exported trial: how to load it (the code the export check runs),
its configuration, metrics with a 95% interval, data, seeds, versions and the commands."""

from __future__ import annotations

import json
import os

from lora_sweep.report.stats import wilson


def base_lines(meta: dict) -> list[str]:
    """Python lines that set `base` (and `extra`, from_pretrained's other keywords) from the name the sweep used."""
    name = meta["base"]
    lines = []
    if name.startswith("pkg://"):
        package, _, rel = name[len("pkg://"):].partition("/")
        lines += [f"# {name}: the folder {rel!r} inside the PyPI package {package.replace('_', '-')}",
                  f"# (pip install {package.replace('_', '-')}); found without importing the package:",
                  f"base = os.path.join(importlib.util.find_spec({package!r}).submodule_search_locations[0], {rel!r})"]
    elif os.path.isabs(os.path.expanduser(name)) or name.startswith((".", "~")):
        lines += [f"base = os.path.expanduser({name!r})  # a local folder on the machine that ran the sweep"]
    else:
        lines += [f"base = {name!r}  # a Hugging Face Hub id"]
    extra = {k: meta[k] for k in ("revision", "trust_remote_code") if meta.get(k)}
    if meta.get("gguf_file"):
        extra["gguf_file"] = meta["gguf_file"]
    lines.append(f"extra = {extra!r}")
    if name.endswith(".gguf") and not meta.get("gguf_file"):
        lines.append("base, extra['gguf_file'] = os.path.split(base)  # a GGUF file: its folder and name")
    return lines


def load_code(meta: dict) -> str:
    auto = meta["auto_class"]
    lines = ["import importlib.util", "import os", "", "from peft import PeftModel",
             f"from transformers import {auto}, AutoTokenizer", "",
             f"folder = {meta['dest']!r}  # this folder", *base_lines(meta),
             "tokenizer = AutoTokenizer.from_pretrained(folder)"]
    if meta["task_type"] == "SEQ_CLS":
        lines += [f"labels = {list(meta['labels'])!r}",
                  f"model = {auto}.from_pretrained(base, num_labels=len(labels), id2label=dict(enumerate(labels)),",
                  "    label2id={label: i for i, label in enumerate(labels)}, **extra)"]
    else:
        lines += [f"model = {auto}.from_pretrained(base, **extra)"]
    lines += ["if model.config.pad_token_id is None:",
              "    model.config.pad_token_id = tokenizer.pad_token_id",
              "# the LoRA weights and the modules trained in full (modules_to_save: the classifier head)",
              "model = PeftModel.from_pretrained(model, folder)", "model.eval()"]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def render(meta: dict, rec, adapter_config: dict, study_meta: dict, n_eval: int, how: str) -> str:
    p = rec.params
    metric_rows = []
    if rec.eval_accuracy is not None:  # n_eval: the examples the accuracy counts (generated ones, for an LM)
        k = round(rec.eval_accuracy * n_eval)
        lo, hi = wilson(k, n_eval)
        metric_rows.append(f"| eval accuracy | {100 * rec.eval_accuracy:.1f}% ({k}/{n_eval}); "
                           f"95% Wilson interval {100 * lo:.1f}–{100 * hi:.1f}% |")
    if rec.test_accuracy is not None and rec.test_n:  # data.test_size: never read while choosing
        k = round(rec.test_accuracy * rec.test_n)
        lo, hi = wilson(k, rec.test_n)
        metric_rows.append(f"| held-out test accuracy | {100 * rec.test_accuracy:.1f}% ({k}/{rec.test_n}); "
                           f"95% Wilson interval {100 * lo:.1f}–{100 * hi:.1f}% |")
    for name in ("eval_f1", "eval_loss", "eval_perplexity", "train_loss"):
        if getattr(rec, name) is not None:
            metric_rows.append(f"| {name.replace('_', ' ')} | {getattr(rec, name):.4f} |")
    if rec.trainable_params is not None:
        metric_rows.append(f"| trainable parameters | {rec.trainable_params:,} of {rec.total_params:,} "
                           f"({rec.trainable_pct:.2f}%) |")
    for name, unit in (("epoch_time_s", "s/epoch"), ("peak_memory_mb", "MB"), ("adapter_size_mb", "MB")):
        if getattr(rec, name) is not None:
            metric_rows.append(f"| {name.rsplit('_', 1)[0].replace('_', ' ')} | {getattr(rec, name):.3g} {unit} |")
    lora_keys = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora", "use_dora",
                 "init_lora_weights", "task_type")
    train_keys = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
                  "weight_decay", "lr_scheduler_type", "warmup_steps", "train_sampling_strategy")
    d = meta["data"]
    versions = study_meta.get("versions") or {}
    lines = [
        f"# {meta['sweep']}: trial #{meta['trial']} ({rec.label})", "",
        f"A LoRA adapter from the lora-sweep sweep `{meta['sweep']}`, {how}.", "",
        "## Load it", "", "```python", load_code(meta).rstrip("\n"), "```", "",
        "## Configuration", "", "| LoRA | |", "|:--|:--|",
        *(f"| {k} | {_fmt(p[k])} |" for k in lora_keys if k in p),
        f"| modules_to_save | {_fmt(adapter_config.get('modules_to_save') or [])} (trained in full, saved here) |",
        "", "| training | |", "|:--|:--|", *(f"| {k} | {_fmt(p[k])} |" for k in train_keys if k in p), "",
        "## Metrics (the sweep's eval split)", "", "| | |", "|:--|:--|", *metric_rows, "",
        "## Data", "",
        f"- dataset: `{d['name_or_path']}` (text column `{d['text_column']}`, label column `{d['label_column']}`)",
        f"- labels: {json.dumps(list(meta['labels']))}",
        f"- {d['train_size']} training / {d.get('eval_size', n_eval)} eval examples"
        + (f" ({n_eval} of them generated and scored)" if d.get("eval_size", n_eval) != n_eval else "")
        + (f" / {d['test_size']} held-out test examples" if d.get("test_size") else "")
        + f", stratified split with seed {d['seed']}, max_length {d['max_length']}", "",
        "## Seeds", "",
        f"- data split: {d['seed']}; training (LoRA init, batch order, dropout): {p.get('seed')}; "
        f"study sampler: {meta.get('study_seed')}", "",
        "## Versions", "",
        *(f"- {k} {v}" for k, v in versions.items()),
        *([f"- lora-sweep commit {study_meta['git_commit']}"] if study_meta.get("git_commit") else []), "",
        "## Commands", "",
        f"- sweep: `{study_meta.get('command', 'unknown')}`",
        f"- export: `{meta.get('export_command') or ''}`" if "export" in (meta.get("export_command") or "")
        else f"- export: `python -m lora_sweep export sweep={meta['sweep']} trial={meta['trial']}`",
        f"- MLflow run: `{rec.mlflow_run_id}` (artifact `adapter/`)", "",
    ]
    return "\n".join(lines)
