"""ShareGPT and Alpaca data, other chat dialects mapped by data.role_key / data.content_key / data.roles,
and refusals that list the user's own columns, name the mapping a near miss needs and count rows from 1."""

from __future__ import annotations

import copy
import re

import datasets
import lm_assets
import pytest
from omegaconf import OmegaConf

from lora_sweep.bench import chat_data
from lora_sweep.config import ConfigError, DataConfig, from_mapping
from lora_sweep.trial import chat, data
from lora_sweep.trial.chat import ChatLM, data_format, detect
from lora_sweep.trial.tasks import IGNORE

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("fresh_caches")]

ID = "__lora_sweep_example_id__"  # lora_sweep.trial.data's internal id column
SYSTEM = "Sentiment of"
# tatsu-lab/stanford_alpaca train.py PROMPT_DICT, written out as the text a model reads
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
              "Sentiment of\n\n### Input:\ngood day\n\n### Response:")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\nSentiment of\n\n### Response:")


@pytest.fixture(scope="module")
def tok():
    return lm_assets.chat_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    """No chat template; its words cover the Alpaca prompt, so no token of it is <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = dict.fromkeys(w for text in (WITH_INPUT, NO_INPUT) for w, _ in split.pre_tokenize_str(text))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(lm_assets.SPECIAL + lm_assets.WORDS + list(words)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = split
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    assert not out.chat_template
    return out


def _pairs(n: int = 12) -> list[tuple[str, str]]:
    """(text, answer) rows built from instruction_rows: words the tiny tokenizers know."""
    return [(r["prompt"].removeprefix("Sentiment of: ").removesuffix(" ->"), r["completion"].strip())
            for r in lm_assets.instruction_rows(n)]


def _dialogs(n: int = 12) -> list[dict]:
    """A dialect of its own: `dialog` turns of {speaker, text}, speakers customer and agent."""
    return [{"dialog": [{"speaker": "customer", "text": text}, {"speaker": "agent", "text": answer}], "id": i}
            for i, (text, answer) in enumerate(_pairs(n))]


def _tokenized(path, tokenizer, **kw):
    config = DataConfig(name_or_path=str(path), train_size=8, eval_size=3, max_length=64, **kw)
    return data.tokenized(config, tokenizer, tokenizer_key=str(id(tokenizer)), task=ChatLM(config, "messages"))


def _same_examples(a, b) -> None:
    for split in ("train", "eval"):
        assert getattr(a, split)["input_ids"] == getattr(b, split)["input_ids"]
        assert getattr(a, split)["labels"] == getattr(b, split)["labels"]
    assert a.eval_ids == b.eval_ids and a.generate["references"] == b.generate["references"]


# -- ShareGPT --------------------------------------------------------------------------------------

def test_sharegpt_is_detected_and_trains_exactly_as_the_same_messages(tmp_path, tok):
    rows = [[("system", SYSTEM), ("user", text), ("assistant", answer)] for text, answer in _pairs()]
    messages = lm_assets.write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": r, "content": c} for r, c in turns]} for turns in rows])
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = lm_assets.write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": names[r], "value": c} for r, c in turns]} for turns in rows])
    config = DataConfig(name_or_path=str(sharegpt))
    assert data_format(["conversations", ID], config) == "sharegpt"
    assert detect(["conversations", ID], config) == "messages"
    assert data.load_splits(DataConfig(name_or_path=str(sharegpt), train_size=8, eval_size=3)).format == "messages"
    want = _tokenized(messages, tok)
    _same_examples(_tokenized(sharegpt, tok), want)
    assert set(want.train[0]["labels"]) - {IGNORE}  # the answer is trained on
    # the explicit format, and the same turns under another column name (keys found, ShareGPT's roles)
    _same_examples(_tokenized(sharegpt, tok, format="sharegpt"), want)
    chats = lm_assets.write_jsonl(tmp_path / "c.jsonl", [
        {"chat": [{"from": names[r], "value": c} for r, c in turns]} for turns in rows])
    _same_examples(_tokenized(chats, tok, messages_column="chat"), want)


# -- Alpaca ----------------------------------------------------------------------------------------

def _alpaca_rows(n: int = 12, inputs: bool = True) -> list[dict]:
    return [{"instruction": SYSTEM, **({"input": text if i % 3 else ""} if inputs else {}), "output": answer}
            for i, (text, answer) in enumerate(_pairs(n))]


def test_alpaca_becomes_one_user_turn_and_the_answer_with_a_chat_template(tmp_path, tok):
    rows = _alpaca_rows()
    alpaca = lm_assets.write_jsonl(tmp_path / "a.jsonl", rows)
    user = [SYSTEM + ("\n" + text if i % 3 else "") for i, (text, _) in enumerate(_pairs())]
    messages = lm_assets.write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": r["output"]}]}
        for u, r in zip(user, rows)])
    raw, want = (data.load_splits(DataConfig(name_or_path=str(p), train_size=8, eval_size=3))
                 for p in (alpaca, messages))
    assert raw.format == "messages"
    assert [[(t["role"], t["content"]) for t in m] for m in raw.train["messages"]] == \
        [[(t["role"], t["content"]) for t in m] for m in want.train["messages"]]
    _same_examples(_tokenized(alpaca, tok), _tokenized(messages, tok))
    # the template sees role and content only, not the Alpaca parts kept for the template-less prompt
    counting = lm_assets.chat_tokenizer(lm_assets.CHATML.replace(
        "message['content'] + '<|im_end|>'",
        "message['content'] + (' bad' if message|length > 2 else '') + '<|im_end|>'"))
    _same_examples(_tokenized(alpaca, counting), _tokenized(messages, counting))


def test_alpaca_without_a_chat_template_gets_the_stanford_prompt_and_eos(tmp_path, plain_tok):
    assert chat.alpaca_prompt(SYSTEM, "good day") == WITH_INPUT
    assert chat.alpaca_prompt(SYSTEM) == NO_INPUT
    rows = [{"instruction": SYSTEM, "input": "good day", "output": "positive"},
            {"instruction": SYSTEM, "input": "", "output": "negative"}] * 6
    encoded = _tokenized(lm_assets.write_jsonl(tmp_path / "a.jsonl", rows), plain_tok)
    eos = plain_tok.eos_token_id
    want = {tuple(plain_tok(text)["input_ids"] + plain_tok(answer, add_special_tokens=False)["input_ids"] + [eos]):
            len(plain_tok(text)["input_ids"]) for text, answer in ((WITH_INPUT, "positive"), (NO_INPUT, "negative"))}
    assert plain_tok.unk_token_id not in {i for ids in want for i in ids}
    for ids, labels in zip(encoded.train["input_ids"], encoded.train["labels"]):
        prompt = want[tuple(ids)]
        assert labels == [IGNORE] * prompt + ids[prompt:]  # the output and EOS trained on, the prompt masked
    assert set(map(tuple, encoded.train["input_ids"])) == set(want)


def test_instruction_and_output_are_alpaca_with_or_without_input(tmp_path):
    config = DataConfig(name_or_path="x.jsonl")
    assert data_format(["instruction", "output", ID], config) == "alpaca"
    assert data_format(["instruction", "input", "output"], config) == "alpaca"
    # pointed at instruction/output beside an input column, prompt_completion would drop the input
    pointed = DataConfig(name_or_path="x.jsonl", prompt_column="instruction", completion_column="output")
    assert data_format(["instruction", "input", "output"], pointed) == "alpaca"
    assert data_format(["instruction", "output"], pointed) == "prompt_completion"
    assert data_format(["instruction", "input", "output"], DataConfig(name_or_path="x.jsonl",
                       format="prompt_completion", prompt_column="instruction", completion_column="output")) \
        == "prompt_completion"
    path = lm_assets.write_jsonl(tmp_path / "a.jsonl", _alpaca_rows(inputs=False))
    raw = data.load_splits(DataConfig(name_or_path=str(path), train_size=8, eval_size=3))
    assert {m[0]["content"] for m in raw.train["messages"]} == {SYSTEM}


# -- other dialects --------------------------------------------------------------------------------

def _composed(compose_cfg, tmp_path, overrides):
    raw = OmegaConf.to_container(compose_cfg(["lora.task_type=CAUSAL_LM", "study.metric=eval_loss", *overrides]),
                                 resolve=True)
    raw["paths"] = {"sweeps_dir": str(tmp_path / "sweeps"), "reports_dir": str(tmp_path / "reports")}
    return from_mapping(copy.deepcopy(raw)).base.data


def test_an_explicit_dialect_mapping_composes_from_the_command_line_and_maps_every_turn(compose_cfg, tmp_path):
    assert _composed(compose_cfg, tmp_path, ["data.roles={human:user,gpt:assistant}"]).role_map() == {
        "human": "user", "gpt": "assistant"}
    path = lm_assets.write_jsonl(tmp_path / "d.jsonl", _dialogs())
    config = _composed(compose_cfg, tmp_path, [
        f"data.name_or_path={path}", "data.train_size=8", "data.eval_size=3", "data.messages_column=dialog",
        "data.role_key=speaker", "data.content_key=text", "data.roles={customer: user, agent: assistant}"])
    raw = data.load_splits(config)
    assert raw.format == "messages" and raw.train.column_names == ["messages"]
    by_text = {d["dialog"][0]["text"]: d["dialog"][1]["text"] for d in _dialogs()}
    assert [[t["role"] for t in m] for m in raw.train["messages"]] == [["user", "assistant"]] * 8
    assert all(by_text[m[0]["content"]] == m[1]["content"] for m in raw.train["messages"])


# -- refusals --------------------------------------------------------------------------------------

def _refusal(path, **kw) -> str:
    data.clear_cache()
    with pytest.raises(ConfigError) as e:
        data.load_splits(DataConfig(name_or_path=str(path), train_size=8, eval_size=3, **kw))
    return str(e.value)


def test_refusals_list_only_the_users_columns_and_name_the_mapping_that_fits(tmp_path):
    path = lm_assets.write_jsonl(tmp_path / "d.jsonl", _dialogs())
    text = _refusal(path)
    assert "Found: dialog, id." in text and "__" not in text and "'conversations' (ShareGPT" in text
    with pytest.raises(ConfigError, match="lacks the column.*'conversations'.*its columns are: dialog, id\\.$"):
        detect(["dialog", "id", ID], DataConfig(name_or_path="x.jsonl", format="sharegpt"))
    # given the rows, the refusal names the column of turns and the mapping it needs
    ds = datasets.Dataset.from_list(_dialogs()).add_column(ID, list(range(12)))
    with pytest.raises(ConfigError, match=r"Column 'dialog' holds chat turns with the keys speaker, text: set "
                                          r"data.messages_column=dialog data.role_key=speaker data.content_key=text "
                                          r"data.roles='\{customer: user, agent: assistant\}'\.$"):
        detect(ds.column_names, DataConfig(name_or_path="x.jsonl"), ds)
    sharegpt = datasets.Dataset.from_list([{"chat": [{"from": "human", "value": "hi"},
                                                     {"from": "gpt", "value": "yo"}]}])
    with pytest.raises(ConfigError, match=r"set data.messages_column=chat data.role_key=from "
                                          r"data.content_key=value\.$"):
        detect(sharegpt.column_names, DataConfig(name_or_path="x.jsonl"), sharegpt)
    # the column named, its keys not: the keys found and the roles to map
    assert _refusal(path, messages_column="dialog").endswith(
        "data.messages_column='dialog': its turns have the keys speaker, text, not data.role_key='role' + "
        "data.content_key='content'; set data.role_key=speaker data.content_key=text "
        "data.roles='{customer: user, agent: assistant}'.")


def test_bad_rows_are_counted_from_one_and_unknown_roles_name_data_roles(tmp_path):
    turns = [{"from": "human", "value": "good day"}, {"from": "gpt", "value": "positive"}]
    rows = [{"conversations": turns} for _ in range(12)]
    rows[4] = {"conversations": [turns[0], {"from": "bot", "value": "positive"}]}  # line 5 of the file
    text = _refusal(lm_assets.write_jsonl(tmp_path / "s.jsonl", rows))
    assert re.match(r"data.messages_column='conversations': (row|line) 5 of .*turn 2: role 'bot'", text)
    assert text.endswith("Roles found: human, gpt, bot; map them to system/user/assistant, e.g. "
                         "data.roles='{human: user, gpt: assistant, bot: assistant}'.")
    pairs = lm_assets.instruction_rows(12)
    pairs[3]["completion"] = " "
    assert re.search(r"data.completion_column='completion': (row|line) 4 of ", _refusal(
        lm_assets.write_jsonl(tmp_path / "p.jsonl", pairs)))
    alpaca = _alpaca_rows()
    alpaca[6]["output"] = ""
    assert re.search(r"Alpaca column 'output': (row|line) 7 of ",
                     _refusal(lm_assets.write_jsonl(tmp_path / "a.jsonl", alpaca)))
    chats = [{"messages": [{"role": "user", "content": "good"}, {"role": "assistant", "content": "positive"}]}] * 12
    chats[9] = {"messages": chats[0]["messages"][:1]}
    assert re.search(r"(row|line) 10 of ", _refusal(lm_assets.write_jsonl(tmp_path / "m.jsonl", chats)))
    # the loader may name a record as its user finds it (a jsonl file's line, blank lines counted)
    ds = datasets.Dataset.from_list(rows).add_column(ID, list(range(12)))
    with pytest.raises(ConfigError, match="row 5 of x.jsonl, turn 2"):
        chat.check_rows(ds, "messages", DataConfig(name_or_path="x.jsonl"), ID)
    with pytest.raises(ConfigError, match="line 7 of x.jsonl, turn 2"):
        chat.check_rows(ds, "messages", DataConfig(name_or_path="x.jsonl"), ID, lambda i: f"line {i + 3}")


# -- the bench's files -----------------------------------------------------------------------------

def test_chat_data_writes_sharegpt_and_alpaca_files_that_load_as_the_same_examples(tmp_path, tok):
    paths = {p.name: p for p in chat_data.write(tmp_path, per_label=6)}
    assert {"tweets_sharegpt.jsonl", "tweets_alpaca.jsonl", "tweets_messages.jsonl"} <= set(paths)

    def load(name):
        return data.load_splits(DataConfig(name_or_path=str(paths[name]), train_size=8, eval_size=3))

    messages, sharegpt, alpaca = (load(f"tweets_{s}.jsonl") for s in ("messages", "sharegpt", "alpaca"))
    assert sharegpt.train["messages"] == messages.train["messages"] and sharegpt.eval_ids == messages.eval_ids
    answers = [m[-1]["content"] for m in messages.train["messages"]]
    assert [m[-1]["content"] for m in alpaca.train["messages"]] == answers
    tweets = [m[1]["content"] for m in messages.train["messages"]]
    assert [m[0]["content"] for m in alpaca.train["messages"]] == [f"{chat_data.QUESTION}\n{t}" for t in tweets]


def test_a_role_outside_system_user_assistant_is_refused_as_typed():
    with pytest.raises(ConfigError, match=r"data.roles=\{'customer': 'boss'\}"):
        DataConfig(name_or_path="org/dataset", roles={"customer": "boss"}).validate()
