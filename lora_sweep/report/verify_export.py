"""Load an exported folder exactly as its model card says, in a clean process, and re-evaluate it.

    python -m lora_sweep.report.verify_export DIR --reference REF.json [--device cpu] [--threads N]

The code block of DIR/README.md is run as written (only its `folder = ...` line points at DIR), so the
check proves the call a user copies. The eval split is the sweep's (DIR/lora_sweep_export.json holds
its data settings and eval batch size). A classifier re-predicts every eval example; a language model
that generated answers regenerates them with the task's own generation code (lora_sweep.trial.tasks
Task.generate_answers: greedy, left padding, the trial's prompts, order and eval batches, in the
weights' dtype as the trial did) under the trial's torch thread count. Each prediction must equal the
reference's: exit 0 when all are identical, 1 when any differs (the differences on stderr).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

META = "lora_sweep_export.json"
_CODE = re.compile(r"```python\n(.*?)```", re.S)


def card_code(folder: Path) -> str:
    """The model card's loading code, its `folder = ...` line pointed at this folder."""
    text = (folder / "README.md").read_text()
    match = _CODE.search(text)
    if match is None:
        raise SystemExit(f"{folder / 'README.md'} has no python code block to load the model with")
    return re.sub(r"^folder = .*$", f"folder = {str(folder.resolve())!r}", match.group(1), count=1, flags=re.M)


def load_as_card_says(folder: Path):
    """(model, tokenizer) from running the card's code."""
    scope: dict = {}
    exec(compile(card_code(folder), str(folder / "README.md"), "exec"), scope)  # noqa: S102 - our own card
    return scope["model"], scope["tokenizer"]


def data_config(meta: dict):
    from lora_sweep.config import DataConfig

    return DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["data"].items()})


def task_of(meta: dict):
    """The trial's task: the chat task on instruction/chat data, else lora.task_type's."""
    from lora_sweep.trial import chat, data

    dc = data_config(meta)
    return chat.get_task(meta["task_type"], dc, data.load_splits(dc).format)


def generates(meta: dict) -> bool:
    """Whether the trial's per-example predictions are generated answers (language models on labelled,
    instruction or chat data), not a label per example or next-token ids."""
    from lora_sweep.trial import data

    return meta["task_type"] != "SEQ_CLS" and data.load_splits(data_config(meta)).format != "text"


def predict(model, tokenizer, meta: dict, device: str = "cpu") -> list[dict]:
    """Per-example results on the sweep's eval split, in the trial's eval order and batches:
    example_id (the source row, as the trial's per-example files; else the position in the split),
    label, prediction (a label's index; the generated answer for a generating language model; next-token
    ids for plain text), correct; loss where not generated."""
    if generates(meta):
        return generated(model, tokenizer, meta, device)
    return _forward(model, tokenizer, meta, device)


def generated(model, tokenizer, meta: dict, device: str = "cpu") -> list[dict]:
    """The trial's generation, redone: its generation set (lora_sweep.trial.data.tokenized: Splits.generate)
    answered by the task's own Task.generate_answers in the trial's eval batches."""
    from lora_sweep.trial import data

    dc, task = data_config(meta), task_of(meta)
    splits = data.tokenized(dc, tokenizer, tokenizer_key="export", task=task)
    model.to(device).eval()
    answers = task.generate_answers(model, tokenizer, splits.generate, int(meta["eval_batch_size"]))
    references = task.references(splits.generate, splits.labels)
    rows = [{"example_id": i, "label": ref, "prediction": answer, "correct": bool(task.matches(answer, ref))}
            for i, ref, answer in zip(splits.generate["example_ids"], references, answers)]
    return sorted(rows, key=lambda r: r["example_id"])


def _forward(model, tokenizer, meta: dict, device: str) -> list[dict]:
    """One forward pass per eval batch: a classifier's label, or a plain-text model's next-token argmax."""
    import numpy as np
    import torch

    from lora_sweep.trial import data, tasks

    task = task_of(meta)
    raw = data.load_splits(data_config(meta))
    enc = task.encode(raw.eval, tokenizer, raw.labels)
    # the trial's order (lora_sweep.trial.data: the eval split, shortest first), so batches pad alike
    order = np.argsort([len(x) for x in enc["input_ids"]], kind="stable").tolist()
    source_ids = getattr(raw, "eval_ids", None) or list(range(len(enc)))
    collate = task.collator(tokenizer)
    batch_size = int(meta["eval_batch_size"])
    model.to(device).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            ids = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([enc[i] for i in ids]).items()}
            logits = model(**batch).logits.float()
            gold = batch["labels"]
            if logits.dim() == 2:  # a label per example
                losses = torch.nn.functional.cross_entropy(logits, gold, reduction="none")
                preds = logits.argmax(-1)
                for j, i in enumerate(ids):
                    out.append({"example_id": source_ids[i], "label": int(gold[j]), "prediction": int(preds[j]),
                                "correct": bool(preds[j] == gold[j]), "loss": float(losses[j])})
                continue
            if meta["task_type"] == "CAUSAL_LM":  # token t predicts token t+1
                logits, gold = logits[:, :-1], gold[:, 1:]
            for j, i in enumerate(ids):
                mask = gold[j] != tasks.IGNORE
                pred, want = logits[j][mask].argmax(-1), gold[j][mask]
                loss = torch.nn.functional.cross_entropy(logits[j][mask], want) if mask.any() else torch.tensor(0.0)
                out.append({"example_id": source_ids[i], "label": " ".join(map(str, want.tolist())),
                            "prediction": " ".join(map(str, pred.tolist())),
                            "correct": bool(torch.equal(pred, want)), "loss": float(loss)})
    return sorted(out, key=lambda r: r["example_id"])


def compare(rows: list[dict], reference: dict) -> list[str]:
    """Differences from the reference ({example_id: prediction}); empty when identical."""
    got = {str(r["example_id"]): str(r["prediction"]) for r in rows}
    want = {str(k): str(v) for k, v in reference.items()}
    if set(got) != set(want):
        return [f"{len(got)} examples evaluated but the reference has {len(want)} "
                f"(only here: {sorted(set(got) - set(want), key=int)[:5]}, "
                f"only there: {sorted(set(want) - set(got), key=int)[:5]})"]
    return [f"example {k}: prediction {got[k]!r}, reference {want[k]!r}" for k in sorted(want, key=int)
            if got[k] != want[k]]


def why(meta: dict, device: str) -> str:
    """What can make a faithful folder's answers differ from the trial's, for the failure message."""
    if device == "cuda":
        return ("on a GPU, kernels may pick other reduction orders from run to run; greedy decoding turns "
                "a last-bit difference into another token")
    if meta.get("threads") is None:
        return ("the trial's torch thread count is unknown (a study stored before it was recorded), and a "
                "matrix product split over other threads rounds otherwise")
    return "the folder does not hold what the trial trained (or the trial's stored answers were changed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_sweep.report.verify_export")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--reference", type=Path, required=True, help="json: {source, predictions}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (the trial's; default: torch's)")
    args = parser.parse_args(argv)
    import logging

    import torch
    import transformers

    if args.threads:  # a matrix product split over another thread count can round otherwise
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    meta = json.loads((args.folder / META).read_text())
    ref = json.loads(args.reference.read_text())
    try:
        model, tokenizer = load_as_card_says(args.folder)
    except Exception as e:  # a folder the card's own code cannot load is a failed export
        print(f"verify: FAILED: the model card's code cannot load {args.folder}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    rows = predict(model, tokenizer, meta, args.device)
    what = "generated answers" if generates(meta) else "predictions"
    diffs = compare(rows, ref["predictions"])
    correct = sum(r["correct"] for r in rows)
    if diffs:
        print(f"verify: FAILED: {len(diffs)} of {len(rows)} {what} differ from {ref['source']} "
              f"(a possible cause: {why(meta, args.device)}):", file=sys.stderr)
        for line in diffs[:5]:
            print(f"  {line}", file=sys.stderr)
        return 1
    score = "exact match" if meta.get("format") in ("prompt_completion", "messages") else "accuracy"
    print(f"verify: {len(rows)}/{len(rows)} {what} identical to {ref['source']} ({score} {correct}/{len(rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
