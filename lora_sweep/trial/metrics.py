"""What a trial measures besides the model's own metrics: peak memory, sizes, classification scores,
and the scores of generated text (normalised exact match, chrF).

Memory is reported as what it is:
- CUDA: torch.cuda.max_memory_allocated over the trial, counters reset at its start (exact).
- CPU: the most live tensor bytes over one training step and one eval batch (lora_sweep.trial.memory),
  the figure that follows the configuration; beside it (peak_rss_mb) the process's peak resident set
  size above its size at the trial's start, sampled every 10 ms by a thread (a lower bound of the
  true peak). Freed heap is handed back to the OS between trials (malloc_trim) so a later trial's
  RSS does not hide inside memory an earlier one grew.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from pathlib import Path

import numpy as np

MEMORY_KINDS = {
    "cuda": "cuda_max_allocated",
    "cpu": "cpu_peak_live_tensors_one_step",   # lora_sweep.trial.memory.measure
    "rss": "cpu_peak_rss_above_trial_start_sampled",  # TrialRecord.peak_rss_mb on a CPU
}


def release_memory() -> None:
    """Give memory back after a trial (Python objects, CUDA cache, glibc heap)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class PeakMemory:
    """with PeakMemory(device) as m: ...  ->  m.peak_mb, m.kind"""

    def __init__(self, device: str, interval_s: float = 0.01):
        self.device = device
        self.kind = MEMORY_KINDS["cuda" if device == "cuda" else "rss"]
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        release_memory()
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self._start = rss_mb()
            self._peak = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, rss_mb())

    def read(self) -> float:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        return max(self._peak, rss_mb()) - self._start

    def __exit__(self, *exc) -> None:
        self.peak_mb = self.read()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    preds = np.asarray(logits).argmax(-1)
    return {"accuracy": float(accuracy_score(labels, preds)),
            "f1": float(f1_score(labels, preds, average="macro"))}


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def is_out_of_memory(error: BaseException) -> bool:
    """MemoryError (Python), torch.OutOfMemoryError (CUDA), and torch's CPU allocator failure,
    which surfaces as a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(error, MemoryError):
        return True
    try:
        import torch

        if isinstance(error, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text
                                                or "out of memory" in text.lower())


def failure_reason(error: BaseException) -> str:
    """One line for Optuna, MLflow and the report: what went wrong, and what to do if we know."""
    detail = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if is_out_of_memory(error):
        return (f"out of memory ({detail[:300]}); lower train.per_device_train_batch_size, data.max_length "
                f"or lora.r")
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted ({detail}); re-run the same command to resume"
    return detail


def normalise(text: str) -> str:
    """Exact match's normal form (SQuAD's, less its article rule): punctuation removed, outer whitespace
    stripped, inner runs collapsed to one space, casefolded."""
    import unicodedata

    kept = "".join(ch for ch in str(text) if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split()).casefold()


def exact_match(prediction: str, reference: str) -> bool:
    return normalise(prediction) == normalise(reference)


def generation_scores(predictions: list[str], references: list[str]) -> dict:
    """eval_exact_match: share of normalised exact matches (0-1); eval_chrf: sacrebleu's corpus chrF
    (0-100, its defaults: character 6-grams, beta 2, no word n-grams), computed offline."""
    import sacrebleu

    if not references:
        return {"eval_exact_match": float("nan"), "eval_chrf": float("nan")}
    matches = sum(exact_match(p, r) for p, r in zip(predictions, references))
    return {"eval_exact_match": matches / len(references),
            "eval_chrf": float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)}
