"""Generation metrics on instruction/chat data: normalised exact match, sacrebleu's chrF, and a tiny trial
through the objective that records them, the per-example predictions and the MLflow sample table."""

from __future__ import annotations

import copy
import json
from collections import Counter

import lm_assets
import optuna
import pytest
import sacrebleu

from lora_sweep import record
from lora_sweep.config import ConfigError, from_mapping
from lora_sweep.trial.metrics import exact_match, generation_scores, normalise

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]


def test_normalisation_strips_collapses_whitespace_and_casefolds():
    assert normalise("  The\tDay \n was  GREAT ") == "the day was great"
    assert normalise("Straße") == "strasse"  # casefold, not lower
    assert exact_match(" Positive\n", "positive") and exact_match("a  b", "A b")
    assert exact_match("Positive.", "positive") and exact_match("«don't»", "dont")  # punctuation goes
    assert not exact_match("positive!?x", "positive") and not exact_match("ab", "a b")


def test_generation_scores_are_exact_match_share_and_sacrebleu_corpus_chrf():
    refs = ["the day was good", "bad day", "Hello world"]
    hyps = ["The day  was good", "good day", "hello world "]
    scores = generation_scores(hyps, refs)
    assert scores["eval_exact_match"] == pytest.approx(2 / 3)  # the 1st and 3rd match after normalising
    assert scores["eval_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    # corpus-level: n-gram statistics pooled over the corpus, not a mean of sentence scores
    sentences = sum(sacrebleu.sentence_chrf(h, [r]).score for h, r in zip(hyps, refs)) / 3
    assert scores["eval_chrf"] != pytest.approx(sentences)
    # hand-computed ends: identical text scores 100, text sharing no character with its reference 0
    assert generation_scores(["abc def"], ["abc def"])["eval_chrf"] == pytest.approx(100.0)
    assert generation_scores(["xyz"], ["abc"]) == {"eval_exact_match": 0.0, "eval_chrf": 0.0}


@pytest.mark.usefixtures("one_thread", "fresh_caches")
def test_tiny_instruction_trial_records_generation_metrics_examples_and_sample_table(raw_config, tmp_path):
    from lora_sweep.run.objective import Objective
    from lora_sweep.search.space import SearchSpace
    from lora_sweep.tracking import Tracker
    from lora_sweep.trial.runner import check_data

    tok = lm_assets.chat_tokenizer()
    llama = lm_assets.save(lm_assets.tiny_llama_causal(tok, initializer_range=0.3), tok, tmp_path / "llama")
    source = lm_assets.write_jsonl(tmp_path / "pairs.jsonl", lm_assets.instruction_rows(32))
    raw = copy.deepcopy(raw_config)
    raw["model"]["name_or_path"] = str(llama)
    raw["data"].update({"name_or_path": str(source), "encoding": None, "train_size": 24, "eval_size": 8,
                        "max_length": 40, "generate_size": 6})
    raw["train"].update(num_train_epochs=2, device="cpu", learning_rate=3e-2, per_device_train_batch_size=8)
    raw["lora"].update(r=4, lora_alpha=8, task_type="CAUSAL_LM", lora_dropout=0.0, target_modules="all-linear")
    raw["study"] = {**raw["study"], "name": "chat", "metric": "eval_chrf", "direction": "maximize", "sampler": "grid"}
    raw["space"] = {"lora.r": "choice(4)"}
    config = from_mapping(raw)
    check_data(config.base, "eval_exact_match")
    with pytest.raises(ConfigError, match="study.metric='eval_accuracy'.*eval_exact_match, eval_chrf"):
        check_data(config.base, "eval_accuracy")

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "chat", tmp_path / "artifacts")
    parent = tracker.client.create_run(tracker.experiment_id).info.run_id
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.GridSampler({"lora.r": [4]}))
    study.optimize(Objective(config, SearchSpace(config), tracker, parent, "cpu", {}, planned=1), n_trials=1)

    rec = record.TrialRecord.from_trial(study.trials[0])
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE, rec.error
    # data.generate_at=auto: instruction data generates at the last evaluation only
    assert "eval_chrf" not in rec.epochs[0] and rec.epochs[-1]["eval_chrf"] == rec.eval_chrf
    assert 0 <= rec.eval_exact_match <= 1 and 0 <= rec.eval_chrf <= 100 and rec.eval_perplexity > 1

    frame = record.read_examples(record.examples_path(config.study_dir, 0))
    generated = frame[frame["prediction"].notna()]
    assert len(frame) == 8 and frame["loss"].notna().all() and len(generated) == 6
    assert set(generated["label"]) <= {" positive", " negative"}  # the reference completions
    assert generated["correct"].tolist() == [exact_match(p, r) for p, r in zip(generated["prediction"], generated["label"])]
    assert rec.eval_exact_match == pytest.approx(generated["correct"].mean())
    assert rec.eval_chrf == pytest.approx(sacrebleu.corpus_chrf(
        generated["prediction"].tolist(), [generated["label"].tolist()]).score)  # same answers, any order

    run_id = rec.mlflow_run_id
    tags = tracker.client.get_run(run_id).data.tags
    assert {"path": "generation_samples.json", "type": "table"} in json.loads(tags["mlflow.loggedArtifacts"])
    table = json.loads((tracker.client.download_artifacts(run_id, "generation_samples.json", str(tmp_path))
                        and tmp_path / "generation_samples.json").read_text())
    assert table["columns"] == ["prompt", "reference", "output"] and len(table["data"]) == 5
    assert all(p.startswith("Sentiment of :") for p, _, _ in table["data"])  # decoded prompt, BOS skipped
    pairs = Counter(zip(generated["label"], generated["prediction"]))  # the rows are generated examples
    assert not Counter((ref, out) for _, ref, out in table["data"]) - pairs


def test_report_columns_follow_instruction_data_and_findings_say_what_does_not_apply():
    import pandas as pd

    from lora_sweep import report
    from lora_sweep.report.findings import CHAT_FINDING, sweep_findings

    row = {"status": "complete", "eval_accuracy": None, "trainable_params": 100, "trainable_pct": 0.5,
           "peak_memory_mb": 10.0, "epoch_time_s": 2.0}
    df = pd.DataFrame([{**row, "trial": 0, "label": "r=4", "eval_exact_match": 0.625, "eval_chrf": 71.25,
                        "eval_perplexity": 1.5},
                       {**row, "trial": 1, "label": "r=8", "eval_exact_match": 0.75, "eval_chrf": 80.0,
                        "eval_perplexity": 1.25}])
    table = report.guide_table(df)
    assert list(table.columns)[:5] == ["Configuration", "Exact match (%)", "chrF", "Perplexity", "Trainable params"]
    assert table["Exact match (%)"].tolist() == ["62.5", "75.0"] and table["chrF"].tolist() == ["71.2", "80.0"]
    notes = " ".join(report.notes_lines(df))
    assert "casefolded" in notes and "corpus chrF" in notes and "95% CI" not in notes
    assert sweep_findings(df, 8) == [CHAT_FINDING]
    labelled = df.assign(eval_exact_match=None, eval_chrf=None, eval_accuracy=[0.5, 0.75])
    assert "Accuracy (%)" in report.guide_table(labelled).columns and CHAT_FINDING not in sweep_findings(labelled, 8)


def test_generate_at_is_one_rule_for_labelled_and_instruction_data(raw_config):
    from lora_sweep.trial.runner import generate_every

    def settings(at):
        raw = copy.deepcopy(raw_config)
        raw["data"]["generate_at"] = at
        return from_mapping(raw).base

    assert [generate_every(settings("auto"), shape) for shape in ("labelled", "prompt_completion", "messages")] == [
        True, False, False]
    assert generate_every(settings("every"), "messages") and not generate_every(settings("last"), "labelled")
    with pytest.raises(ConfigError, match="data.generate_at.*auto, every, last"):
        settings("sometimes")
