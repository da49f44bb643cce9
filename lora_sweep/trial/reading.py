"""Reading a local data file so that nothing is misread or lost in silence.

Encoding (data.encoding=auto): UTF-8 where the whole file decodes as UTF-8 (a BOM means utf-8-sig);
otherwise charset-normalizer's guess, except that a guess among the single-byte Latin code pages
becomes the Western one: cp1252 where the whole file decodes as cp1252, else latin-1. charset-normalizer
cannot tell those code pages apart on mostly-ASCII text (it reads the shipped tweet corpus as
iso8859_10, a French cp1252 sample as cp1257), and a wrong pick among them changes letters silently;
non-Latin scripts (Cyrillic, Greek, CJK, UTF-16) keep its guess. An explicit data.encoding always wins.

Records: every record read is counted; malformed ones (csv fragments and extra fields, invalid JSON
lines, undecodable bytes; data.py adds empty texts and labels) are set aside with their reason, and
above data.max_bad_rows (a share of the records read) the load refuses with a ConfigError that names
the first one (1-based: the record, or the line of a JSON Lines file) and the setting that would allow
them. Record ids (the ID column) are 0-based record numbers in the file, bad records included, so a
clean file keeps the ids it always had.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from lora_sweep.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

ID = "__lora_sweep_example_id__"  # the source record number, carried through filtering and the split

FRAGMENT = "csv fragment"
EXTRA_FIELDS = "extra csv fields"
INVALID_JSON = "invalid JSON"
NOT_OBJECT = "not a JSON object"
UNDECODABLE = "undecodable"
EMPTY_TEXT = "empty text"
EMPTY_LABEL = "empty label"

_TEXT_SUFFIXES = (".csv", ".json", ".jsonl", ".txt")
_VERSION = 1  # of the reading below: a change to it must not reuse datasets saved by an older one
_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes the codec could not decode, kept by surrogateescape


@dataclass
class Source:
    """A dataset as read, with how it was read: the records seen and the malformed ones set aside."""
    ds: object                      # datasets.Dataset with the ID column
    name: str                       # data.name_or_path, for messages
    encoding: str = ""              # "" where not applicable (parquet, hub datasets)
    records: int = 0                # records read, malformed ones included
    bad: Counter = field(default_factory=Counter)   # reason -> count
    first_bad: tuple | None = None  # (record id, what is wrong with it) of the first malformed record
    lines: list | None = None       # JSON Lines: each record's 1-based line, by id

    def where(self, record_id: int) -> str:
        """A record as a user finds it: its line in a JSON Lines file, else its 1-based number."""
        return f"line {self.lines[record_id]}" if self.lines else f"record {record_id + 1}"

    def set_aside(self, reason: str, record_id: int, detail: str) -> None:
        self.bad[reason] += 1
        if self.first_bad is None or record_id < self.first_bad[0]:
            self.first_bad = (record_id, detail)


def read_local(path: Path, config: DataConfig) -> Source:
    """A local csv/json/jsonl/txt file decoded (see the module docstring) and parsed, or a parquet file."""
    import datasets

    suffix = path.suffix.lower()
    if suffix not in _TEXT_SUFFIXES:  # parquet: typed columns, no encoding
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        return Source(ds.add_column(ID, list(range(len(ds)))), config.name_or_path, records=len(ds))
    raw = path.read_bytes()
    encoding, how = choose_encoding(raw, config.encoding)
    text = raw.decode(encoding, "surrogateescape")
    text = text[1:] if text.startswith("\ufeff") else text  # a BOM is never content (pandas drops it too)
    log.info("Data: %s read as %s (%s)", config.name_or_path, encoding, how)
    reader = {".csv": _csv, ".txt": _txt}.get(suffix, _json)
    source = reader(path, text, encoding, config)
    source.encoding = encoding
    source.ds = _on_disk(source.ds, raw, (_VERSION, suffix, encoding, sorted(map(str, _read_columns(config)))))
    return source


def _on_disk(ds, raw: bytes, how: tuple):
    """ds saved once under datasets' cache folder, keyed by the file's bytes and how they were read, and
    memory-mapped from there: datasets then caches the split and filters across processes, as it did for
    its own csv reader (without, its stratified split alone costs seconds in every process)."""
    import datasets

    if ds.cache_files or not len(ds):  # datasets' own reader (cached already), or nothing to keep
        return ds
    digest = hashlib.sha256(raw)
    digest.update(repr(how).encode())
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "lora_sweep_reads" / digest.hexdigest()[:32]
    if not (folder / "state.json").exists():
        staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        ds.save_to_disk(str(staging))
        try:
            os.replace(staging, folder)  # whole or not at all for a process reading it at the same time
        except OSError:  # another process saved it first
            shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(str(folder))


def choose_encoding(raw: bytes, configured: str) -> tuple[str, str]:
    """(encoding, how it was chosen) for a file's bytes under data.encoding."""
    if configured != "auto":
        return configured, "data.encoding"
    if raw.startswith(codecs.BOM_UTF8):
        return "utf-8-sig", "data.encoding=auto: a UTF-8 byte order mark"
    try:
        raw.decode("utf-8")
        return "utf-8", "data.encoding=auto: the whole file decodes as UTF-8"
    except UnicodeDecodeError as error:
        not_utf8 = f"not UTF-8 (byte {raw[error.start]:#04x} at offset {error.start})"
    import charset_normalizer

    matches = list(charset_normalizer.from_bytes(raw))  # best first
    guess = matches[0] if matches else None
    decoded = raw.decode(guess.encoding, "replace") if guess is not None else ""
    if guess is not None and not (len(decoded) == len(raw) and _latin_script(decoded)):
        # Code pages of one script that it finds as plausible differ in a few letters (it ranks mac_cyrillic
        # above cp1251 on Russian, whose capitals then change): the Windows one is the common one.
        tied = [m.encoding for m in matches if m.percent_chaos == guess.percent_chaos]
        chosen = next((e for e in tied if re.fullmatch(r"cp125\d", e)), guess.encoding)
        return codecs.lookup(chosen).name, f"data.encoding=auto: {not_utf8}; detected by charset-normalizer"
    seen = f"charset-normalizer guessed {guess.encoding}" if guess else "charset-normalizer has no guess"
    try:
        raw.decode("cp1252")
        western = "cp1252"
    except UnicodeDecodeError:
        western = "latin-1"
    return western, (f"data.encoding=auto: {not_utf8}; {seen}, a Latin code page: the Western one that decodes "
                     f"it; set data.encoding if this is wrong")


def _latin_script(text: str) -> bool:
    """Whether every non-ASCII letter in text is a Latin one."""
    return all(unicodedata.name(c, "").startswith("LATIN") for c in set(text) if ord(c) > 127 and c.isalpha())


def _short(value) -> str:
    return repr(value if len(str(value)) <= 40 else str(value)[:40] + "...")


# -- csv -----------------------------------------------------------------------------------------

def _csv(path: Path, text: str, encoding: str, config: DataConfig) -> Source:
    """Records by Python's csv module (quoted fields may hold line breaks; a carriage return or a newline
    outside quotes ends a record, as in pandas), checked, then typed by pandas as datasets' csv reader did."""
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(lines, strict=True)  # a stray quote must stop, not merge the records after it
    try:
        return _csv_records(reader, lines, text, encoding, config)
    except csv.Error as error:
        if "unexpected end of data" in str(error):  # a quote opened and never closed: say where it opened
            _check_closed(lines[_record_start(lines):], _record_start(lines), config)
        raise ConfigError(f"data.name_or_path={config.name_or_path!r}: line {reader.line_num} is not valid csv "
                          f"({error}); allowed: quotes around a whole field, in pairs (a quote inside a "
                          f"field written twice).") from None


def _csv_records(reader, lines: list[str], text: str, encoding: str, config: DataConfig) -> Source:
    import datasets
    import pandas as pd

    header = next(reader, None)
    if not header:
        raise ConfigError(f"data.name_or_path={config.name_or_path!r}: the csv file has no header line; "
                          f"allowed: a header naming the columns, then one record per line.")
    width = len(header)
    read = _read_columns(config)
    # A record too short to hold a column the data is read from: the tail of a record a line break split.
    needed = max((i + 1 for i, name in enumerate(header) if name in read), default=width)
    undecoded = _UNDECODED.search(text) is not None
    source = Source(None, config.name_or_path, records=0)
    good, ids, start = [], [], reader.line_num
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):  # a blank line is no record (pandas skips it too)
            start = reader.line_num
            continue
        number = source.records
        source.records += 1
        if len(row) < needed:
            source.set_aside(FRAGMENT, number, f"record {number + 1} is a csv fragment ({_short(','.join(row))}: "
                             f"{len(row)} of the header's {width} fields; a line break in an unquoted field?)")
        elif len(row) > width:
            source.set_aside(EXTRA_FIELDS, number, f"record {number + 1} has {len(row)} fields, the header "
                             f"{width} ({_short(','.join(row))}; a comma in an unquoted field?)")
        elif undecoded and any(_UNDECODED.search(value) for value in row):
            source.set_aside(UNDECODABLE, number, f"record {number + 1} does not decode as {encoding} "
                             f"({_short(','.join(row))})")
        else:
            good.append(row)
            ids.append(number)
        last_start, start = start, reader.line_num
    if source.records:
        _check_closed(lines[last_start:], last_start, config)
    out = io.StringIO()
    csv.writer(out).writerows([header, *good])  # pandas types the columns as it did in datasets' csv reader
    out.seek(0)
    # Only an empty field is missing: a text reading "NA" or "null" is a text.
    frame = pd.read_csv(out, keep_default_na=False, na_values=[""]) if good else pd.DataFrame(columns=header)
    frame[ID] = ids
    source.ds = datasets.Dataset.from_pandas(frame, preserve_index=False)
    return source


def _record_start(lines: list[str]) -> int:
    """The line the last (unclosed) record starts on: the last line where non-strict csv starts one."""
    reader, start = csv.reader(lines), 0
    last = 0
    for _ in reader:
        last, start = start, reader.line_num
    return last


def _read_columns(config: DataConfig) -> set:
    return {config.text_column, config.label_column, config.prompt_column, config.completion_column,
            config.messages_column}


def _check_closed(lines: list[str], first_line: int, config: DataConfig) -> None:
    """The last record must not open a quote that never closes: the rest of the file would be one field."""
    try:
        list(csv.reader(lines, strict=True))
    except csv.Error as error:
        if "unexpected end of data" in str(error):
            raise ConfigError(f"data.name_or_path={config.name_or_path!r}: line {first_line + 1} opens a quoted "
                              f"field that never closes, so it and the {len(lines) - 1} lines after it would read "
                              f"as one field; allowed: quotes in pairs (a quote inside a field written twice).") from None


# -- JSON ----------------------------------------------------------------------------------------

def _json(path: Path, text: str, encoding: str, config: DataConfig) -> Source:
    """datasets' JSON reader (pyarrow: fast) for a clean UTF-8 file; where it fails, or for another
    encoding, the file read here, line by line for JSON Lines, so that a bad line is named or set aside."""
    import datasets

    source = Source(None, config.name_or_path)
    numbered = [(i + 1, line) for i, line in enumerate(text.split("\n")) if line.strip()]
    if codecs.lookup(encoding).name in ("utf-8", "utf-8-sig") and not _UNDECODED.search(text):
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own error line would precede ours
        try:
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as error:  # noqa: BLE001 - any failure is looked into below
            failure = error
        else:
            source.ds, source.records = ds.add_column(ID, list(range(len(ds)))), len(ds)
            source.lines = [n for n, _ in numbered] if len(numbered) == len(ds) else None
            return source
        finally:
            datasets.logging.set_verbosity(verbosity)
    else:
        failure = None
    rows = _json_document(text, config)
    if rows is None:
        rows = _json_lines(numbered, source, encoding)
    elif failure is not None:  # a valid JSON document datasets cannot turn into a table
        raise ConfigError(f"data.name_or_path={config.name_or_path!r}: valid JSON that datasets cannot read as "
                          f"a table ({_one_line(failure)}); allowed: JSON Lines, one object per line, or a list "
                          f"of objects.") from None
    else:
        source.records = len(rows)
    try:
        source.ds = datasets.Dataset.from_list(rows)
    except (TypeError, ValueError, ArithmeticError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"data.name_or_path={config.name_or_path!r}: records that do not make one table "
                          f"({_one_line(failure or error)}); allowed: each field of one type in every record.") from None
    return source


def _json_document(text: str, config: DataConfig) -> list | None:
    """The records of a file holding one JSON document (a list of objects), None for JSON Lines."""
    lines = [line for line in text.split("\n") if line.strip()]
    if text.lstrip().startswith("{") and len(lines) > 1:
        try:
            json.loads(lines[0])
        except json.JSONDecodeError:  # an object over several lines: one document, not JSON Lines
            if isinstance(_parsed(text), dict):
                raise ConfigError(f"data.name_or_path={config.name_or_path!r}: one JSON object, not records; "
                                  f"allowed: JSON Lines, one object per line, or a list of objects.") from None
        return None
    if not text.lstrip().startswith("["):
        return None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"data.name_or_path={config.name_or_path!r}: line {error.lineno} is not valid JSON "
                          f"({error.msg}, column {error.colno}); allowed: a list of objects, or JSON Lines.") from None
    if not all(isinstance(row, dict) for row in document):
        raise ConfigError(f"data.name_or_path={config.name_or_path!r}: a JSON list whose items are not all "
                          f"objects; allowed: a list of objects, or JSON Lines.")
    return [{**row, ID: i} for i, row in enumerate(document)]


def _json_lines(numbered: list, source: Source, encoding: str) -> list[dict]:
    """One record per non-blank line; lines that are not a JSON object set aside."""
    rows = []
    source.lines = [n for n, _ in numbered]
    source.records = len(numbered)
    for record, (number, line) in enumerate(numbered):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            source.set_aside(INVALID_JSON, record, f"line {number} is not valid JSON ({error.msg}, column "
                             f"{error.colno})")
            continue
        if _UNDECODED.search(line):
            source.set_aside(UNDECODABLE, record, f"line {number} does not decode as {encoding} ({_short(line)})")
        elif not isinstance(value, dict):
            source.set_aside(NOT_OBJECT, record, f"line {number} holds {_short(value)}, not a JSON object")
        else:
            rows.append({**value, ID: record})
    return rows


def _parsed(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _one_line(error: BaseException) -> str:
    cause = error.__cause__ or error.__context__ or error
    return " ".join(str(cause).split())[:200]


# -- plain text ----------------------------------------------------------------------------------

def _txt(path: Path, text: str, encoding: str, config: DataConfig) -> Source:
    """One text per line, as datasets' text reader splits them; blank lines separate texts and are no
    records (their ids stay counted, so ids are line numbers from 0, as before)."""
    import datasets

    source = Source(None, config.name_or_path)
    kept, ids = [], []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        source.records += 1
        if _UNDECODED.search(line):
            source.set_aside(UNDECODABLE, i, f"line {i + 1} does not decode as {encoding} ({_short(line)})")
        else:
            kept.append(line)
            ids.append(i)
    source.lines = range(1, len(lines) + 1)
    source.ds = datasets.Dataset.from_dict({"text": kept, ID: ids})
    return source


# -- the count -----------------------------------------------------------------------------------

def account(source: Source, config: DataConfig) -> dict:
    """The malformed records' counts (reason -> count), logged in one line; a ConfigError above
    data.max_bad_rows, before any training."""
    bad = sum(source.bad.values())
    if not bad:
        return {}
    counts = ", ".join(f"{n} {reason}" for reason, n in source.bad.most_common())
    if bad > config.max_bad_rows * source.records + 1e-9:
        raise ConfigError(f"data.name_or_path={config.name_or_path!r}: {source.first_bad[1]}; {bad} of "
                          f"{source.records} records malformed ({counts}), above data.max_bad_rows="
                          f"{config.max_bad_rows}: fix them, or set data.max_bad_rows="
                          f"{allowing(bad, source.records)} to set them aside.")
    log.warning("Data: %s: %d of %d records malformed and set aside (%s; the first: %s), within "
                "data.max_bad_rows=%s", config.name_or_path, bad, source.records, counts, source.first_bad[1],
                config.max_bad_rows)
    return dict(source.bad)


def allowing(bad: int, records: int) -> str:
    """The share bad/records rounded up to two significant digits (at least two places): it allows them."""
    share = Fraction(bad, records)
    places = max(2, 1 - math.floor(math.log10(share)))
    return f"{math.ceil(share * 10 ** places) / 10 ** places:.{places}f}".rstrip("0").rstrip(".")
