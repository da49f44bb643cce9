"""Tiny language-model assets built in code: a word-level tokenizer over a small vocabulary (so a tiny
random model can learn to answer within seconds), a LLaMA-style decoder and a T5, saved to disk."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

POSITIVE = ["good", "great", "excellent", "happy", "love", "wonderful", "nice", "fine"]
NEGATIVE = ["bad", "awful", "terrible", "sad", "hate", "horrible", "poor", "ugly"]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["Sentiment", "of", ":", "->", "positive", "negative", "the", "day", "was", *POSITIVE, *NEGATIVE]


def tokenizer():
    """A fast tokenizer like LLaMA's in the ways that matter here: BOS first, EOS and pad distinct."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()  # words, and punctuation runs (":", "->")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama_causal(tok, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{
        "vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
        "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        **overrides}))


def tiny_t5(tok):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id))


def save(model, tok, folder: Path) -> Path:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sentiment_csv(path: Path, n: int = 120) -> Path:
    """Learnable labelled text: positive words -> positive, negative words -> negative."""
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            words = POSITIVE if i % 2 else NEGATIVE
            writer.writerow([" ".join(rng.choices(words, k=5)), "positive" if i % 2 else "negative"])
    return path


def plain_text(path: Path, n: int = 60) -> Path:
    """Unlabelled text, one document a line (datasets' `text` builder)."""
    rng = random.Random(1)
    path.write_text("\n".join("the day was " + " ".join(rng.choices(POSITIVE + NEGATIVE, k=4))
                              for _ in range(n)) + "\n")
    return path


# SmolLM2-Instruct's chat template (ChatML, a default system turn when the conversation has none)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chat_tokenizer(template: str = CHATML):
    """The word-level tokenizer with ChatML's turn markers as special tokens and the role names as words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + ["<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
                                        + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)  # never split by the pre-tokenizer
    tok.chat_template = template
    return tok


def instruction_rows(n: int = 40) -> list[dict]:
    """Learnable instruction pairs: a sentiment question, the label as the answer."""
    rng = random.Random(2)
    rows = []
    for i in range(n):
        words = POSITIVE if i % 2 else NEGATIVE
        rows.append({"prompt": "Sentiment of: " + " ".join(rng.choices(words, k=4)) + " ->",
                     "completion": " positive" if i % 2 else " negative"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
