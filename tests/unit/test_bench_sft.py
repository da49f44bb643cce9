"""lora_sweep.bench.sft: TRL's SFTTrainer against lora-sweep's trial path on tiny assets, both paths end to end."""

from __future__ import annotations

import math

import sys

import lm_assets
import pytest

if sys.version_info >= (3, 11):  # the dev extra installs TRL there: its absence is a failure, not a skip
    import trl  # noqa: F401
else:
    pytest.skip("TRL 1.16 needs Python >= 3.11", allow_module_level=True)

from lora_sweep.bench import sft  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread", "fresh_caches")]


@pytest.mark.parametrize("shape", ["prompt_completion", "messages"])
def test_both_paths_train_the_same_masked_tokens_and_ratios_are_computed(tmp_path, shape):
    tok = lm_assets.chat_tokenizer()
    model = lm_assets.save(lm_assets.tiny_llama_causal(tok, initializer_range=0.3), tok, tmp_path / "llama")
    rows = lm_assets.instruction_rows(16)
    if shape == "messages":
        rows = [{"messages": [{"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": r["completion"].strip()}]} for r in rows]
    source = lm_assets.write_jsonl(tmp_path / f"{shape}.jsonl", rows)
    result = sft.compare(str(model), str(source), steps=2, batch=4, max_length=40, trials=1, eval_size=4)

    runs = {r["path"]: r for r in result["runs"]}
    assert set(runs) == {"lora-sweep", "trl"} and result["settings"]["shape"] == shape
    for run in runs.values():
        assert run["steps"] == 2 and run["step_s"] > 0 and run["setup_s"] > 0 and math.isfinite(run["train_loss"])
    # same rows, batches, LoRA init and masks: the two trainers compute the same loss
    assert runs["trl"]["train_loss"] == pytest.approx(runs["lora-sweep"]["train_loss"], rel=1e-4)
    assert runs["trl"]["first_batch"] == runs["lora-sweep"]["first_batch"]
    masks = result["masks"]
    assert masks["agree"] and masks["trained_tokens_trl"] == masks["trained_tokens_lora_sweep"] == [2] * 4
    assert all(math.isfinite(result["ratios"]["all"][k]) and result["ratios"]["all"][k] > 0
               for k in ("setup", "step"))
    if shape == "messages":  # ChatML without {% generation %}: TRL refuses its own assistant-only mask
        assert result["trl_assistant_only_loss"].startswith("refused: ValueError")
    assert "TRL / lora-sweep" in sft.table(result)
