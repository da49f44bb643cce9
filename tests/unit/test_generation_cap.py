"""Generated answers on instruction/chat data end at EOS or the chat template's end of turn, capped by
data.max_new_tokens (never by the eval references' length); the answers that hit the cap are counted."""

from __future__ import annotations

import lm_assets
import pytest
import torch

from lora_sweep.config import DataConfig
from lora_sweep.trial import data
from lora_sweep.trial.chat import ChatLM

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches")]


@pytest.fixture(scope="module")
def tok():
    return lm_assets.chat_tokenizer()


def _chat_rows(n: int, answer_words: int) -> list[dict]:
    rows = lm_assets.instruction_rows(n)
    return [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": " ".join([r["completion"].strip()] * answer_words)}]}
            for r in rows]


def _generation_set(tok, rows, **kw):
    import datasets

    task = ChatLM(DataConfig(name_or_path="x.jsonl", **kw), "messages")
    return task, task.generation_set(datasets.Dataset.from_list(rows), tok, ())


@pytest.mark.parametrize("answer_words, cap", [(12, 3), (1, 7)])
def test_the_cap_is_data_max_new_tokens_whatever_the_references_length(tok, answer_words, cap):
    _, gen = _generation_set(tok, _chat_rows(4, answer_words), max_new_tokens=cap, max_length=64)
    longest = max(len(tok(r)["input_ids"]) for r in gen["references"])
    assert gen["max_new_tokens"] == cap and longest != cap  # not the references' length, either way
    # the chat template's end of turn stops an answer, as the tokenizer's EOS does
    assert set(gen["eos_token_id"]) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}


def test_the_test_split_generates_under_the_same_rule(tmp_path, tok):
    rows = lm_assets.instruction_rows(20)
    for r in rows[::2]:
        r["completion"] = " positive" * 9  # references far longer than the cap
    config = DataConfig(name_or_path=str(lm_assets.write_jsonl(tmp_path / "p.jsonl", rows)), train_size=6,
                        eval_size=6, test_size=6, max_length=32, max_new_tokens=4)
    out = data.tokenized(config, tok, "tok", ChatLM(config, "prompt_completion"))
    for gen in (out.generate, out.test_generate):
        assert gen["max_new_tokens"] == config.max_new_tokens
        assert gen["eos_token_id"] == [tok.eos_token_id]  # a completion ends with EOS, no chat template


def _forced(tok, token: str):
    """The tiny decoder with an lm_head whose bias makes `token` win at every position."""
    model = lm_assets.tiny_llama_causal(tok)
    head = torch.nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[tok.convert_tokens_to_ids(token)] = 10.0
    model.lm_head = head
    return model


@pytest.mark.parametrize("token, capped", [("<|im_end|>", False), ("good", True)])
def test_answers_stop_at_end_of_turn_and_those_that_never_stop_are_counted(tok, token, capped):
    task, gen = _generation_set(tok, _chat_rows(5, 1), max_new_tokens=6, max_length=64)
    model, lengths = _forced(tok, token), []
    generate = model.generate

    def counted(**kw):  # the new tokens of each batch: 1 where the end of turn stopped it
        out = generate(**kw)
        lengths.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    model.generate = counted
    row = task.epoch_metrics({"eval_loss": 1.0}, model, tok, gen, batch_size=2, labels=())
    assert lengths == [6 if capped else 1] * 3
    assert task.last_generated == len(gen["prompt_ids"]) == 5  # three batches: 2 + 2 + 1
    assert task.last_capped == (5 if capped else 0)
    assert task.last_answers == ([" ".join([token] * 6)] * 5 if capped else [""] * 5)
    assert "eval_exact_match" in row
    # a test-split generation (generate_answers) leaves the eval's counts as they were
    task.generate_answers(_forced(tok, "<|im_end|>" if capped else "good"), tok, gen, 2)
    assert task.last_capped == (5 if capped else 0)
