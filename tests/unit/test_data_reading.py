"""Reading data files (lora_sweep/trial/reading.py via data.load_splits): encodings, malformed records
counted and refused above data.max_bad_rows, broken csv and invalid JSON named by 1-based numbers."""

from __future__ import annotations

import json
import logging

import datasets
import pytest

from lora_sweep.config import ConfigError, DataConfig
from lora_sweep.trial import data, reading
from test_cli import assert_nothing_written, run_cli

ROWS = 40
TRAIN, EVAL = 20, 10


@pytest.fixture(autouse=True)
def own_cache(fresh_caches, tmp_path, monkeypatch):
    """Datasets saved by reading._on_disk go under tmp_path, not the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))


def tweets(n: int = ROWS, word: str = "caf\u00e9") -> list[list[str]]:
    return [["negative" if i % 2 else "positive", f"tweet {i} at the {word}"] for i in range(n)]


def write_csv(path, rows, encoding: str = "utf-8", header=("label", "text"), bom: bool = False):
    """rows joined by CRLF as a spreadsheet writes them; fields are written as given (no quoting)."""
    text = "\r\n".join(",".join(r) for r in [list(header), *rows]) + "\r\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    return path


def load(path, **overrides):
    settings = {"name_or_path": str(path), "label_column": "label", "labels": ("negative", "positive"),
                "train_size": TRAIN, "eval_size": EVAL, **overrides}
    return data.load_splits(DataConfig(**settings))


def texts(splits) -> set:
    return set(splits.train["text"]) | set(splits.eval["text"])


def refusal(path, **overrides) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path, **overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- encodings -----------------------------------------------------------------------------------

def test_utf8_csv_reads_as_utf8(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lora_sweep.trial.reading"):
        splits = load(write_csv(tmp_path / "t.csv", tweets()))
    assert splits.encoding == "utf-8"
    assert all(t.endswith("at the caf\u00e9") for t in texts(splits))
    assert [r.getMessage() for r in caplog.records if "read as" in r.getMessage()] == [
        f"Data: {tmp_path / 't.csv'} read as utf-8 (data.encoding=auto: the whole file decodes as UTF-8)"]


def test_utf8_bom_is_no_part_of_the_header(tmp_path):
    splits = load(write_csv(tmp_path / "t.csv", tweets(), bom=True))
    assert splits.encoding == "utf-8-sig"
    assert all(t.endswith("caf\u00e9") for t in texts(splits))
    assert texts(load(tmp_path / "t.csv", encoding="utf-8")) == texts(splits)  # no BOM in the first column's name
    # nor in a text file's first line, read as UTF-8 by data.encoding
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbf" + "\n".join(t for _, t in tweets()).encode("utf-8"))
    for encoding in ("auto", "utf-8"):
        source = reading.read_local(tmp_path / "t.txt", DataConfig(name_or_path="t.txt", encoding=encoding))
        assert source.ds[0]["text"] == "tweet 0 at the caf\u00e9"


@pytest.mark.parametrize("extra, expected", [("", "cp1252"), ("\x81", "latin-1")])
def test_latin1_file_detected_and_named(tmp_path, caplog, extra, expected):
    # 0x81 is no cp1252 character: then latin-1, which decodes every byte
    rows = tweets()
    rows[3][1] += extra
    with caplog.at_level(logging.INFO, logger="lora_sweep.trial.reading"):
        splits = load(write_csv(tmp_path / "t.csv", rows, encoding="latin-1"))
    assert splits.encoding == expected
    assert all("caf\u00e9" in t for t in texts(splits))
    (line,) = [r.getMessage() for r in caplog.records if "read as" in r.getMessage()]
    assert f"read as {expected} (data.encoding=auto: not UTF-8" in line


def test_cyrillic_windows_code_page_detected(tmp_path):
    rows = [[lab, f"Привет это сообщение номер {i} о погоде в Москве"] for i, (lab, _) in enumerate(tweets())]
    splits = load(write_csv(tmp_path / "t.csv", rows, encoding="cp1251"))
    assert splits.encoding == "cp1251"
    assert all(t.startswith("Привет") and t.endswith("Москве") for t in texts(splits))


def test_explicit_encoding_wins(tmp_path):
    splits = load(write_csv(tmp_path / "t.csv", tweets()), encoding="latin-1")
    assert splits.encoding == "latin-1"
    assert all(t.endswith("caf\u00c3\u00a9") for t in texts(splits))  # UTF-8 bytes read as latin-1


def test_undecodable_records_counted_under_an_explicit_encoding(tmp_path):
    lines = [",".join(r).encode("utf-8") for r in [["label", "text"], *tweets(word="bar")]]
    lines[8] = b"negative,caf\xe9 in latin-1"
    path = tmp_path / "t.csv"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    assert "record 8 does not decode as utf-8" in refusal(path, encoding="utf-8")
    assert load(path, encoding="utf-8", max_bad_rows=0.05).bad_rows == {"undecodable": 1}


# -- malformed records -----------------------------------------------------------------------------

def broken(tmp_path):
    """A csv with a carriage return inside a quoted field (fine), a line break in an unquoted field (the
    rest of that record becomes a fragment), an unquoted comma (extra fields) and an empty text."""
    rows = tweets()
    rows[2][1] = '"quoted\rline break"'
    rows[5][1] = "unquoted\rline break"
    rows[9][1] = "one, two"
    rows[12][1] = ""
    return write_csv(tmp_path / "broken.csv", rows)


def test_bad_records_counted_by_reason(tmp_path, caplog):
    path = broken(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lora_sweep.trial.reading"):
        splits = load(path, max_bad_rows=0.1)
    assert splits.bad_rows == {"csv fragment": 1, "extra csv fields": 1, "empty text": 1}
    (line,) = [r.getMessage() for r in caplog.records]
    assert "3 of 41 records malformed and set aside (1 csv fragment, 1 extra csv fields, 1 empty text" in line
    # the line break made 41 records of 40: the fragment is record 7
    assert "the first: record 7 is a csv fragment ('line break'" in line
    source = reading.read_local(path, DataConfig(name_or_path=str(path)))
    rows = source.ds.to_pandas().set_index(reading.ID)["text"]
    assert rows[2] == "quoted\rline break" and rows[5] == "unquoted" and rows[14] == "tweet 13 at the caf\u00e9"
    assert {6, 10} - set(rows.index) == {6, 10}  # ids stay record numbers from 0, bad records included


def test_refused_above_max_bad_rows(tmp_path):
    message = refusal(broken(tmp_path))
    assert message.startswith(f"data.name_or_path={str(tmp_path / 'broken.csv')!r}: record 7 is a csv fragment")
    assert "3 of 41 records malformed (1 csv fragment, 1 extra csv fields, 1 empty text), above " \
           "data.max_bad_rows=0.01" in message
    assert message.endswith("set data.max_bad_rows=0.074 to set them aside.")  # 3/41 = 0.0732 rounded up


def test_allowed_at_the_value_the_refusal_names(tmp_path):
    splits = load(broken(tmp_path), max_bad_rows=0.074)
    assert sum(splits.bad_rows.values()) == 3
    assert len(splits.train) == TRAIN and len(splits.eval) == EVAL


def test_rows_with_unlisted_labels_are_set_aside_not_bad(tmp_path):
    rows = tweets() + [["neutral", f"neutral tweet {i}"] for i in range(25)]
    splits = load(write_csv(tmp_path / "t.csv", rows))
    assert splits.bad_rows == {} and splits.set_aside == 25
    assert load(write_csv(tmp_path / "u.csv", rows), labels=None).set_aside == 0


def test_csv_quote_that_never_closes_is_refused(tmp_path):
    rows = tweets()
    rows[30][1] = '"opens a quote'
    message = refusal(write_csv(tmp_path / "t.csv", rows), max_bad_rows=1)
    assert "line 32 opens a quoted field that never closes, so it and the 9 lines after it" in message


# -- JSON ----------------------------------------------------------------------------------------

def write_jsonl(path, rows: list[dict], bad: dict[int, str]):
    lines = [json.dumps(r) for r in rows]
    for index, line in sorted(bad.items()):
        lines.insert(index, line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def labelled(n: int = ROWS) -> list[dict]:
    return [{"label": lab, "text": text} for lab, text in tweets(n)]


def test_invalid_json_line_named_by_its_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", labelled(), {4: '{"label": "positive", "text": }'})
    message = refusal(path)
    assert message.startswith(f"data.name_or_path={str(path)!r}: line 5 is not valid JSON (Expecting value, "
                              f"column 31); 1 of 41 records malformed (1 invalid JSON), above data.max_bad_rows")


def test_invalid_json_lines_within_max_bad_rows_are_dropped(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", labelled(), {4: "{oops", 9: "[1, 2]"})
    splits = load(path, max_bad_rows=0.05)
    assert splits.bad_rows == {"invalid JSON": 1, "not a JSON object": 1}
    assert len(texts(splits)) == TRAIN + EVAL and not {4, 9} & set(splits.eval_ids)


def test_clean_jsonl_reads_as_before(tmp_path):
    splits = load(write_jsonl(tmp_path / "t.jsonl", labelled(), {}))
    assert splits.bad_rows == {} and splits.encoding == "utf-8"
    assert texts(splits) <= {t for _, t in tweets()}


def test_cli_exits_2_on_bad_json_with_one_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", labelled(), {0: "not json"})
    proc = run_cli(tmp_path, f"data.name_or_path={path}", "data.label_column=label",
                   f"data.train_size={TRAIN}", f"data.eval_size={EVAL}")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"lora-sweep: error: data.name_or_path={str(path)!r}: line 1 is not valid JSON (Expecting "
                      f"value, column 1); 1 of 41 records malformed (1 invalid JSON), above data.max_bad_rows=0.01: "
                      f"fix them, or set data.max_bad_rows=0.025 to set them aside."]
    assert "Traceback" not in proc.stderr
    assert_nothing_written(tmp_path)


def test_csv_stray_quote_is_refused_not_merged_with_the_records_after_it(tmp_path):
    rows = tweets()
    rows[10][1] = '"quoted" then more'  # a quote closed mid-field: csv would glue the field together
    message = refusal(write_csv(tmp_path / "t.csv", rows), max_bad_rows=1)
    assert "line 12 is not valid csv" in message and "quotes around a whole field" in message


def test_splits_too_small_for_every_label_are_refused_in_one_line(tmp_path):
    message = refusal(write_csv(tmp_path / "t.csv", tweets()), train_size=1, eval_size=1)
    assert "data.train_size=1, data.eval_size=1: too small to hold each of the labels" in message
