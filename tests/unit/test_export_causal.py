"""`export` of lora.task_type=CAUSAL_LM sweeps (instruction pairs, labelled prompts) on a tiny LLaMA:
a fresh process regenerates the stored eval answers (same prompts, batches, left padding) and must
match them exactly; the card's code, run as printed in a fresh process, loads the adapter with plain
peft and transformers; a changed stored answer makes the check fail."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import lm_assets
import pandas as pd
import pytest
from omegaconf import OmegaConf

from lora_sweep import record
from lora_sweep.cli import run
from lora_sweep.config import from_mapping
from test_export import _export

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches"),
              pytest.mark.slow]  # two tiny sweeps and fresh-process checks, ~30 s: CI runs them, make test-fast skips


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    tok = lm_assets.chat_tokenizer()
    lm_assets.save(lm_assets.tiny_llama_causal(tok, initializer_range=0.3), tok, root / "llama")
    lm_assets.write_jsonl(root / "pairs.jsonl", lm_assets.instruction_rows(40))
    lm_assets.sentiment_csv(root / "sentiment.csv", n=40)
    return root


def _raw(raw_config, assets, name, source, **data):
    raw = copy.deepcopy(raw_config)
    raw["model"]["name_or_path"] = str(assets / "llama")
    raw["data"].update({"name_or_path": str(assets / source), "encoding": None, "train_size": 24, "eval_size": 8,
                        "max_length": 40, "retention_size": 0, **data})
    raw["train"].update(num_train_epochs=1, device="cpu", learning_rate=3e-2, per_device_train_batch_size=8,
                        per_device_eval_batch_size=3)  # 3: batches of unequal prompt lengths, left-padded
    raw["lora"].update(r=4, lora_alpha=8, task_type="CAUSAL_LM", lora_dropout=0.0, target_modules="all-linear")
    raw["study"] = {**raw["study"], "name": name, "metric": "eval_loss", "direction": "minimize"}
    raw["space"] = {"lora": {"r": "choice(4)"}}
    return raw


def _generated(raw) -> pd.DataFrame:
    frame = record.read_examples(record.examples_path(from_mapping(raw).study_dir, 0))
    return frame[frame["prediction"].notna()]


def test_instruction_sweep_exports_and_its_answers_regenerate_identically(raw_config, assets, tmp_path, capsys):
    raw = _raw(raw_config, assets, "pairs", "pairs.jsonl")
    assert run(OmegaConf.create(raw)) == 0
    generated = _generated(raw)
    assert len(generated) == 8
    dest = tmp_path / "out"
    code, out, err = _export(raw, capsys, dest=str(dest))
    assert code == 0, err
    assert "8/8 generated answers identical to the trial's own per-example results" in out, out

    meta = json.loads((dest / "lora_sweep_export.json").read_text())
    assert meta["base"] == str(assets / "llama") and meta["format"] == "prompt_completion"
    assert meta["threads"] == 1 and meta["eval_batch_size"] == 3
    card = (dest / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained(base, **extra)" in card and "tokenizer.padding_side = 'left'" in card

    # The card's code as printed, in a fresh process: the adapter loads on the base with plain peft and
    # transformers, and so does AutoPeftModelForCausalLM from adapter_config.json's base_model_name_or_path.
    code_block = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    check = code_block + (
        "from peft import AutoPeftModelForCausalLM\n"
        "print(type(model).__name__, bool(model.peft_config['default'].target_modules))\n"
        "print(type(AutoPeftModelForCausalLM.from_pretrained(folder)).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["PeftModelForCausalLM", "True", "PeftModelForCausalLM"], proc.stdout
    assert "lora_sweep" not in code_block

    # Sabotage: one stored answer changed -> the regenerated answers differ from it -> nothing exported.
    path = record.examples_path(from_mapping(raw).study_dir, 0)
    frame = record.read_examples(path)
    first = frame["prediction"].first_valid_index()
    frame.loc[first, "prediction"] = frame.loc[first, "prediction"] + " changed"
    record.write_examples(path, frame)
    code, out, err = _export(raw, capsys, dest=str(tmp_path / "sabotaged"))
    assert code == 1 and "1 of 8 generated answers differ" in err, err[-2000:]
    assert not (tmp_path / "sabotaged").exists()


def test_labelled_prompt_sweep_exports(raw_config, assets, tmp_path, capsys):
    raw = _raw(raw_config, assets, "labelled", "sentiment.csv", label_column="label", labels=None, generate_size=6)
    assert run(OmegaConf.create(raw)) == 0
    assert len(_generated(raw)) == 6
    code, out, err = _export(raw, capsys, dest=str(tmp_path / "out"))
    assert code == 0, err
    assert "6/6 generated answers identical to the trial's own per-example results" in out, out
