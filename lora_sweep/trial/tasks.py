"""What differs between lora.task_type SEQ_CLS, CAUSAL_LM and SEQ_2_SEQ_LM, one class each:
the model class, how examples become tokens, how batches are padded, and what is measured.

- SEQ_CLS: a classification head reads the text; eval_accuracy, eval_f1 (macro), eval_loss.
- CAUSAL_LM, labelled data: the model reads `data.prompt` ("Sentiment of: {text} ->") and is trained
  to write " <label>" + EOS, with the loss on those answer tokens only. Every epoch it also greedily
  generates an answer for the eval prompts: eval_accuracy is the share whose answer is exactly the
  label (eval_f1 its macro F1), next to eval_loss and eval_perplexity = exp(eval_loss).
- CAUSAL_LM, plain text (data.label_column=null): language modelling on every token; eval_loss and
  eval_perplexity.
- SEQ_2_SEQ_LM: the encoder reads the prompt, the decoder writes the label; same metrics as labelled
  CAUSAL_LM.

After training, example_outcomes gives the final evaluation one row per eval example
(lora_sweep.record.EXAMPLE_COLUMNS): SEQ_CLS reads them off the last evaluation's logits; the
language-model tasks take the last generated answers and compute each example's loss in one more
pass over the eval set (counted as evaluation time). test_outcomes gives the held-out test split
(data.test_size) the same rows, scored once after training: SEQ_CLS by one prediction pass, the
language-model tasks by generating answers to its first data.generate_size prompts, then the losses.
"""

from __future__ import annotations

import math

from lora_sweep.config import DataConfig

IGNORE = -100  # label id the loss skips (prompt tokens, padding)


def get_task(task_type: str, data: DataConfig | None = None) -> "Task":
    """The task for lora.task_type; `data` may be left out where only the model class is wanted
    (instruction/chat data: lora_sweep.trial.chat.get_task)."""
    return {"SEQ_CLS": SequenceClassification, "CAUSAL_LM": CausalLM, "SEQ_2_SEQ_LM": Seq2SeqLM}[task_type](data)


class Task:
    task_type = ""
    auto_class = ""                # the transformers Auto class that loads the model
    prediction_loss_only = True    # the Trainer gathers no logits (a vocabulary's worth per token)

    def __init__(self, data: DataConfig | None):
        self.data = data
        self.labelled = data is None or (data.label_column is not None and data.format != "text")

    last_answers: list | None = None  # the last evaluation's generated answers (language-model tasks)

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def model_kwargs(self, labels: tuple) -> dict:
        return {}

    def encode(self, dataset, tokenizer, labels: tuple):
        """Raw split (text[, labels]) -> tokenized dataset the Trainer consumes."""
        raise NotImplementedError

    def generation_set(self, dataset, tokenizer, labels: tuple):
        """Eval examples whose answer is generated each epoch (None: this task generates nothing)."""
        return None

    def collator(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        # Pads input_ids/attention_mask with the tokenizer and labels with IGNORE, for both LM kinds.
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)

    def compute_metrics(self):
        return None

    def epoch_metrics(self, trainer_metrics: dict, model, tokenizer, generate, batch_size: int,
                      labels: tuple) -> dict:
        """The row reported for one epoch: eval_loss and perplexity, plus generated-label scores."""
        loss = float(trainer_metrics["eval_loss"])
        row = {"eval_loss": loss, "eval_perplexity": perplexity(loss)}
        if generate is not None:
            predictions = self.generate_answers(model, tokenizer, generate, batch_size)
            self.last_answers = predictions
            row.update(label_scores(predictions, [str(labels[i]) for i in generate["labels"]], labels))
        return row

    def example_outcomes(self, trainer, eval_set, eval_ids, generate, labels: tuple):
        """The final evaluation per example (a DataFrame of lora_sweep.record.EXAMPLE_COLUMNS, None
        without ids). Labelled: prediction = the generated answer, correct = exact match, for the
        generated examples (the first data.generate_size); plain text has a loss only."""
        if eval_ids is None:
            return None
        answers = self.last_answers if generate is not None else None
        return self.outcomes(trainer, eval_set, eval_ids, generate, answers, labels)

    def test_outcomes(self, trainer, test_set, test_ids, test_generate, labels: tuple, tokenizer, batch_size: int):
        """The held-out test split per example (EXAMPLE_COLUMNS, as example_outcomes gives for eval),
        scored once by the final model: answers generated for test_generate's prompts (None: none),
        then every example's loss. Leaves last_answers (the eval answers) as they were."""
        if test_ids is None:
            return None
        answers = (self.generate_answers(trainer.model, tokenizer, test_generate, batch_size)
                   if test_generate is not None else None)
        return self.outcomes(trainer, test_set, test_ids, test_generate, answers, labels)

    def outcomes(self, trainer, dataset, ids, generate, answers, labels: tuple):
        """Per example of `dataset` (ids in its order): its loss, and where `answers` (to generate's
        prompts) were generated, the reference, the answer and whether they match."""
        references = self.references(generate, labels) if generate is not None and answers is not None else []
        done = list(generate["example_ids"]) if references else []
        return outcome_frame(ids, example_losses(trainer, dataset, self.shifted), dict(zip(done, references)),
                             dict(zip(done, answers or [])), self.matches)

    def references(self, generate: dict, labels: tuple) -> list[str]:
        """What a generated answer is compared with: the label's name."""
        return [str(labels[i]) for i in generate["labels"]]

    @staticmethod
    def matches(answer: str, reference: str) -> bool:
        return answer == reference

    shifted = True  # decoder-only: token t predicts label t + 1

    def generate_answers(self, model, tokenizer, generate: dict, batch_size: int) -> list[str]:
        """Greedy answers to generate["prompt_ids"] (generate_counted without the count)."""
        return self.generate_counted(model, tokenizer, generate, batch_size)[0]

    def generate_counted(self, model, tokenizer, generate: dict, batch_size: int) -> tuple[list[str], int]:
        """(answers, capped): greedy answers to generate["prompt_ids"], left-padded in batches, each ending
        at one of generate["eos_token_id"] (where given; else the model's own EOS) or after
        generate["max_new_tokens"] tokens; capped counts the answers that hit that cap without ending
        (0 where no eos_token_id list is given: the labelled tasks' cap is their longest label)."""
        import torch

        prompts, cap = generate["prompt_ids"], generate["max_new_tokens"]
        stop = list(generate.get("eos_token_id") or [])
        extra = {"eos_token_id": stop} if stop else {}  # generate takes a list: any of them ends a sequence
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out, capped = [], 0
        try:
            with torch.no_grad():
                for i in range(0, len(prompts), batch_size):
                    batch = tokenizer.pad({"input_ids": prompts[i:i + batch_size]}, padding_side="left",
                                          return_tensors="pt").to(device)
                    generated = model.generate(**batch, max_new_tokens=cap, do_sample=False,
                                               pad_token_id=tokenizer.pad_token_id, **extra)
                    new = self.new_tokens(generated, batch)
                    if stop and new.shape[1] >= cap:  # a shorter batch ended every answer before the cap
                        capped += int((~torch.isin(new, torch.tensor(stop, device=new.device))).all(-1).sum())
                    out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        finally:
            model.train(was_training)
        return out, capped

    def new_tokens(self, generated, batch):
        return generated[:, batch["input_ids"].shape[1]:]  # decoder-only: the prompt comes back first


class SequenceClassification(Task):
    task_type = "SEQ_CLS"
    auto_class = "AutoModelForSequenceClassification"
    prediction_loss_only = False

    def model_kwargs(self, labels: tuple) -> dict:
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {label: i for i, label in enumerate(labels)}}

    def encode(self, dataset, tokenizer, labels: tuple):
        max_length = self.data.max_length
        return dataset.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length),
                           batched=True, remove_columns=["text"])

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    last_eval: tuple | None = None  # the last evaluation's (logits, label ids), in the eval set's order

    def compute_metrics(self):
        from lora_sweep.trial.metrics import classification_metrics

        def metrics(p):
            self.last_eval = (p.predictions, p.label_ids)
            return classification_metrics(p.predictions, p.label_ids)

        return metrics

    def example_outcomes(self, trainer, eval_set, eval_ids, generate, labels: tuple):
        """The last evaluation's logits per example: the predicted label, correctness, cross-entropy."""
        if eval_ids is None or self.last_eval is None:
            return None
        return logit_frame(*self.last_eval, eval_ids, labels)

    def test_outcomes(self, trainer, test_set, test_ids, test_generate, labels: tuple, tokenizer, batch_size: int):
        """The test split per example, from one prediction pass of the final model (the Trainer's eval
        batches, in test_set's order). Its compute_metrics overwrites last_eval: call this after
        example_outcomes."""
        if test_ids is None:
            return None
        out = trainer.predict(test_set)
        return logit_frame(out.predictions, out.label_ids, test_ids, labels)

    def epoch_metrics(self, trainer_metrics: dict, model, tokenizer, generate, batch_size: int,
                      labels: tuple) -> dict:
        return {k: float(v) for k, v in trainer_metrics.items() if k in ("eval_accuracy", "eval_loss", "eval_f1")}


def logit_frame(logits, gold, ids, labels: tuple):
    """A classifier's per-example rows (EXAMPLE_COLUMNS) from its logits and the gold label ids, in
    the order of `ids`: the predicted label, correctness, cross-entropy."""
    import numpy as np
    import pandas as pd

    logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits, dtype=np.float64)
    gold = np.asarray(gold).astype(int)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    predicted = logits.argmax(-1)
    names = [str(label) for label in labels]
    return pd.DataFrame({"example_id": list(ids), "label": [names[i] for i in gold],
                         "prediction": [names[i] for i in predicted], "correct": predicted == gold,
                         "loss": -log_probs[np.arange(len(gold)), gold]})


def outcome_frame(ids, losses: list, references: dict, answers: dict, matches):
    """A language model's per-example rows (EXAMPLE_COLUMNS), in the order of `ids`: label = the
    reference and prediction = the answer where one was generated (`answers`: example id -> answer),
    correct = matches(answer, reference) there and null (NA) everywhere else. Correctness is computed
    here from the python values, before pandas sees them: a None put in a pandas 3 string column reads
    back as NaN, which a `p is None` test misses and whose text "nan" matches another NaN's."""
    import pandas as pd

    ids = list(ids)
    correct = [matches(answers[i], references[i]) if i in answers else None for i in ids]
    return pd.DataFrame({"example_id": ids,
                         "label": pd.array([references.get(i) for i in ids], dtype="string"),
                         "prediction": pd.array([answers.get(i) for i in ids], dtype="string"),
                         "correct": pd.array(correct, dtype="boolean"),
                         "loss": pd.array(losses, dtype="float64")})


class CausalLM(Task):
    task_type = "CAUSAL_LM"
    auto_class = "AutoModelForCausalLM"

    def encode(self, dataset, tokenizer, labels: tuple):
        if not self.labelled:
            return dataset.map(lambda b: self._plain(b, tokenizer), batched=True, remove_columns=["text"])
        answers = self._answers(tokenizer, labels)
        longest = max(map(len, answers))

        def encode(batch):
            ids, targets = [], []
            for prompt, label in zip(self._prompts(batch["text"], tokenizer, longest), batch["labels"]):
                ids.append(prompt + answers[label])
                targets.append([IGNORE] * len(prompt) + answers[label])  # loss on the answer only
            return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": targets}

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names)

    def generation_set(self, dataset, tokenizer, labels: tuple):
        if not self.labelled:
            return None
        longest = max(map(len, self._answers(tokenizer, labels)))
        part = dataset.select(range(min(self.data.generate_size or len(dataset), len(dataset))))
        return {"prompt_ids": self._prompts(part["text"], tokenizer, longest), "labels": list(part["labels"]),
                "max_new_tokens": longest}

    def _answers(self, tokenizer, labels: tuple) -> list[list[int]]:
        # " positive" + EOS: the leading space is how the label follows "->" in running text, and
        # EOS teaches the model to stop, so that the generated answer can match the label exactly.
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return [tokenizer(f" {label}", add_special_tokens=False)["input_ids"] + eos for label in labels]

    def _prompts(self, texts, tokenizer, answer_budget: int) -> list[list[int]]:
        """Prompt tokens, tokenized whole (so special tokens sit where the tokenizer puts them); a text
        too long for data.max_length is shortened, not the template around it, so the answer still fits."""
        limit = max(1, self.data.max_length - answer_budget)

        def fill(text):
            return self.data.prompt.replace("{text}", text)

        texts = [str(t) for t in texts]
        out = tokenizer([fill(t) for t in texts])["input_ids"]
        for i, ids in enumerate(out):
            if len(ids) > limit:
                words = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
                short = tokenizer.decode(words[:max(0, len(words) - (len(ids) - limit))])
                out[i] = tokenizer(fill(short))["input_ids"][:limit]  # [:limit]: a re-tokenization may differ
        return out

    def _plain(self, batch, tokenizer):
        enc = tokenizer(batch["text"], truncation=True, max_length=self.data.max_length)
        enc["labels"] = [list(ids) for ids in enc["input_ids"]]  # the model shifts them itself
        return enc


class Seq2SeqLM(CausalLM):
    task_type = "SEQ_2_SEQ_LM"
    auto_class = "AutoModelForSeq2SeqLM"

    def encode(self, dataset, tokenizer, labels: tuple):
        answers = self._answers(tokenizer, labels)

        def encode(batch):
            ids = self._prompts(batch["text"], tokenizer, 0)
            return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                    "labels": [answers[label] for label in batch["labels"]]}

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names)

    def generation_set(self, dataset, tokenizer, labels: tuple):
        longest = max(map(len, self._answers(tokenizer, labels)))
        part = dataset.select(range(min(self.data.generate_size or len(dataset), len(dataset))))
        return {"prompt_ids": self._prompts(part["text"], tokenizer, 0), "labels": list(part["labels"]),
                "max_new_tokens": longest}

    def _answers(self, tokenizer, labels: tuple) -> list[list[int]]:
        # The label's tokens + EOS, without the BOS a LLaMA-style tokenizer would put first (T5's
        # tokenizer, given text_target, produces exactly "positive</s>" too).
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return [tokenizer(str(label), add_special_tokens=False)["input_ids"] + eos for label in labels]

    def new_tokens(self, generated, batch):
        return generated  # the decoder's output is the answer alone

    shifted = False  # the decoder's token t predicts label t


def end_ids(tokenizer, answers: list[list[int]]) -> list[int]:
    """The tokens that end a generated answer: the tokenizer's EOS and the special token that closes
    each trained answer (EOS after a completion; the chat template's end of turn, e.g. ChatML's
    <|im_end|>, after a rendered assistant turn), so generation stops where training taught it to."""
    special = set(tokenizer.all_special_ids) | {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                                                if getattr(t, "special", False)}
    special.discard(tokenizer.unk_token_id)  # an unknown word inside the answer ends nothing
    out = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for answer in answers:
        last = next((t for t in reversed(answer) if t in special), None)
        if last is not None and last not in out:
            out.append(last)
    return out


def example_losses(trainer, eval_set, shifted: bool) -> list[float]:
    """Each eval example's mean loss over its labelled tokens (the final model, the Trainer's own
    eval batches and collator; one forward pass over the eval set)."""
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for batch in trainer.get_eval_dataloader(eval_set):
                batch = trainer._prepare_inputs(batch)
                labels = batch["labels"]
                with trainer.compute_loss_context_manager():
                    # seq2seq: the labels make the decoder's inputs; decoder-only: they are not needed
                    logits = model(**(batch if not shifted else {k: v for k, v in batch.items() if k != "labels"})).logits
                if shifted:
                    logits, labels = logits[:, :-1], labels[:, 1:]
                token_loss = torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                    reduction="none").view(labels.shape)
                counted = (labels != IGNORE).sum(-1)
                out += (token_loss.sum(-1) / counted.clamp(min=1)).tolist()
    finally:
        model.train(was_training)
    return out


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def label_scores(predictions: list[str], gold: list[str], labels: tuple) -> dict:
    """Exact-match accuracy of generated labels, and their macro F1 over the task's labels (an answer
    that is no label at all counts as wrong for its example's class)."""
    from sklearn.metrics import f1_score

    correct = sum(p == g for p, g in zip(predictions, gold))
    return {"eval_accuracy": correct / len(gold) if gold else float("nan"),
            "eval_f1": float(f1_score(gold, predictions, labels=[str(label) for label in labels],
                                      average="macro", zero_division=0)) if gold else float("nan")}
