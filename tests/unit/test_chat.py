"""Instruction (prompt/completion) and chat (messages) data for CAUSAL_LM: column detection, row checks,
the assistant-only loss mask token by token, truncation with counts, tiny end-to-end trials."""

from __future__ import annotations

import copy
import math

import datasets
import lm_assets
import pytest

from lora_sweep.config import ConfigError, DataConfig, from_mapping
from lora_sweep.trial import chat, data
from lora_sweep.trial.chat import ChatLM, check_conversation, detect, fit
from lora_sweep.trial.runner import check_data, run_trial
from lora_sweep.trial.tasks import IGNORE

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches")]

CONVERSATION = [{"role": "system", "content": "Sentiment of"},
                {"role": "user", "content": "good day"}, {"role": "assistant", "content": "positive"},
                {"role": "user", "content": "bad day"}, {"role": "assistant", "content": "negative"}]


@pytest.fixture(scope="module")
def tok():
    return lm_assets.chat_tokenizer()


def _config(**kw):
    return DataConfig(name_or_path="x.jsonl", **kw)


# -- detection and checks ----------------------------------------------------------------------------

def test_columns_pick_the_shape_trl_names_first_and_overrides_apply():
    assert detect(["messages", "text"], _config()) == "messages"
    assert detect(["prompt", "completion", "id"], _config()) == "prompt_completion"
    assert detect(["text", "label"], _config()) == "labelled"
    assert detect(["text"], _config(label_column=None)) == "text"
    assert detect(["question", "answer"], _config(prompt_column="question", completion_column="answer")) \
        == "prompt_completion"
    with pytest.raises(ConfigError, match=r"no recognisable columns. Found: question, answer\. Accepted: "
                                          r"'messages'.*'prompt' \+ 'completion'"):
        detect(["question", "answer"], _config())
    with pytest.raises(ConfigError, match="lacks the column.*'completion'"):
        detect(["prompt", "text", "label"], _config(format="prompt_completion"))


@pytest.mark.parametrize("messages, shown", [
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}], "turn 2: role 'bot'; allowed: system, user, assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "be"}, {"role": "assistant", "content": "x"}],
     "turn 2: a system turn; allowed only as the first turn"),
    ([{"role": "user", "content": "hi"}], "ends with a 'user' turn; it must end with the assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "turn 2 \\(assistant\\): content ' '"),
    ([], "a non-empty list"),
])
def test_bad_conversations_name_the_row_turn_and_what_is_allowed(messages, shown):
    with pytest.raises(ConfigError, match="row 7.*" + shown):
        check_conversation(messages, "data.messages_column='messages': row 7")


def test_bad_rows_are_refused_when_the_data_loads(tmp_path):
    rows = lm_assets.instruction_rows(10)
    rows[3]["completion"] = ""
    path = lm_assets.write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(ConfigError, match=r"data.completion_column='completion': line 4 .* holds ''; every "
                                          r"completion must be a non-empty string"):
        data.load_splits(DataConfig(name_or_path=str(path), train_size=6, eval_size=2))
    chats = [{"messages": CONVERSATION} for _ in range(5)] + [{"messages": CONVERSATION[:-1]}]
    path = lm_assets.write_jsonl(tmp_path / "chats.jsonl", chats)
    with pytest.raises(ConfigError, match="line 6 .*ends with a 'user' turn"):
        data.load_splits(DataConfig(name_or_path=str(path), train_size=4, eval_size=2))


# -- tokens ----------------------------------------------------------------------------------------

def test_only_the_last_assistant_turn_is_trained_on_token_by_token(tok):
    task = ChatLM(_config(max_length=64), "messages")
    row = task.encode(datasets.Dataset.from_dict({"messages": [CONVERSATION]}), tok, ())[0]
    words = ["<|im_start|>", "system", "Sentiment", "of", "<|im_end|>",
             "<|im_start|>", "user", "good", "day", "<|im_end|>",
             "<|im_start|>", "assistant", "positive", "<|im_end|>",
             "<|im_start|>", "user", "bad", "day", "<|im_end|>",
             "<|im_start|>", "assistant", "negative", "<|im_end|>"]
    assert row["input_ids"] == tok.convert_tokens_to_ids(words)
    trained = ["negative", "<|im_end|>"]  # the last answer and its end-of-turn; the first answer is context
    assert row["labels"] == [IGNORE] * (len(words) - 2) + tok.convert_tokens_to_ids(trained)


def test_a_template_whose_generation_prompt_differs_is_refused(tok):
    odd = lm_assets.chat_tokenizer(lm_assets.CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>user\n'"))
    with pytest.raises(ConfigError, match="chat template cannot mask the answer.*token-for-token prefix"):
        ChatLM(_config(), "messages").encode(datasets.Dataset.from_dict({"messages": [CONVERSATION]}), odd, ())


def test_prompt_completion_masks_the_prompt_and_ends_the_answer_with_eos(tok):
    task = ChatLM(_config(max_length=64), "prompt_completion")
    row = task.encode(datasets.Dataset.from_dict({"prompt": ["Sentiment of: good ->"],
                                                  "completion": [" positive"]}), tok, ())[0]
    prompt = tok("Sentiment of: good ->")["input_ids"]
    answer = tok.convert_tokens_to_ids(["positive", "</s>"])
    assert row["input_ids"] == prompt + answer and row["labels"] == [IGNORE] * len(prompt) + answer


def test_over_long_examples_are_cut_from_the_left_or_dropped_and_counted(tok):
    assert fit([1, 10, 11, 12, 13], [20, 2], 5, "left", bos=1) == ([1, 12, 13], True)  # BOS stays
    assert fit([10, 11, 12], [20, 2], 4, "left", bos=1) == ([11, 12], True)  # no BOS to keep
    assert fit([1, 10, 11, 12, 13], [20, 2], 5, "drop", bos=1) is None
    assert fit([1, 10], [20, 21, 22, 2], 4, "left", bos=1) is None  # the answer alone fills max_length
    assert fit([1, 10], [20, 2], 4, "drop", bos=1) == ([1, 10], False)
    raw = datasets.Dataset.from_dict({"prompt": ["good day", "the day was good good good good", "bad"],
                                      "completion": [" positive", " positive", " negative good good good good"]})
    for truncation, kept, truncated, dropped in (("left", 2, 1, 1), ("drop", 1, 0, 2)):
        task = ChatLM(_config(max_length=6, truncation=truncation), "prompt_completion")
        encoded = task.encode(raw, tok, ())
        assert chat.length_counts(raw, encoded) == {"kept": kept, "prompt_truncated": truncated, "dropped": dropped}
        assert encoded[chat.SOURCE] == ([0, 1] if truncation == "left" else [0])
        assert all(len(ids) <= 6 for ids in encoded["input_ids"])
    left = ChatLM(_config(max_length=6), "prompt_completion").encode(raw, tok, ())[1]
    assert tok.convert_ids_to_tokens(left["input_ids"]) == ["<s>", "good", "good", "good", "positive", "</s>"]


# -- end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tok = lm_assets.chat_tokenizer()
    model = lm_assets.tiny_llama_causal(tok, initializer_range=0.3)
    return lm_assets.save(model, tok, tmp_path_factory.mktemp("chat") / "llama")


def _settings(raw_config, model_dir, source, **data_overrides):
    raw = copy.deepcopy(raw_config)
    raw["model"]["name_or_path"] = str(model_dir)
    raw["data"].update({"name_or_path": str(source), "encoding": None, "train_size": 24, "eval_size": 8,
                        "max_length": 40, **data_overrides})
    raw["train"].update(num_train_epochs=2, device="cpu", learning_rate=3e-2, per_device_train_batch_size=8)
    raw["lora"].update(r=4, lora_alpha=8, task_type="CAUSAL_LM", lora_dropout=0.0, target_modules="all-linear")
    raw["study"] = {**raw["study"], "metric": "eval_loss", "direction": "minimize"}
    return from_mapping(raw).base


@pytest.mark.parametrize("shape", ["prompt_completion", "messages"])
def test_tiny_trial_trains_on_instruction_and_chat_files(raw_config, llama, tmp_path, shape):
    rows = lm_assets.instruction_rows(32)
    if shape == "messages":
        rows = [{"messages": [{"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": r["completion"].strip()}]} for r in rows]
    s = _settings(raw_config, llama, lm_assets.write_jsonl(tmp_path / f"{shape}.jsonl", rows))
    check_data(s, "eval_loss", lm_assets.chat_tokenizer())
    with pytest.raises(ConfigError, match="study.metric='eval_accuracy'.*measures eval_loss, eval_perplexity"):
        check_data(s, "eval_accuracy", lm_assets.chat_tokenizer())
    calls = []
    result = run_trial(s, "cpu", lambda step, metrics: calls.append(dict(metrics)))
    assert data.load_splits(s.data).format == shape
    # data.generate_at=auto: the generated answers are scored at the last epoch only
    assert [sorted(c) for c in calls] == [["eval_loss", "eval_perplexity"],
                                          ["eval_chrf", "eval_exact_match", "eval_loss", "eval_perplexity"]]
    assert calls[-1]["eval_loss"] < calls[0]["eval_loss"] and math.isfinite(calls[-1]["eval_loss"])
    assert (result.metrics["examples_kept"], result.metrics["examples_dropped"]) == (32, 0)
    frame = result.examples
    assert len(frame) == 8 and frame["loss"].notna().all() and frame["prediction"].notna().all()  # generate_size=null
    assert frame["correct"].mean() == pytest.approx(calls[-1]["eval_exact_match"])
    assert list(result.samples.columns) == ["prompt", "reference", "output"] and len(result.samples) == 5
    assert set(frame["label"]) <= {" positive", " negative", "positive", "negative"}
    ids = data.tokenized(s.data, None, s.model.name_or_path, ChatLM(s.data, shape)).eval_ids  # the trial's, cached
    assert sorted(frame["example_id"]) == sorted(ids)


def test_dropped_examples_leave_eval_ids_and_generation_prompts_aligned(tmp_path):
    tok = lm_assets.chat_tokenizer()
    rows = lm_assets.instruction_rows(12)
    for i in range(0, 12, 3):
        rows[i]["completion"] = " positive" * 12  # an answer over max_length alone: dropped
    config = DataConfig(name_or_path=str(lm_assets.write_jsonl(tmp_path / "p.jsonl", rows)), train_size=6,
                        eval_size=6, max_length=12, generate_size=2)
    raw = data.load_splits(config)
    out = data.tokenized(config, tok, "tok", ChatLM(config, "prompt_completion"))
    kept = sorted(i for i in raw.eval_ids if i % 3)
    assert sorted(out.eval_ids) == kept and len(out.eval) == len(kept)
    assert out.length_counts["eval"] == {"kept": len(kept), "prompt_truncated": 0, "dropped": 6 - len(kept)}
    assert all(i % 3 for i in out.generate["example_ids"]) and len(out.generate["example_ids"]) == 2
    for i, ids in zip(out.eval_ids, out.eval["input_ids"]):  # each id's tokens are that row's prompt
        assert ids[:-2] == tok(rows[i]["prompt"])["input_ids"]


def test_a_chat_test_split_is_drawn_outside_train_and_eval_and_encoded_as_eval_is(tmp_path):
    """data.test_size on instruction data: seeded rows outside train/eval (those unchanged), dropped
    examples counted apart, ids and generation prompts aligned as for eval."""
    from dataclasses import replace

    tok = lm_assets.chat_tokenizer()
    rows = lm_assets.instruction_rows(20)
    for i in range(0, 20, 3):
        rows[i]["completion"] = " positive" * 12  # an answer over max_length alone: dropped
    config = DataConfig(name_or_path=str(lm_assets.write_jsonl(tmp_path / "p.jsonl", rows)), train_size=6,
                        eval_size=6, test_size=6, max_length=12, generate_size=2)
    raw, without = data.load_splits(config), data.load_splits(replace(config, test_size=None))
    assert raw.eval_ids == without.eval_ids and raw.train.to_dict() == without.train.to_dict()
    train_ids = {rows.index(r) for r in raw.train.to_list()}
    assert len(set(raw.test_ids)) == 6 and not set(raw.test_ids) & (set(raw.eval_ids) | train_ids)
    out = data.tokenized(config, tok, "tok", ChatLM(config, "prompt_completion"))
    kept = sorted(i for i in raw.test_ids if i % 3)
    assert sorted(out.test_ids) == kept and len(out.test) == len(kept) >= 2
    assert out.length_counts["test"] == {"kept": len(kept), "prompt_truncated": 0, "dropped": 6 - len(kept)}
    assert out.test_generate["example_ids"] == [i for i in raw.test_ids if i % 3][:2]  # the first 2 kept
    assert out.test_generate["references"] == [rows[i]["completion"] for i in out.test_generate["example_ids"]]
    for i, ids in zip(out.test_ids, out.test["input_ids"]):  # each id's tokens are that row's prompt
        assert ids[:-2] == tok(rows[i]["prompt"])["input_ids"]


def test_the_sweep_refuses_bad_chat_data_before_training(raw_config, llama, tmp_path):
    from lora_sweep.run.sweep import preflight
    from lora_sweep.search.space import SearchSpace

    chats = [{"messages": CONVERSATION}] * 6 + [{"messages": CONVERSATION[:1] + [{"role": "tool", "content": "x"}]}]
    path = lm_assets.write_jsonl(tmp_path / "chats.jsonl", chats)
    raw = copy.deepcopy(raw_config)
    raw["model"]["name_or_path"] = str(llama)
    raw["data"].update(name_or_path=str(path), encoding=None, train_size=4, eval_size=2)
    raw["lora"].update(task_type="CAUSAL_LM")
    raw["study"] = {**raw["study"], "metric": "eval_loss", "direction": "minimize"}
    config = from_mapping(raw)
    with pytest.raises(ConfigError, match="line 7 .*turn 2: role 'tool'"):
        preflight(config, SearchSpace(config))
    raw["data"]["train_size"], raw["lora"]["task_type"] = 3, "SEQ_CLS"  # the good rows, a classifier
    raw["study"] = {**raw["study"], "metric": "eval_accuracy", "direction": "maximize"}
    chats[-1] = {"messages": CONVERSATION}
    lm_assets.write_jsonl(path, chats)
    config = from_mapping(raw)
    with pytest.raises(ConfigError, match="lora.task_type='SEQ_CLS'.*messages data.*CAUSAL_LM only"):
        preflight(config, SearchSpace(config))


def test_examples_never_generated_have_no_correctness(monkeypatch):
    """Catches the pandas 3 bug: a None answer put into a frame column reads back NaN, so a `p is None`
    check misses it and exact_match(NaN, NaN) compares "nan" with "nan": every example beyond
    data.generate_size was stored correct=True. Eval (example_outcomes) and test (test_outcomes) alike."""
    from lora_sweep.trial import tasks

    losses = lambda trainer, dataset, shifted: [0.1, 0.2, 0.3, 0.4]  # noqa: E731
    monkeypatch.setattr(tasks, "example_losses", losses)
    monkeypatch.setattr(chat, "example_losses", losses, raising=False)  # where the old code looked it up
    task = ChatLM(_config(), "prompt_completion")
    generate = {"example_ids": [5, 9], "references": [" positive", " positive"]}
    task.last_answers = ["positive", "negative"]
    frame = task.example_outcomes(None, None, [3, 5, 7, 9], generate, ())
    assert list(frame.columns) == ["example_id", "label", "prediction", "correct", "loss"]
    assert frame["correct"].isna().tolist() == [True, False, True, False]  # ids 3 and 7 were never generated
    assert frame["correct"].dropna().tolist() == [True, False]
    assert frame["prediction"].isna().tolist() == [True, False, True, False]

    task.generate_answers = lambda model, tokenizer, generate, batch_size: ["negative", "positive"]
    trainer = type("Trainer", (), {"model": None})()
    test = task.test_outcomes(trainer, None, [9, 5, 7, 3], generate, (), None, 4)
    assert test["correct"].isna().tolist() == [False, False, True, True]  # ids 9 and 5 generated, in frame order
    assert test["correct"].dropna().tolist() == [True, False]
    assert test["loss"].tolist() == [0.1, 0.2, 0.3, 0.4]
    assert task.last_answers == ["positive", "negative"]  # the eval answers stay the eval's
