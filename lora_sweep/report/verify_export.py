"""Load an exported folder exactly as its model card says, in a clean process, and re-evaluate it.

    python -m lora_sweep.report.verify_export DIR --reference REF.json [--device cpu]

The code block of DIR/README.md is run as written (only its `folder = ...` line points at DIR), so the
check proves the call a user copies. The eval split is the sweep's (DIR/lora_sweep_export.json holds
its data settings and eval batch size). Each example's prediction must equal the reference's:
exit 0 when all are identical, 1 when any differs.
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


def predict(model, tokenizer, meta: dict, device: str = "cpu") -> list[dict]:
    """Per-example results on the sweep's eval split, in the trial's eval order and batches:
    example_id (the source row, as the trial's per-example files; else the position in the split),
    label, prediction (a label's index; token ids for language models), correct, loss."""
    import numpy as np
    import torch

    from lora_sweep.config import DataConfig
    from lora_sweep.trial import data, tasks

    dc = DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["data"].items()})
    task = tasks.get_task(meta["task_type"], dc)
    raw = data.load_splits(dc)
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
        return [f"{len(got)} examples evaluated but the reference has {len(want)}"]
    return [f"example {k}: prediction {got[k]}, reference {want[k]}" for k in sorted(want, key=int) if got[k] != want[k]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_sweep.report.verify_export")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--reference", type=Path, required=True, help="json: {source, predictions}")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    import logging

    import transformers

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
    diffs = compare(rows, ref["predictions"])
    correct = sum(r["correct"] for r in rows)
    if diffs:
        print(f"verify: FAILED: {len(diffs)} of {len(rows)} predictions differ from {ref['source']}:", file=sys.stderr)
        for line in diffs[:5]:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"verify: {len(rows)}/{len(rows)} predictions identical to {ref['source']} "
          f"(accuracy {correct}/{len(rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
