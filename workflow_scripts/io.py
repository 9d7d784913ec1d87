"""The on-disk contract between stages: canonical Parquet tables, decisions tables, atomic writes.

A record is `id` + `messages` (OpenAI chat format) plus optional typed columns; every stage reads and
writes through these helpers so a killed job never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
CANONICAL = pa.schema([("id", pa.string()), ("messages", pa.list_(MESSAGE))])
OPTIONAL_COLUMNS = {"reference": pa.string(), "category": pa.string(), "source": pa.string()}
DECISIONS = pa.schema([("id", pa.string()), ("kept", pa.bool_()), ("reason", pa.string()),
                       ("score", pa.float64())])
ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """Bad input, reported as `file: row N: field 'x': what is wrong`."""

    def __init__(self, file, row, field, problem):
        self.file, self.row, self.field, self.problem = str(file), row, field, problem
        where = f"{self.file}: row {row}" if row is not None else self.file
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {problem}")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_id(messages: list[dict]) -> str:
    """Stable id for a record without one: a hash of its conversation."""
    blob = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Like atomic_file for a directory: build it under a temporary name, then swap it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(obj, path: str | os.PathLike) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    """Write Parquet (zstd) atomically."""
    with atomic_file(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read a canonical table and check the contract: id + messages present, ids unique."""
    table = pq.read_table(path)
    for col in ("id", "messages"):
        if col not in table.column_names:
            raise DataError(path, None, col, "missing column")
    ids = table.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        for row, i in enumerate(ids):
            if i in seen:
                raise DataError(path, row, "id", f"duplicate id {i!r}")
            seen.add(i)
    return table


def records_to_table(records: Iterable[dict]) -> pa.Table:
    """Build a canonical table from dicts with id, messages and any optional columns."""
    records = list(records)
    columns: dict[str, list] = {"id": [r["id"] for r in records],
                                "messages": [r["messages"] for r in records]}
    fields = list(CANONICAL)
    extra = sorted({k for r in records for k in r} - {"id", "messages"})
    for key in extra:
        columns[key] = [r.get(key) for r in records]
        fields.append(pa.field(key, OPTIONAL_COLUMNS.get(key) or pa.array(columns[key]).type))
    return pa.Table.from_pydict(columns, schema=pa.schema(fields))


def decisions_table(ids: list[str], kept: list[bool], reasons: list[str], scores: list[float | None]) -> pa.Table:
    return pa.Table.from_pydict({"id": ids, "kept": kept, "reason": reasons, "score": scores},
                                schema=DECISIONS)


def shard_of(id_: str, n: int) -> int:
    """Stable shard of an id: the same id lands in the same shard on every run and machine."""
    return int(hashlib.sha256(id_.encode("utf-8")).hexdigest()[:8], 16) % n


def split_by_id(table: pa.Table, n: int) -> list[pa.Table]:
    """n shards by id hash, each keeping the input's relative order: any stage can scatter its rows this way."""
    if n < 1:
        raise ValueError("need at least one shard")
    shards = pa.array([shard_of(i, n) for i in table.column("id").to_pylist()], pa.int64())
    return [table.filter(pc.equal(shards, k)) for k in range(n)]


def merge_by_id(ids: list[str], shards: list[pa.Table], path: str = "<shards>", what: str = "shards") -> pa.Table:
    """The shards' rows as one table in the order of `ids` (the input's ids before the split). Every id must come
    back exactly once: a lost, repeated or unknown row is a DataError naming `path`."""
    table = pa.concat_tables(shards)
    got = table.column("id").to_pylist()
    where = {i: k for k, i in enumerate(got)}
    if len(where) != len(got) or len(got) != len(ids) or set(where) != set(ids):
        missing, extra = set(ids) - set(where), set(where) - set(ids)
        raise DataError(path, None, "id", f"{what} do not match the input: {len(got)} rows for {len(ids)} ids, "
                        f"{len(missing)} missing, {len(extra)} unknown, {len(got) - len(where)} repeated")
    return table.take(pa.array([where[i] for i in ids], pa.int64()))


def last_turn(messages: list[dict], role: str) -> int:
    """Index of the last message with `role`, or -1."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == role:
            return i
    return -1
