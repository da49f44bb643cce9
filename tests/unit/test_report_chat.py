"""The report of an instruction/chat sweep, from constructed trials and per-example files (no training):
findings and recommendation from the paired engine (McNemar on exact match over the generated rows,
a paired bootstrap on chrF), exact match with its count and eval loss in the table, answers capped at
data.max_new_tokens, sample generations read back from the files beside the study, and the Data line
saying how the data was read."""

from __future__ import annotations

import types

import numpy as np
import optuna
import pandas as pd
import pytest
from markdown_it import MarkdownIt
from scipy.stats import binomtest

from lora_sweep import record, report
from lora_sweep.report import findings
from lora_sweep.report.frame import load_examples, load_samples, samples_path, trials_frame, write_samples

N, GENERATED = 40, 32   # eval examples, of which the first GENERATED were generated and scored
B, C = 9, 1             # discordant pairs: r=16 right and r=4 wrong, and the other way round
BOTH = 18               # both right


def correct_of(r: int) -> list:
    """Per example correctness: the first B examples only r=16 gets right, the next C only r=4, then BOTH
    both; None beyond GENERATED (never generated, so never scored)."""
    if r == 16:
        right = [True] * B + [False] * C + [True] * BOTH
    else:
        right = [False] * B + [True] * C + [True] * BOTH
    right += [False] * (GENERATED - len(right))
    return right + [None] * (N - GENERATED)


REFERENCES = [f"answer {i} | with a pipe" if i % 2 else f"answer {i}" for i in range(N)]


def examples_of(r: int, loss: float) -> pd.DataFrame:
    correct = correct_of(r)
    return pd.DataFrame({"example_id": np.arange(N), "label": REFERENCES,
                         "prediction": [None if c is None else REFERENCES[i] if c else f"wrong {i}"
                                        for i, c in enumerate(correct)],
                         "correct": pd.array(correct, dtype="boolean"), "loss": np.full(N, loss)})


def sample_table(r: int) -> pd.DataFrame:
    """Five rows as ChatLM keeps them: the decoded prompt (a system turn first), reference, output."""
    system = "system\nYou are a helpful assistant. " + "Answer briefly. " * 20
    prompts = [f"{system}\nuser\nQuestion {i} | a|b\nassistant\n" for i in range(5)]
    outputs = [REFERENCES[i] if correct_of(r)[i] else f"wrong {i}" for i in range(5)]
    return pd.DataFrame({"prompt": prompts, "reference": REFERENCES[:5], "output": outputs})


def chat_study(make_config, metric="eval_exact_match", capped=True, samples=True, name="chat"):
    """Two configurations (r=4, r=16), one run each under the same seed, as a sweep stores them."""
    config = make_config({"lora.r": "choice(4, 16)"}, lora={"task_type": "CAUSAL_LM"},
                         study={"name": name, "metric": metric, "direction": "maximize", "sampler": "grid"})
    study = optuna.create_study(direction="maximize")
    record.set_meta(study, {"task_type": "CAUSAL_LM", "model": "m", "data": "d.jsonl", "train_size": 80,
                            "eval_size": N, "max_length": 96, "labels": []})
    dist = {"lora.r": optuna.distributions.CategoricalDistribution([4, 16])}
    for r, loss, chrf in ((4, 0.21, 60.0), (16, 0.1375, 75.0)):
        frame = examples_of(r, loss)
        attrs = {"label": f"r={r}", "eval_exact_match": float(frame["correct"].dropna().mean()), "eval_chrf": chrf,
                 "eval_loss": loss, "eval_perplexity": float(np.exp(loss)), "trainable_params": 1000 * r,
                 "total_params": 100_000, "trainable_pct": r, "epoch_time_s": 2.0, "peak_memory_mb": 100.0,
                 "params": {"seed": 42}, "data_encoding": "latin-1 (detected)",
                 "bad_rows": {"invalid JSON": 1, "empty text": 1}, "rows_set_aside": 5,
                 **({"answers_generated": GENERATED, "answers_capped": r // 4 - 1} if capped else {})}
        study.add_trial(optuna.trial.create_trial(params={"lora.r": r}, distributions=dist, value=attrs.get(metric),
                                                  user_attrs=attrs))
        number = study.trials[-1].number
        record.write_examples(record.examples_path(config.study_dir, number), frame)
        if samples:
            write_samples(samples_path(config.study_dir, number), sample_table(r))
    return config, study


def tables(text: str) -> list[list[list[str]]]:
    """Every GFM table as rows of cells, the cell text as a reader sees it (inline markup rendered, escapes gone)."""
    md = MarkdownIt("commonmark").enable("table")
    out, rows, row = [], None, None
    for tok in md.parse(text):
        if tok.type == "table_open":
            rows = []
        elif tok.type == "tr_open":
            row = []
        elif tok.type == "inline" and row is not None:
            row.append("".join(c.content for c in tok.children if c.type in ("text", "code_inline")))
        elif tok.type == "tr_close":
            rows.append(row)
            row = None
        elif tok.type == "table_close":
            out.append(rows)
    return out


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0] if f"## {title}\n" in text else ""


def test_findings_and_pick_rest_on_mcnemar_over_the_generated_answers(make_config):
    config, study = chat_study(make_config)
    text = report.write_report(config, study).read_text()
    p = binomtest(C, B + C, 0.5).pvalue                      # exact McNemar: one comparison, so Holm leaves it
    v = findings.verdict_of(trials_frame(study), load_examples(config.study_dir, trials_frame(study)),
                            "eval_exact_match")
    r = v.results[0]
    assert (r.method, r.b, r.c, r.n) == ("McNemar", B, C, GENERATED)   # the scored rows only, not all N
    assert r.p == pytest.approx(p) and r.p_adj == pytest.approx(p)
    found = section(text, "Findings")
    assert f"r=16 beat r=4 by {100 * (B - C) / GENERATED:.1f} points" in found
    assert f"McNemar p={p:.2f}, Holm-adjusted; {GENERATED} paired examples" in found
    assert "per-example exact match: one seed a side: an exact McNemar test" in found
    assert findings.CHAT_FINDING not in found
    rec = section(text, "Recommendation")
    assert rec.startswith("\n**r=16** (trial #1): the cheapest configuration the paired tests (McNemar, Holm)")


def test_a_chrf_sweep_is_compared_by_paired_bootstrap_in_chrf_points(make_config):
    config, study = chat_study(make_config, metric="eval_chrf")
    found = section(report.write_report(config, study).read_text(), "Findings")
    assert "paired bootstrap p=" in found and " chrF (" in found and "McNemar" not in found
    assert "corpus chrF from summed per-example statistics" in found


def test_table_shows_exact_match_with_its_count_eval_loss_and_capped_answers(make_config):
    config, study = chat_study(make_config)
    text = report.write_report(config, study).read_text()
    header, *body = tables(text)[0]
    rows = [dict(zip(header, row)) for row in body]
    for row, r, loss in zip(rows, (4, 16), (0.21, 0.1375)):
        matched = sum(c is True for c in correct_of(r))
        assert row["Exact match (%)"] == f"{100 * matched / GENERATED:.1f} ({matched}/{GENERATED})"
        assert row["Eval loss"] == f"{loss:.4f}"
        assert row["Capped"] == f"{r // 4 - 1}/{GENERATED}"
    assert "data.max_new_tokens (64 tokens)" in text            # the note names the limit of this config
    older = chat_study(make_config, capped=False, name="older")  # studies before answers were counted: silent
    older_text = report.write_report(*older).read_text()
    assert "Capped" not in tables(older_text)[0][0] and "max_new_tokens" not in older_text


def test_samples_show_three_escaped_rows_per_configuration_and_the_data_line(make_config):
    config, study = chat_study(make_config)
    text = report.write_report(config, study).read_text()
    samples = section(text, "Sample generations")
    shown = tables(samples)
    assert len(shown) == 2 and [len(t) for t in shown] == [4, 4]        # header + 3 rows, one table per configuration
    assert all(t[0] == ["Prompt", "Reference", "Answer", "Match"] and all(len(row) == 4 for row in t) for t in shown)
    assert shown[0][2][1] == REFERENCES[1] and "|" in REFERENCES[1]       # a pipe inside the text, one cell
    prompt = shown[0][1][0]
    assert prompt.startswith("…") and prompt.endswith("Question 0 | a|b assistant") and len(prompt) <= 200
    for t, r in zip(shown, (4, 16)):  # r=4 misses the first examples, r=16 gets them
        assert [row[3] for row in t[1:]] == ["✓" if c else "✗" for c in correct_of(r)[:3]]
    assert "**r=4** (trial #0)" in samples and "**r=16** (trial #1)" in samples
    data = next(line for line in text.splitlines() if line.startswith("- **Data**"))
    assert data.endswith("read as latin-1 (detected); 2 malformed records set aside: 1 invalid JSON, 1 empty text; "
                         "5 rows with other labels left out by data.labels")
    bare = report.write_report(*chat_study(make_config, samples=False, name="none")).read_text()
    assert not section(bare, "Sample generations")  # no sample files (older studies): no section


def test_the_objective_stores_the_sample_table_the_report_reads(make_config, tmp_path):
    """The live path: Objective._finish writes result.samples beside the study, where load_samples finds it."""
    from lora_sweep.run.objective import Objective, _Run

    config, _ = chat_study(make_config, samples=False, name="live")
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    calls = []
    tracker = types.SimpleNamespace(**{k: (lambda *a, **kw: calls.append(a)) for k in (
        "log_metrics", "log_artifact", "log_table", "set_tags", "finish_trial")})
    objective = Objective.__new__(Objective)
    objective.config, objective.examples_dir, objective.tracker = config, config.study_dir, tracker
    objective.progress = types.SimpleNamespace(trial_finished=lambda *a: None)
    metrics = {"eval_exact_match": 0.5, "trainable_params": 1, "trainable_pct": 1.0, "peak_memory_mb": 1.0,
               "epoch_time_s": 1.0}
    result = types.SimpleNamespace(figures=types.SimpleNamespace(stored=lambda: {}), epochs=[], memory_kind="",
                                   batch_shapes={}, steps=[], evaluated_at_s=[], examples=None, test_examples=None,
                                   retention_examples=None, samples=sample_table(16), metrics=metrics)
    objective._finish(trial, types.SimpleNamespace(label="r=16"), _Run("t", "epoch", 1), result)
    study.tell(trial, 0.5)
    stored = load_samples(config.study_dir, trials_frame(study))
    pd.testing.assert_frame_equal(stored[trial.number].astype(object), sample_table(16).astype(object))
