"""Instruction and chat data for lora.task_type=CAUSAL_LM: the two shapes LLM users bring, as TRL names
their columns, trained with the loss on the answer only.

- prompt_completion: a `prompt` and a `completion` string per row. The prompt is tokenized as the
  tokenizer does (BOS first where it adds one), the completion on its own + EOS; the loss covers the
  completion tokens and EOS. Write any separator (a space, a newline) into the data, as with TRL.
- messages: a list of {role, content} per row, rendered by the tokenizer's own chat template. The
  loss covers the last assistant turn only (earlier assistant turns are context): SmolLM2's ChatML
  template has no {% generation %} markers, so the mask is derived instead: the conversation up to
  the last assistant turn, rendered with add_generation_prompt=True, must be a token-for-token prefix
  of the whole rendering; that prefix is masked and what follows (the answer and its end-of-turn
  tokens) is trained on.

Two more shapes are read as messages: ShareGPT (a `conversations` column of {from, value} turns,
roles human/gpt/system) and Alpaca (instruction, optional input, output: user = the instruction, then
the input on a new line; assistant = the output; a tokenizer without a chat template gets the Stanford
Alpaca prompt instead, the output + EOS as the answer). Other chat dialects map their turn keys and
role names with data.role_key, data.content_key and data.roles.

data.format=auto picks the shape from the columns (data.messages_column first, then `conversations`,
Alpaca's instruction + output, data.prompt_column + data.completion_column); every row is checked when
the data is loaded, before any training (roles system/user/assistant, system only first, ending in an
assistant turn, non-empty string contents and completions): a bad row raises ConfigError with its row
number, counted from 1. Refusals list the user's own columns and name the mapping a near miss needs.

An example longer than data.max_length is never cut silently: with data.truncation=left its prompt
loses tokens from the left (a leading BOS stays), with drop the example is dropped; the answer is
always kept whole, so an answer that alone fills max_length drops its example. The counts (kept,
prompt_truncated, dropped) are logged and stored on each trial (lora_sweep.record.TrialRecord).
"""

from __future__ import annotations

import logging

from lora_sweep.config import ConfigError, DataConfig
from lora_sweep.config.names import CHAT_FORMATS
from lora_sweep.trial.shapes import (ALPACA, ROLES, alpaca_prompt, check_conversation, check_rows,  # noqa: F401
                                     data_format, detect, split)
from lora_sweep.trial.tasks import IGNORE, CausalLM, Task
from lora_sweep.trial.tasks import get_task as task_for

log = logging.getLogger(__name__)

SOURCE = "__source_index__"       # an encoded example's position in its raw split (dropped rows leave gaps)
SAMPLE_ROWS = 5  # generations in the trial's sample table (prompt, reference, output)
TRUNCATED = "__prompt_truncated__"  # whether its prompt was cut from the left to fit data.max_length


def get_task(task_type: str, data: DataConfig, shape: str) -> Task:
    """lora_sweep.trial.tasks.get_task, with ChatLM for instruction/chat data (`shape`: Splits.format)."""
    if shape not in CHAT_FORMATS:
        return task_for(task_type, data)
    if task_type != "CAUSAL_LM":
        raise ConfigError(f"lora.task_type={task_type!r}: {data.name_or_path} holds {shape} data "
                          f"(instruction/chat), which trains with lora.task_type=CAUSAL_LM only.")
    return ChatLM(data, shape)




def render(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, answer) token ids of a conversation: the prefix is everything up to the last assistant
    turn with the template's generation prompt; the answer is the rest of the full rendering. An Alpaca
    row on a tokenizer without a chat template: the Stanford Alpaca prompt, the output + EOS."""
    alpaca = messages[0].get(ALPACA) if isinstance(messages[0], dict) else None
    if not getattr(tokenizer, "chat_template", None):
        if alpaca and len(messages) == 2:
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            prefix = tokenizer(alpaca_prompt(alpaca["instruction"], alpaca["input"]))["input_ids"]
            return prefix, tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"] + eos
        raise ConfigError("model.name_or_path: its tokenizer has no chat template, which messages data needs; "
                          "use an Instruct/chat model, or give the data as prompt + completion columns (or as "
                          "Alpaca's instruction + output, which render with the Alpaca prompt).")
    if ALPACA in messages[0]:  # the Alpaca parts are for the fallback above, not for the template
        messages = [{k: v for k, v in turn.items() if k != ALPACA} for turn in messages]
    # tokenize=False, then tokenize without special tokens: what apply_chat_template itself does
    prefix_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    prefix = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full[:len(prefix)] != prefix or len(full) == len(prefix):
        raise ConfigError("the tokenizer's chat template cannot mask the answer: the conversation rendered up "
                          "to its last assistant turn with add_generation_prompt=True is not a token-for-token "
                          f"prefix of the whole conversation's rendering (prefix {prefix_text!r}, full "
                          f"{full_text!r}). lora-sweep needs a template whose generation prompt opens the "
                          "assistant turn exactly as the rendered turn does (ChatML, LLaMA-3 and the like).")
    return prefix, full[len(prefix):]


def fit(prompt: list[int], answer: list[int], max_length: int, truncation: str, bos: int | None):
    """(prompt, truncated) that fits max_length with the answer whole, or None: drop the example."""
    if len(prompt) + len(answer) <= max_length:
        return prompt, False
    room = max_length - len(answer)
    keep_bos = bool(prompt) and bos is not None and prompt[0] == bos
    if truncation == "drop" or room < 1 + keep_bos:  # the answer alone fills max_length: no prompt left
        return None
    return ([bos] if keep_bos else []) + prompt[len(prompt) - room + keep_bos:], True


class ChatLM(CausalLM):
    """lora.task_type=CAUSAL_LM on prompt_completion or messages data (see the module docstring).
    eval_loss / eval_perplexity every epoch over the held-out answers; where the trial generates
    (data.generate_at; auto: the last evaluation), greedy answers to the first data.generate_size eval
    prompts scored by normalised exact match and chrF (lora_sweep.trial.metrics.generation_scores), and
    the first SAMPLE_ROWS of them kept as a sample table. Per example the answer's loss; label = the
    reference answer, prediction = the generated one, correct = their normalised exact match."""

    last_samples = None  # pandas DataFrame (prompt, reference, output): the last generation's first rows

    def __init__(self, data: DataConfig | None, shape: str):
        super().__init__(data)
        if shape not in CHAT_FORMATS:
            raise ValueError(f"ChatLM takes {CHAT_FORMATS}, not {shape!r}")
        self.shape = shape

    def pairs(self, dataset, tokenizer) -> list[tuple[list[int], list[int]]]:
        """(prompt, answer) token ids of every raw example, untruncated."""
        if self.shape == "messages":
            return [render(m, tokenizer) for m in dataset["messages"]]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prompts = tokenizer(list(dataset["prompt"]))["input_ids"]
        answers = tokenizer(list(dataset["completion"]), add_special_tokens=False)["input_ids"]
        return [(p, a + eos) for p, a in zip(prompts, answers)]

    def fitted(self, dataset, tokenizer) -> list[tuple[int, list[int], list[int], bool]]:
        """(source index, prompt, answer, prompt truncated) of the examples that fit data.max_length."""
        out = []
        for i, (prompt, answer) in enumerate(self.pairs(dataset, tokenizer)):
            kept = fit(prompt, answer, self.data.max_length, self.data.truncation, tokenizer.bos_token_id)
            if kept is not None:
                out.append((i, kept[0], answer, kept[1]))
        return out

    def encode(self, dataset, tokenizer, labels: tuple):
        import datasets

        rows = self.fitted(dataset, tokenizer)
        return datasets.Dataset.from_dict({
            "input_ids": [p + a for _, p, a, _ in rows],
            "attention_mask": [[1] * (len(p) + len(a)) for _, p, a, _ in rows],
            "labels": [[IGNORE] * len(p) + a for _, p, a, _ in rows],  # the loss on the answer only
            SOURCE: [i for i, *_ in rows], TRUNCATED: [t for *_, t in rows]})

    def generation_set(self, dataset, tokenizer, labels: tuple):
        """The first data.generate_size kept eval examples: prompt ids, reference answers (text), their
        source indices (data.tokenized turns them into example ids), and how answers end: at EOS or the
        template's end of turn (tasks.end_ids), else after data.max_new_tokens. The cap is a setting, not
        the references' length: that leaked eval answers into generation and cut longer answers short."""
        from lora_sweep.trial.tasks import end_ids

        rows = self.fitted(dataset, tokenizer)[:self.data.generate_size or None]
        references = (list(dataset["completion"]) if self.shape == "prompt_completion"
                      else [m[-1]["content"] for m in dataset["messages"]])
        return {"prompt_ids": [p for _, p, _, _ in rows], "references": [references[i] for i, *_ in rows],
                "max_new_tokens": self.data.max_new_tokens,
                "eos_token_id": end_ids(tokenizer, [a for *_, a, _ in rows]), SOURCE: [i for i, *_ in rows]}

    def epoch_metrics(self, trainer_metrics: dict, model, tokenizer, generate, batch_size: int,
                      labels: tuple) -> dict:
        import pandas as pd

        from lora_sweep.trial.metrics import generation_scores
        from lora_sweep.trial.tasks import perplexity

        loss = float(trainer_metrics["eval_loss"])
        row = {"eval_loss": loss, "eval_perplexity": perplexity(loss)}
        if generate is not None:  # None: the trial does not generate at this evaluation (data.generate_at)
            answers, capped = self.generate_counted(model, tokenizer, generate, batch_size)
            self.last_answers = answers
            self.last_generated, self.last_capped = len(answers), capped  # runner.run_trial records them
            row.update(generation_scores(answers, generate["references"]))
            shown = generate["prompt_ids"][:SAMPLE_ROWS]
            self.last_samples = pd.DataFrame({
                "prompt": tokenizer.batch_decode(shown, skip_special_tokens=True),
                "reference": generate["references"][:len(shown)], "output": answers[:len(shown)]})
        return row

    def references(self, generate: dict, labels: tuple) -> list[str]:
        """Per example (Task.example_outcomes, test_outcomes): label = the reference answer."""
        return list(generate["references"])

    @staticmethod
    def matches(answer: str, reference: str) -> bool:
        """correct = normalised exact match of the generated and the reference answer."""
        from lora_sweep.trial.metrics import exact_match

        return exact_match(answer, reference)


def length_counts(raw, encoded) -> dict:
    """kept / prompt_truncated / dropped of one split after data.max_length."""
    truncated = int(sum(encoded[TRUNCATED])) if len(encoded) else 0
    return {"kept": len(encoded), "prompt_truncated": truncated, "dropped": len(raw) - len(encoded)}

