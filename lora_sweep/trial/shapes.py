"""The shapes of instruction and chat data, as they are read: which shape a source holds (data.format=auto
detects it from the columns), and every row checked and brought to the two shapes ChatLM trains on
(lora_sweep/trial/chat.py): prompt_completion, or messages (ShareGPT and Alpaca rows are converted to
messages here; data.role_key, data.content_key and data.roles map other dialects). Refusals count rows
from 1, list the user's own columns and name the mapping a near miss needs."""

from __future__ import annotations

import dataclasses
import logging

from lora_sweep.config import ConfigError, DataConfig
from lora_sweep.config.names import CHAT_DIALECTS

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DataConfig)}
SHAREGPT_COLUMN = "conversations"   # ShareGPT: a list of {from, value} turns
SHAREGPT_KEYS = ("from", "value")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ALPACA = "__alpaca__"  # an Alpaca row's user turn keeps {instruction, input}: render's template-less fallback
# tatsu-lab/stanford_alpaca train.py PROMPT_DICT, verbatim
ALPACA_PROMPTS = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}



def detect(columns: list[str], config: DataConfig, ds=None) -> str:
    """The shape the task trains on (labelled, text, prompt_completion, messages): data_format's, with
    ShareGPT and Alpaca data read as messages (check_rows converts them)."""
    shape = data_format(columns, config, ds)
    return "messages" if shape in CHAT_DIALECTS else shape


def data_format(columns: list[str], config: DataConfig, ds=None) -> str:
    """The data's format (names.DATA_FORMATS less auto) from its columns and data.format; `ds` (the
    loaded rows, optional) lets a refusal suggest the mapping that would fit a near-miss column."""
    own = _own(columns)
    cols = set(own)
    pair = {config.prompt_column, config.completion_column}
    alpaca = {"instruction", "output"}
    need = {"messages": {config.messages_column}, "sharegpt": {SHAREGPT_COLUMN}, "alpaca": alpaca,
            "prompt_completion": pair, "labelled": {config.text_column, config.label_column},
            "text": {config.text_column}}
    shape = config.format
    if shape == "auto":
        if config.messages_column in cols:
            shape = "messages"
        elif SHAREGPT_COLUMN in cols:
            shape = "sharegpt"
        # prompt/completion pointed at instruction/output beside an `input` column would lose the input
        elif alpaca <= cols and (not pair <= cols or (pair == alpaca and "input" in cols)):
            shape = "alpaca"
        elif pair <= cols:
            shape = "prompt_completion"
        elif config.label_column is not None and need["labelled"] <= cols:
            shape = "labelled"
        elif config.label_column is None and config.text_column in cols:
            shape = "text"
        else:
            raise ConfigError(
                f"data.name_or_path={config.name_or_path!r}: no recognisable columns. Found: "
                f"{', '.join(own) or 'none'}. Accepted: {config.messages_column!r} (data.messages_column: "
                f"chat turns {{role, content}}), {SHAREGPT_COLUMN!r} (ShareGPT turns {{from, value}}), "
                f"{config.prompt_column!r} + {config.completion_column!r} (data.prompt_column, "
                f"data.completion_column: instruction pairs), 'instruction' + 'output', 'input' optional "
                f"(Alpaca), {config.text_column!r} + {config.label_column!r} (data.text_column, "
                f"data.label_column: labelled text), or {config.text_column!r} with data.label_column=null "
                f"(plain text); or set data.format and the column names.{_near_miss(ds, own, config)}")
    missing = sorted(c for c in need[shape] if c is not None and c not in cols)
    if missing:
        raise ConfigError(f"data.format={config.format!r}: {config.name_or_path!r} lacks the column(s) "
                          f"{', '.join(map(repr, missing))} that {shape} data needs; its columns are: "
                          f"{', '.join(own) or 'none'}.")
    return shape


def check_rows(ds, shape: str, config: DataConfig, id_column: str, where=None):
    """ds reduced to the shape's standard columns (prompt, completion | messages) and the id column,
    every row checked; a bad row raises ConfigError naming the field, the row and what is allowed.
    `where(id)` names a row as its user finds it (reading.Source.where: a jsonl file's line); by default
    'row N', N the id + 1. ShareGPT, other chat dialects (data.role_key, data.content_key, data.roles)
    and Alpaca rows come out as messages of {role, content}."""
    at = where or (lambda row: f"row {row + 1}")
    source = data_format(ds.column_names, config) if shape == "messages" else shape
    if source == "alpaca":
        return _alpaca_messages(ds, config, id_column, at)
    if source in ("messages", "sharegpt"):
        return _messages(ds, config.messages_column if source == "messages" else SHAREGPT_COLUMN, config,
                         id_column, at)
    ds = ds.select_columns([config.prompt_column, config.completion_column, id_column])
    for field, col in (("prompt", config.prompt_column), ("completion", config.completion_column)):
        for row, value in zip(ds[id_column], ds[col]):
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"data.{field}_column={col!r}: {at(row)} of {config.name_or_path} holds "
                                  f"{value!r}; every {field} must be a non-empty string.")
    renames = {config.prompt_column: "prompt", config.completion_column: "completion"}
    return ds.rename_columns({k: v for k, v in renames.items() if k != v})


def check_conversation(messages, where: str) -> None:
    """lora-sweep's own check, since a chat template renders anything it is given."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where} holds {messages!r}; allowed: a non-empty list of {{role, content}} turns.")
    for i, turn in enumerate(messages):
        role = turn.get("role") if isinstance(turn, dict) else None
        content = turn.get("content") if isinstance(turn, dict) else None
        if role not in ROLES:
            raise ConfigError(f"{where}, turn {i + 1}: role {role!r}; allowed: {', '.join(ROLES)}.")
        if role == "system" and i > 0:
            raise ConfigError(f"{where}, turn {i + 1}: a system turn; allowed only as the first turn.")
        if not isinstance(content, str) or not content.strip():
            raise ConfigError(f"{where}, turn {i + 1} ({role}): content {content!r}; allowed: a non-empty string.")
    if messages[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: the conversation ends with a {messages[-1]['role']!r} turn; it must end "
                          f"with the assistant turn the model is trained to write.")


def _own(columns) -> list[str]:
    """The user's columns: lora-sweep's own (__name__, e.g. the example id) are never shown."""
    return [c for c in columns if not (c.startswith("__") and c.endswith("__"))]


def _messages(ds, column: str, config: DataConfig, id_column: str, at):
    """A column of chat turns -> `messages` of {role, content}: the turn keys (data.role_key and
    data.content_key; left at role/content, ShareGPT's from/value are taken too) and role names
    (data.roles; ShareGPT's by default with from/value) mapped, every conversation checked."""
    ids, values = ds[id_column], ds[column]
    where = f"data.messages_column={column!r}"
    keys = _turn_keys(values, config, where)
    roles = _role_map(config, keys)
    found = _roles_found(values, keys[0])
    for row, turns in zip(ids, values):
        for i, turn in enumerate(turns if isinstance(turns, list) else ()):
            role = turn.get(keys[0]) if isinstance(turn, dict) else None
            if role is not None and role not in roles:
                raise ConfigError(f"{where}: {at(row)} of {config.name_or_path}, turn {i + 1}: role {role!r}; "
                                  f"allowed: {', '.join(roles)}. Roles found: {', '.join(found)}; map them to "
                                  f"system/user/assistant, e.g. {_roles_hint(values, keys[0])}.")
    standard = keys == ("role", "content") and set(found) <= set(ROLES)
    out = []
    for row, turns in zip(ids, values):
        messages = turns if standard or not isinstance(turns, list) else [
            {"role": roles.get(t.get(keys[0])), "content": t.get(keys[1])} if isinstance(t, dict) else t
            for t in turns]
        check_conversation(messages, f"{where}: {at(row)} of {config.name_or_path}")
        out.append(messages)
    if standard:  # as the data has them (extra turn keys kept for the template)
        ds = ds.select_columns([column, id_column])
        return ds.rename_column(column, "messages") if column != "messages" else ds
    import datasets

    return datasets.Dataset.from_dict({"messages": out, id_column: ids})


def _turn_keys(values: list, config: DataConfig, where: str) -> tuple[str, str]:
    """(role key, content key) of the turns: data.role_key/data.content_key where set, else role/content
    or ShareGPT's from/value, whichever the turns hold; a ConfigError naming the keys found otherwise."""
    found = _keys_found(values)
    if not found:  # no dict turns at all: check_conversation says what a row holds
        return config.role_key, config.content_key
    chosen = (config.role_key, config.content_key)
    candidates = [chosen] if chosen != (_DEFAULTS["role_key"], _DEFAULTS["content_key"]) else [chosen, SHAREGPT_KEYS]
    for keys in candidates:
        if set(keys) <= set(found):
            return keys
    raise ConfigError(f"{where}: its turns have the keys {', '.join(found)}, not data.role_key={chosen[0]!r} "
                      f"+ data.content_key={chosen[1]!r}; {_keys_hint(values, found)}.")


def _role_map(config: DataConfig, keys: tuple[str, str]) -> dict:
    """The data's role name -> ours: system/user/assistant as they are, then data.roles, or ShareGPT's
    names where the turns are from/value and data.roles is unset."""
    extra = config.role_map() or (SHAREGPT_ROLES if keys == SHAREGPT_KEYS else {})
    return {**{r: r for r in ROLES}, **extra}


def _keys_found(values: list) -> list[str]:
    """The keys that hold a value in some turn (Arrow gives every turn every key, None where absent)."""
    keys: dict = {}
    for turns in values:
        for turn in turns if isinstance(turns, list) else ():
            if isinstance(turn, dict):
                keys.update((k, None) for k, v in turn.items() if v is not None)
    return list(keys)


def _roles_found(values: list, role_key: str) -> list[str]:
    found: dict = {}
    for turns in values:
        for turn in turns if isinstance(turns, list) else ():
            if isinstance(turn, dict) and isinstance(turn.get(role_key), str):
                found[turn[role_key]] = None
    return list(found)


def _roles_hint(values: list, role_key: str) -> str:
    """data.roles='{...}' for the role names found that are not ours: ShareGPT's where they are, else
    assistant for a name that ends some conversation, user for the others."""
    last = {turns[-1].get(role_key) for turns in values
            if isinstance(turns, list) and turns and isinstance(turns[-1], dict)}
    names = [r for r in _roles_found(values, role_key) if r not in ROLES]
    pairs = [f"{r}: {SHAREGPT_ROLES.get(r) or ('assistant' if r in last else 'user')}" for r in names]
    return "data.roles='{" + ", ".join(pairs) + "}'"


def _keys_hint(values: list, found: list[str]) -> str:
    """'set data.role_key=K data.content_key=V' guessed from the turns: the role key is the string key with
    the fewest distinct values, the content key the one with the most."""
    distinct: dict = {}
    for turns in values:
        for turn in turns if isinstance(turns, list) else ():
            for k, v in (turn.items() if isinstance(turn, dict) else ()):
                if isinstance(v, str):
                    distinct.setdefault(k, set()).add(v)
    if len(distinct) < 2:
        return f"set data.role_key and data.content_key to the turns' keys ({', '.join(found)})"
    role = min(distinct, key=lambda k: len(distinct[k]))
    content = max((k for k in distinct if k != role), key=lambda k: len(distinct[k]))
    hint = f"set data.role_key={role} data.content_key={content}"
    if any(r not in ROLES for r in _roles_found(values, role)):
        hint += " " + _roles_hint(values, role)
    return hint


def _near_miss(ds, own: list[str], config: DataConfig, sample: int = 100) -> str:
    """' Column X holds chat turns ...: set data.messages_column=X ...' for the first column of the first
    rows that holds lists of dicts; '' without ds or such a column."""
    if ds is None:
        return ""
    head = ds.select(range(min(len(ds), sample)))
    for col in own:
        values = head[col]
        found = _keys_found(values)
        if not found:
            continue
        keys = next((k for k in (("role", "content"), SHAREGPT_KEYS) if set(k) <= set(found)), None)
        if keys is None:
            hint = _keys_hint(values, found).replace("set ", f"set data.messages_column={col} ", 1)
        else:
            hint = f"set data.messages_column={col} data.role_key={keys[0]} data.content_key={keys[1]}"
            if any(r not in _role_map(config, keys) for r in _roles_found(values, keys[0])):
                hint += " " + _roles_hint(values, keys[0])
        return f" Column {col!r} holds chat turns with the keys {', '.join(found)}: {hint}."
    return ""


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt of an instruction (and its input, where non-empty)."""
    if input:
        return ALPACA_PROMPTS["prompt_input"].format(instruction=instruction, input=input)
    return ALPACA_PROMPTS["prompt_no_input"].format(instruction=instruction)


def _alpaca_messages(ds, config: DataConfig, id_column: str, at):
    """Alpaca rows -> `messages`: user = the instruction, then the input on a new line where there is
    one; assistant = the output. The user turn keeps both parts under ALPACA for render's fallback."""
    import datasets

    n = len(ds)
    inputs = ds["input"] if "input" in ds.column_names else [None] * n
    out = []
    for row, instruction, given, output in zip(ds[id_column], ds["instruction"], inputs, ds["output"]):
        for name, value in (("instruction", instruction), ("output", output)):
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"Alpaca column {name!r}: {at(row)} of {config.name_or_path} holds "
                                  f"{value!r}; every {name} must be a non-empty string.")
        if given is not None and not isinstance(given, str):
            raise ConfigError(f"Alpaca column 'input': {at(row)} of {config.name_or_path} holds {given!r}; "
                              f"allowed: a string, empty or missing where the instruction has no input.")
        given = given if given and given.strip() else ""
        out.append([{"role": "user", "content": f"{instruction}\n{given}" if given else instruction,
                     ALPACA: {"instruction": instruction, "input": given}},
                    {"role": "assistant", "content": output, ALPACA: None}])
    return datasets.Dataset.from_dict({"messages": out, id_column: ds[id_column]})


def split(ds, config: DataConfig):
    """Checked rows (check_rows) -> a seeded random train/eval split (datasets' train_test_split result)."""
    need = config.train_size + config.eval_size
    if need > len(ds):
        raise ConfigError(f"data.train_size + data.eval_size = {need} but {config.name_or_path} has only "
                          f"{len(ds)} examples. Lower the sizes.")
    return ds.train_test_split(train_size=config.train_size, test_size=config.eval_size, seed=config.seed)


# -- tokens --------------------------------------------------------------------------------------
