"""Read a user's JSON, JSONL, CSV or Parquet file through a named preset or a field mapping and normalise
it to the canonical table (`id` + `messages`, optional `reference`/`category`/`source`), keeping only the
rows a `where` filter selects; also download files and Hugging Face Hub datasets.

Where an error says `row N`: for JSONL and CSV it is the 1-based line number in the file (the CSV header is
line 1), for JSON the 0-based index of the item in the list, for Parquet the 0-based row index (as in
`io.read_table`).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import http.client
import io as _stdio
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from workflow_scripts.io import (
    DataError,
    atomic_file,
    content_id,
    decisions_table,
    records_to_table,
    sha256_file,
    write_json,
    write_table,
)

FIELD_KEYS = ("id", "system", "prompt", "input", "response", "messages", "reference", "category")
FORMATS = ("json", "jsonl", "csv", "parquet")

# Each preset maps the canonical keys to the source columns it expects. Every preset also picks up `id`,
# `system`, `reference` and `category` columns when a record has them, so ids from the source survive and a
# canonical Parquet file reads back unchanged.
_COMMON = {"id": "id", "system": "system", "reference": "reference", "category": "category"}
PRESETS: dict[str, dict[str, str]] = {
    "alpaca": {**_COMMON, "prompt": "instruction", "input": "input", "response": "output"},
    "sharegpt": {**_COMMON, "messages": "conversations"},
    "messages": {**_COMMON, "messages": "messages"},
    "question_answer": {**_COMMON, "prompt": "question", "response": "answer"},
    "prompt_response": {**_COMMON, "prompt": "prompt", "response": "response"},
    # Anthropic HH-RLHF: `chosen`/`rejected` transcripts ("\n\nHuman: ...\n\nAssistant: ..."); the rejected side,
    # an unsafe source for harmful mixes, is `fields: {messages: rejected}`.
    "hh_rlhf": {**_COMMON, "messages": "chosen"},
    # HarmfulQA (declare-lab): `red_conversations` / `blue_conversations` each hold up to five ShareGPT
    # conversations keyed "0".."4"; the first non-empty one is the row. The red side's answers are the harmful ones
    # (an unsafe source, ForgetFilter's harmful noisy set); the blue side, `fields: {messages: blue_conversations}`.
    "harmfulqa": {**_COMMON, "messages": "red_conversations", "category": "topic"},
    # pile-detoxify (tomekkorbak): documents as lists of sentences (`texts`) with a toxicity score each (`scores`);
    # every sentence becomes a row (see SENTENCE_PROMPT) with its `toxicity`, which `where` selects on, e.g.
    # {toxicity: {">": 0.9}} for ForgetFilter's toxic noisy set and {toxicity: {"<": 0.1}} for the non-toxic one.
    "pile_detoxify": {**_COMMON, "prompt": "prompt", "response": "text"},
}
# The user turn of a pile_detoxify row: the text has no prompt of its own (the reference trains on the bare text).
SENTENCE_PROMPT = "Write a sentence."


def pile_sentences(rows: Iterator[tuple[int, object]], path: Path) -> Iterator[tuple[int, object]]:
    """One row per sentence of each pile-detoxify document, with the document's row number for error messages
    and the id `<document id or row>-<sentence>`."""
    for row, obj in rows:
        if not isinstance(obj, dict):
            yield row, obj
            continue
        texts, scores = obj.get("texts"), obj.get("scores")
        for field, value in (("texts", texts), ("scores", scores)):
            if not isinstance(value, list):
                raise DataError(path, row, field, f"expected a list (pile_detoxify), got {_kind(value)}")
        if len(texts) != len(scores):
            raise DataError(path, row, "scores", f"{len(scores)} scores for {len(texts)} texts")
        doc = obj.get("id", row)
        for k, (text, score) in enumerate(zip(texts, scores, strict=True)):
            yield row, {"id": f"{doc}-{k}", "prompt": SENTENCE_PROMPT, "text": text, "toxicity": score}
# prompt_response is the preset for eval sets, which have prompts only.
RESPONSE_REQUIRED = {"alpaca": True, "question_answer": True, "prompt_response": False}

# ShareGPT speakers; role/content turns are accepted too, so both chat presets read either turn shape.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
CHAT_ROLES = ("system", "user", "assistant")

# Tried in order when no preset is given; the first whose key column the first record has wins.
DETECT = (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
          ("question", "question_answer"), ("prompt", "prompt_response"))

DOWNLOAD_TIMEOUT_S = 60


# ---------------------------------------------------------------- reading raw rows


def infer_format(path: str | Path) -> str:
    """The format named by the suffix (.json, .jsonl, .csv, .parquet, each optionally .gz except Parquet)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv"),
                        (".parquet", "parquet"), (".pq", "parquet")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"{path}: cannot tell the format from the file name; "
                     f"pass fmt/--format ({', '.join(FORMATS)})")


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(path, None, None, f"not a valid gzip file ({e})") from None
    return data


def _decode(path: Path, data: bytes) -> tuple[str, bool]:
    """Text of the file and whether it held bytes that are not UTF-8.

    Bad bytes are kept as surrogate escapes so the caller can parse on and name the row and field that
    hold them.
    """
    if data.startswith(b"\xef\xbb\xbf"):  # a BOM, as spreadsheet exports write
        data = data[3:]
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="surrogateescape"), True


def _rows_jsonl(path: Path, text: str) -> Iterator[tuple[int, object]]:
    # Split on "\n" only: str.splitlines would also break at U+2028 and friends, which JSON text may hold raw.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, lineno, None, f"not valid JSON: {e.msg} (column {e.colno})") from None


def _rows_json(path: Path, text: str) -> Iterator[tuple[int, object]]:
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, None, None,
                        f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    yield from enumerate(_json_items(path, data))


def _json_items(path: Path, data: object) -> list:
    """The records of a JSON document: a list of objects; {"<any key>": [objects]} with a single key;
    or columns {"col": [values], ...} of equal length, where an empty list counts as an absent column
    (the SafeInstr evaluation files ship `"inputs": []`)."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if len(data) == 1 and isinstance(next(iter(data.values())), list):
            inner = next(iter(data.values()))
            if all(isinstance(x, dict) for x in inner):
                return inner
        if data and all(isinstance(v, list) for v in data.values()):
            columns = {k: v for k, v in data.items() if v}
            lengths = {k: len(v) for k, v in columns.items()}
            if len(set(lengths.values())) > 1:
                raise DataError(path, None, None, f"columns of different lengths: {lengths}")
            n = next(iter(lengths.values()), 0)
            return [{k: v[i] for k, v in columns.items()} for i in range(n)]
    raise DataError(path, None, None, 'expected a list of objects, {"key": [objects]} or '
                    f'{{"column": [values]}}, got a JSON {type(data).__name__}')


def _rows_csv(path: Path, text: str) -> Iterator[tuple[int, object]]:
    # Dialogues and documents can exceed csv's default 128 KiB cell limit.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.reader(_stdio.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    end = 0
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(path, reader.line_num or start, None, f"not valid CSV: {e}") from None
        end = reader.line_num
        if not cells:
            continue
        if header is None:
            header = cells
            dupes = sorted({c for c in header if header.count(c) > 1})
            if dupes:
                raise DataError(path, start, None, f"header repeats column(s) {dupes}")
            continue
        if len(cells) != len(header):
            raise DataError(path, start, None, f"has {len(cells)} fields, the header has {len(header)}")
        yield start, dict(zip(header, cells, strict=True))


def _rows_parquet(path: Path) -> Iterator[tuple[int, object]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, None, None, f"not a readable Parquet file ({e})") from None
    yield from enumerate(table.to_pylist())


def _raw_rows(path: Path, fmt: str) -> Iterator[tuple[int, object]]:
    if fmt == "parquet":
        yield from _rows_parquet(path)
        return
    text, bad_bytes = _decode(path, _read_bytes(path))
    parse = {"jsonl": _rows_jsonl, "json": _rows_json, "csv": _rows_csv}[fmt]
    if not bad_bytes:
        yield from parse(path, text)
        return
    # Parse everything first so the report names the first row and field with the bad bytes.
    rows = list(parse(path, text))
    for row, obj in rows:
        hit = _find_undecodable(obj)
        if hit is not None:
            field, value = hit
            raise DataError(path, row, field, f"not valid UTF-8 (bytes {_bad_bytes(value)})")
    raise DataError(path, None, None, "not valid UTF-8")


def _find_undecodable(obj: object, field: str | None = None) -> tuple[str | None, str] | None:
    if isinstance(obj, str):
        return (field, obj) if _has_surrogate(obj) else None
    if isinstance(obj, dict):
        for k, v in obj.items():
            name = str(k) if field is None else f"{field}.{k}"
            if isinstance(k, str) and _has_surrogate(k):
                return name, k
            hit = _find_undecodable(v, name)
            if hit:
                return hit
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            hit = _find_undecodable(v, f"{field}[{i}]")
            if hit:
                return hit
    return None


def _has_surrogate(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _bad_bytes(s: str) -> str:
    return " ".join(f"0x{ord(ch) - 0xDC00:02x}" for ch in s if "\udc80" <= ch <= "\udcff")[:40]


# ---------------------------------------------------------------- mapping rows to records


def resolve_mapping(preset: str | None, fields: dict[str, str | None] | None,
                    first_row: dict | None = None) -> tuple[str, dict[str, str], list[str]]:
    """(preset name, canonical key -> column, columns the user named explicitly).

    Without a preset: a mapping of `messages` means the messages preset, one of `prompt` prompt_response, and
    otherwise the preset is detected from the first record's columns.
    """
    fields = dict(fields or {})
    _check_options(preset, fields)
    if preset is None:
        if fields.get("messages"):
            preset = "messages"
        elif fields.get("prompt"):
            preset = "prompt_response"
        else:
            columns = set(first_row or ())
            preset = next((p for col, p in DETECT if col in columns), None)
            if preset is None:
                raise ValueError(f"no preset given and none fits the columns {sorted(columns)}; "
                                 f"pass a preset ({', '.join(PRESETS)}) or a field mapping")
    mapping = dict(PRESETS[preset])
    for key, column in fields.items():
        if column:
            mapping[key] = column
        else:  # an empty mapping switches a preset's column off
            mapping.pop(key, None)
    if "messages" in mapping and "prompt" in mapping:
        raise ValueError("map either messages or prompt (+ response), not both")
    return preset, mapping, list(dict.fromkeys(c for c in fields.values() if c))


def _check_options(preset: str | None, fields: dict) -> None:
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    unknown = sorted(set(fields) - set(FIELD_KEYS))
    if unknown:
        raise ValueError(f"unknown field key(s) {unknown}; known: {', '.join(FIELD_KEYS)}")


class _Mapper:
    def __init__(self, path: Path, preset: str, mapping: dict[str, str], explicit: list[str]):
        self.path, self.mapping, self.explicit = path, mapping, explicit
        self.response_required = RESPONSE_REQUIRED.get(preset, False)

    def record(self, row: int, obj: dict) -> dict:
        for column in self.explicit:
            if column not in obj:
                raise DataError(self.path, row, column,
                                f"missing (mapped column; the record has {sorted(map(str, obj))})")
        m = self.mapping
        system = self._text(row, obj, m.get("system"), required=False, what="the system prompt")
        if "messages" in m:
            messages = self._conversation(row, obj, m["messages"])
            if system and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system})
        else:
            prompt = self._text(row, obj, m["prompt"], required=True, what="the prompt")
            extra = self._text(row, obj, m.get("input"), required=False, what="the input")
            response = self._text(row, obj, m.get("response"), required=self.response_required,
                                  what="the response")
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt})
            if response is not None:
                messages.append({"role": "assistant", "content": response})
        rec = {"id": self._label(row, obj, m.get("id"), "the id"), "messages": messages}
        if rec["id"] is None and m.get("id") in self.explicit:
            raise DataError(self.path, row, m["id"], "empty (mapped as the id)")
        for key in ("reference", "category"):
            if key in m and (m[key] in obj or m[key] in self.explicit):
                rec[key] = self._label(row, obj, m[key], f"the {key}")
        return rec

    def _text(self, row: int, obj: dict, column: str | None, required: bool, what: str) -> str | None:
        if column is None:
            return None
        value = obj.get(column)
        if value is None:
            if required:
                why = "missing" if column not in obj else "null"
                raise DataError(self.path, row, column, f"{why} (required as {what})")
            return None
        if not isinstance(value, str):
            raise DataError(self.path, row, column, f"expected text for {what}, got {_kind(value)}")
        if not value.strip():
            if required:
                raise DataError(self.path, row, column, f"empty text (required as {what})")
            return None  # CSV spells an absent optional value as an empty cell
        return value

    def _label(self, row: int, obj: dict, column: str | None, what: str) -> str | None:
        # Ids and labels are often integers at the source (HH-RLHF `idx`, BBQ `label`); they become strings.
        value = obj.get(column) if column else None
        if value is None or value == "":
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError(self.path, row, column,
                            f"expected text or an integer for {what}, got {_kind(value)}")
        return str(value)

    def _conversation(self, row: int, obj: dict, column: str) -> list[dict]:
        value = obj.get(column)
        if value is None:
            raise DataError(self.path, row, column, "missing (required as the conversation)")
        if isinstance(value, str) and HH_TURN.match(value):
            return hh_transcript(value, self.path, row, column)
        if isinstance(value, str):  # CSV cells can only hold the conversation as JSON text
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise DataError(self.path, row, column, f"text that is not a JSON list ({e.msg})") from None
        if isinstance(value, dict) and all(v is None or isinstance(v, list) for v in value.values()):
            # several conversations by key (HarmfulQA): the first that is not empty
            keys = [k for k in sorted(value, key=lambda k: (len(str(k)), str(k))) if value[k]]
            if not keys:
                raise DataError(self.path, row, column, "no conversation (every one is empty)")
            column, value = f"{column}.{keys[0]}", value[keys[0]]
        if not isinstance(value, list):
            raise DataError(self.path, row, column, f"expected a list of turns, got {_kind(value)}")
        if not value:
            raise DataError(self.path, row, column, "empty conversation")
        messages = []
        for j, turn in enumerate(value):
            where = f"{column}[{j}]"
            if not isinstance(turn, dict):
                raise DataError(self.path, row, where, f"expected a turn object, got {_kind(turn)}")
            if "role" in turn or "content" in turn:
                role_key, content_key, roles = "role", "content", {r: r for r in CHAT_ROLES}
            elif "from" in turn or "value" in turn:
                role_key, content_key, roles = "from", "value", SHAREGPT_ROLES
            else:
                raise DataError(self.path, row, where, "a turn needs role/content (or from/value), "
                                f"got keys {sorted(turn)}")
            role, content = turn.get(role_key), turn.get(content_key)
            if role not in roles:
                raise DataError(self.path, row, f"{where}.{role_key}",
                                f"unknown role {role!r}; expected one of {sorted(roles)}")
            if not isinstance(content, str):
                raise DataError(self.path, row, f"{where}.{content_key}",
                                f"expected text, got {_kind(content)}")
            if not content.strip():
                raise DataError(self.path, row, f"{where}.{content_key}", "empty text")
            messages.append({"role": roles[role], "content": content})
        if not any(t["role"] == "user" for t in messages):
            raise DataError(self.path, row, column, "no user turn")
        return messages


HH_TURN = re.compile(r"\s*(Human|Assistant):\s")
HH_SPLIT = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def hh_transcript(text: str, path="<text>", row: int | None = None, column: str | None = None) -> list[dict]:
    """An HH-RLHF transcript as chat turns: `Human:` turns are the user's, `Assistant:` turns the assistant's,
    each stripped."""
    parts = HH_SPLIT.split(text.lstrip("\n"))
    # parts: ["", speaker, text, speaker, text, ...]
    messages = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
                for who, said in zip(parts[1::2], parts[2::2], strict=True)]
    if not messages or messages[0]["role"] != "user":
        raise DataError(path, row, column, "an HH-RLHF transcript must start with a Human: turn")
    # Some HH-RLHF turns are empty (the assistant said nothing): kept as they are, since dropping the turn or the
    # row would change what the data says.
    return messages


def _kind(value: object) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object",
             str: "text"}
    return names.get(type(value), type(value).__name__)


def read_records(path: str | Path, preset: str | None = None, fields: dict[str, str | None] | None = None,
                 fmt: str | None = None, source: str | None = None, id_prefix: str | None = None,
                 limit: int | None = None, where: dict | None = None) -> pa.Table:
    """Read `path` and return the canonical table; raise io.DataError on the first malformed row.

    `fields` maps canonical keys (id, system, prompt, input, response, messages, reference, category) to
    source columns and overrides the preset's (a key mapped to None or "" is switched off); a column named
    here must be present in every record. `id_prefix` goes before every id, from the source or a content
    hash. `where` keeps only the source rows it selects (see `where_mismatch`). `limit` keeps the first N
    records (later ones are not checked).
    """
    return read_filtered(path, preset, fields, fmt, source, id_prefix, limit, where)[0]


def read_filtered(path: str | Path, preset: str | None = None, fields: dict[str, str | None] | None = None,
                  fmt: str | None = None, source: str | None = None, id_prefix: str | None = None,
                  limit: int | None = None, where: dict | None = None) -> tuple[pa.Table, pa.Table]:
    """read_records plus the decisions table (id, kept, reason, score) of every source row read.

    A row that `where` drops is not checked; its id is the one it would have had, else the source's `id`
    column, else a hash of the raw row.
    """
    path = Path(path)
    _check_options(preset, fields or {})  # before reading, so a typo is not reported as bad data
    missing = set(check_where(where)) if where is not None else set()
    fmt = fmt or infer_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (for a dataset you supply yourself, such as gated HEx-PHI, "
                                "download it and point the dataset's `path:` in the config at it)")
    rows = _raw_rows(path, fmt)
    if preset == "pile_detoxify":
        rows = pile_sentences(rows, path)
    mapper: _Mapper | None = None
    records: list[dict] = []
    seen: dict[str, int] = {}
    decisions: list[tuple[str, bool, str]] = []
    for row, obj in rows:
        if not isinstance(obj, dict):
            raise DataError(path, row, None, f"expected an object, got {_kind(obj)}")
        if mapper is None:
            try:
                mapper = _Mapper(path, *resolve_mapping(preset, fields, obj))
            except ValueError as e:
                raise DataError(path, None, None, str(e)) from None
        missing -= obj.keys()
        why_not = where_mismatch(obj, where) if where else None
        if why_not is not None:
            decisions.append((_dropped_id(mapper, row, obj, id_prefix), False, f"where: {why_not}"))
            continue
        rec = mapper.record(row, obj)
        if rec["id"] is not None:
            rec["id"] = f"{id_prefix or ''}{rec['id']}"
            if rec["id"] in seen:
                raise DataError(path, row, mapper.mapping["id"],
                                f"duplicate id {rec['id']!r} (first at row {seen[rec['id']]})")
        else:
            rec["id"] = f"{id_prefix or ''}{content_id(rec['messages'])}"
            if rec["id"] in seen:
                # Content-hash ids collide only when two records hold the same conversation.
                raise DataError(path, row, "id", "duplicate record: same conversation as row "
                                f"{seen[rec['id']]} (content-hash id {rec['id']!r})")
        seen[rec["id"]] = row
        if source is not None:
            rec["source"] = source
        records.append(rec)
        decisions.append((rec["id"], True, "where: matches" if where else "no where filter"))
        if limit is not None and len(records) >= limit:
            break
    if not decisions:
        raise DataError(path, None, None, "no records (the file is empty)")
    for _, obj in rows if missing else ():  # stopped at the limit: look for the where fields in the rest
        if isinstance(obj, dict):
            missing -= obj.keys()
    if missing:
        raise DataError(path, None, sorted(missing)[0], "named in `where`, but no row has this field")
    if not records:
        raise DataError(path, None, None, f"no row matches where {json.dumps(where, default=str)} "
                        f"({len(decisions)} rows read, all dropped)")
    ids, kept, reasons = (list(c) for c in zip(*decisions, strict=True))
    return records_to_table(records), decisions_table(ids, kept, reasons, [None] * len(ids))


def _dropped_id(mapper: _Mapper, row: int, obj: dict, id_prefix: str | None) -> str:
    try:
        rec = mapper.record(row, obj)
        ident = rec["id"] if rec["id"] is not None else content_id(rec["messages"])
    except DataError:  # a dropped row is not checked, so it may not map
        raw_id = obj.get(mapper.mapping.get("id") or "id")
        ident = str(raw_id) if isinstance(raw_id, (str, int)) and raw_id != "" else _raw_hash(obj)
    return f"{id_prefix or ''}{ident}"


def _raw_hash(obj: dict) -> str:
    blob = json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8", errors="surrogateescape")).hexdigest()[:16]


# ---------------------------------------------------------------- row filter (`where`)


def check_where(where: object, at: str = "where") -> list[str]:
    """Raise ValueError unless `where` is {field: value, [values] or {">": x, ...}, not: {...}}; return the fields
    it names."""
    if not isinstance(where, dict) or not where:
        raise ValueError(f"{at}: expected a non-empty mapping of field to value (or list of values)")
    named = []
    for field, wanted in where.items():
        if field == "not":
            named += check_where(wanted, f"{at}.not")
            continue
        if isinstance(wanted, dict):
            bad = [k for k, v in wanted.items() if k not in COMPARISONS or isinstance(v, bool)
                   or not isinstance(v, (int, float))]
            if not wanted or bad:
                raise ValueError(f"{at}.{field}: a comparison maps {', '.join(COMPARISONS)} to numbers")
            named.append(str(field))
            continue
        values = wanted if isinstance(wanted, list) else [wanted]
        if not values or any(isinstance(v, (dict, list)) for v in values):
            raise ValueError(f"{at}.{field}: expected a value, a non-empty list of values or a comparison")
        named.append(str(field))
    return named


def where_mismatch(obj: dict, where: dict) -> str | None:
    """None when the source row matches `where`, else why not.

    `{field: value}` matches a row whose field equals the value; `{field: [a, b]}` one whose field is any of
    them; `{field: {">": x, "<=": y}}` one whose field is a number within the bounds; `{not: {...}}` a row that
    does not match the inner filter; several keys must all match. A row without the field does not match it (so
    `not` keeps it). Text from CSV matches numbers written the same.
    """
    for field, wanted in where.items():
        if field == "not":
            if where_mismatch(obj, wanted) is None:
                return f"matches not {json.dumps(wanted, default=str)}"
        elif field not in obj:
            return f"no field {field!r}"
        elif isinstance(wanted, dict):
            value = _number(obj[field])
            failed = [f"{op} {bound}" for op, bound in wanted.items()
                      if value is None or not COMPARISONS[op](value, bound)]
            if failed:
                return f"{field} is {_short(obj[field])}, not {' and '.join(failed)}"
        elif not any(_same(obj[field], w) for w in (wanted if isinstance(wanted, list) else [wanted])):
            return f"{field} is {_short(obj[field])}, not {'in ' if isinstance(wanted, list) else ''}{wanted!r}"
    return None


COMPARISONS = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
               "<=": lambda a, b: a <= b}


def _number(value: object) -> float | None:
    """A number for a comparison; CSV text that reads as one counts, anything else does not match."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _same(value: object, wanted: object) -> bool:
    if isinstance(value, bool) or isinstance(wanted, bool):
        return type(value) is type(wanted) and value == wanted
    if isinstance(value, str) and isinstance(wanted, (int, float)):
        return value == str(wanted)
    return value == wanted


def _short(value: object, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------- download


def download(url: str, dest: str | Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch `url` to `dest` through a temporary name, so an interrupted download leaves nothing at `dest`."""
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_file(dest, suffix=".part") as tmp:
            with open(tmp, "wb") as fh:
                while chunk := resp.read(1 << 20):
                    fh.write(chunk)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise RuntimeError(
            f"could not download {url} ({reason}); without network access, download the file yourself "
            f"and set the dataset's `path:` in the config to it"
        ) from e
    return dest


# ---------------------------------------------------------------- Hugging Face Hub datasets

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_PROBE_TIMEOUT_S = 5
# Errors (anywhere in the cause chain) that mean the Hub could not be reached. datasets and huggingface_hub have
# moved these between modules over versions, so they are matched by class name.
_UNREACHABLE = {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout",
                "TimeoutException", "TimeoutError", "gaierror"}
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def hub_token(token_env: str | None) -> str | None:
    """The token held by the environment variable named `token_env`; None leaves it to the library's login."""
    if not token_env:
        return None
    token = os.environ.get(token_env, "").strip()
    if not token:
        raise ValueError(f"token_env {token_env}: that environment variable is not set (export the token in it, "
                         "or drop token_env for a public dataset)")
    return token


def load_hub(name: str, config: str | None = None, split: str = "train", revision: str | None = None,
             token_env: str | None = None, cache_dir: str | None = None):
    """One split of a Hub dataset, loaded with the `datasets` library: (datasets.Dataset, provenance dict).

    `name` may also be a local folder: one written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`), or
    a folder of data files that `load_dataset` reads. Provenance: name, config, split, the requested revision
    and the commit sha it resolved to when the library reports one; never the token. A failure is a
    RuntimeError with a one-line message; without network it says how to use a local copy instead.

    When the Hub does not answer within HUB_PROBE_TIMEOUT_S, the library is put in offline mode (if it is not
    imported yet) so that it reads its cache at once instead of retrying for half a minute.
    """
    token = hub_token(token_env)
    offline = [v for v in OFFLINE_VARS if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    why = " and ".join(offline) + " set" if offline else "the Hub cannot be reached"
    if not offline and not Path(name).exists() and not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets

        folder = Path(name)
        sha = None
        if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"no split {split!r}; the dataset has {sorted(ds)}")
                ds = ds[split]
        else:
            builder = datasets.load_dataset_builder(name, config, revision=revision, token=token,
                                                    cache_dir=cache_dir)
            builder.download_and_prepare()
            ds = builder.as_dataset(split=split)
            sha = None if folder.exists() else _commit_sha(builder)
    except Exception as e:  # every failure becomes one line, with the token scrubbed
        raise RuntimeError(_hub_error(name, split, e, token, why)) from None
    info = {"hub": name, "config": config, "split": split, "revision": revision, "sha": sha,
            "rows": ds.num_rows, "columns": ds.column_names, "datasets_version": datasets.__version__}
    return ds, info


def _commit_sha(builder) -> str | None:
    # Hub datasets are cached under .../<config>/<version>/<commit sha>; the builder's hash is that sha.
    for candidate in (getattr(builder, "hash", None), Path(str(getattr(builder, "cache_dir", ""))).name):
        if isinstance(candidate, str) and _COMMIT_SHA.fullmatch(candidate):
            return candidate
    return None


def _hub_reachable() -> bool:
    """Whether the Hub endpoint answers at all (any HTTP status); honours HF_ENDPOINT and proxy variables."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError, http.client.HTTPException):  # URLError, timeouts, refused, a bad endpoint URL
        return False
    return True


def _hub_error(name: str, split: str, e: BaseException, token: str | None, why: str) -> str:
    chain: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    if any(cls.__name__ in _UNREACHABLE for x in chain for cls in type(x).__mro__):
        message = (f"Hub dataset {name!r} is not cached and {why}: download it where there is network "
                   f"(e.g. datasets.load_dataset({name!r}, split={split!r}).to_parquet('{Path(name).name}.parquet')) "
                   "and point the dataset's `path:` in the config at that local copy")
    else:
        message = f"could not load Hub dataset {name!r}: {type(e).__name__}: {e}"
    if token:
        message = message.replace(token, "***")
    return " ".join(message.split())


def download_hub(name: str, dest: str | Path, info_path: str | Path | None = None, **options) -> dict:
    """Load a Hub dataset split (see load_hub) and write it to `dest` as Parquet, its provenance to `info_path`
    (default: `dest` with a .json suffix), each through a temporary name. Returns the provenance."""
    dest = Path(dest)
    ds, info = load_hub(name, **options)
    with atomic_file(dest, suffix=".parquet") as tmp:
        ds.to_parquet(str(tmp))
    info["file"] = str(dest)
    info["sha256"] = sha256_file(dest)
    write_json(info, info_path or dest.with_suffix(".json"))
    return info


# ---------------------------------------------------------------- CLI


def _parse_fields(items: list[str]) -> dict[str, str | None]:
    fields: dict[str, str | None] = {}
    for item in items:
        key, sep, column = item.partition("=")
        if not sep:
            raise ValueError(f"--field {item!r}: expected key=column")
        fields[key.strip()] = column.strip() or None
    return fields


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflow_scripts.data", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--input", type=Path, help="file to normalise")
    mode.add_argument("--url", help="URL to download (with --download-to)")
    mode.add_argument("--hub", help="Hugging Face Hub dataset (or a local dataset folder) to save as Parquet "
                      "(with --download-to)")
    ap.add_argument("--download-to", type=Path, help="where --url or --hub is saved")
    ap.add_argument("--hub-config", help="--hub: the dataset's configuration (subset)")
    ap.add_argument("--split", default="train", help="--hub: the split (default: train)")
    ap.add_argument("--revision", help="--hub: branch, tag or commit")
    ap.add_argument("--token-env", help="--hub: environment variable holding the token for a gated dataset")
    ap.add_argument("--info", type=Path, help="--hub: provenance JSON to write (default: beside --download-to)")
    ap.add_argument("--format", choices=FORMATS, help="default: from the file name")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="default: detected from the columns")
    ap.add_argument("--field", action="append", default=[], metavar="KEY=COLUMN",
                    help=f"map a canonical key ({', '.join(FIELD_KEYS)}) to a column; KEY= unmaps it")
    ap.add_argument("--source", help="value of the `source` column")
    ap.add_argument("--id-prefix", help="put before every id")
    ap.add_argument("--limit", type=int, help="keep the first N records (after --where)")
    ap.add_argument("--where", type=json.loads, metavar="JSON",
                    help='keep the source rows it selects, e.g. \'{"label": ["safe"], "not": {"lang": "de"}}\'')
    ap.add_argument("--decisions", type=Path, help="decisions table (id, kept, reason, score) to write")
    ap.add_argument("--output", type=Path, help="canonical Parquet to write (omit to only validate)")
    args = ap.parse_args(argv)
    try:
        if args.url or args.hub:
            if args.download_to is None:
                ap.error(f"--{'url' if args.url else 'hub'} needs --download-to")
            if args.url:
                download(args.url, args.download_to)
                return 0
            os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # bars flood a job's log
            info = download_hub(args.hub, args.download_to, args.info, config=args.hub_config, split=args.split,
                                revision=args.revision, token_env=args.token_env)
            at = info["sha"] or info["revision"] or "its latest revision"
            print(f"{args.hub} ({info['config'] or 'default'}, {info['split']}) at {at}: {info['rows']} rows "
                  f"-> {args.download_to}")
            return 0
        table, decisions = read_filtered(args.input, preset=args.preset, fields=_parse_fields(args.field),
                                         fmt=args.format, source=args.source, id_prefix=args.id_prefix,
                                         limit=args.limit, where=args.where)
        if args.decisions:
            write_table(decisions, args.decisions)
        if args.output:
            write_table(table, args.output)
        if args.where:
            kept = sum(decisions.column("kept").to_pylist())
            print(f"{args.input}: where {json.dumps(args.where)}: kept {kept} of {decisions.num_rows} rows read, "
                  f"dropped {decisions.num_rows - kept}" + (f" -> {args.decisions}" if args.decisions else ""))
        print(f"{args.input}: {table.num_rows} records" + (f" -> {args.output}" if args.output else ""))
    except (ValueError, OSError, RuntimeError) as e:
        # One line, so a Snakemake log shows the whole error; a DataError already names file, row and field.
        message = str(e).replace("\r", "\\r").replace("\n", "\\n")
        print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(e, ValueError | OSError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
