"""Harmful-data mixes, one method step: n rows of which int(ratio * n) come from an unsafe dataset and the rest
from the task data, shuffled with a seed; or the task data with k rows of another dataset appended (SafeInstr:
safety examples added). Every row leaves with `source` (the dataset it came from) and a boolean `unsafe` (true for
rows of the unsafe dataset): the ground truth that later filters are measured against.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from workflow_scripts.io import DataError, decisions_table, read_table, records_to_table, write_table
from workflow_scripts.methods import step_cli


@dataclass(frozen=True)
class MixOptions:
    """A mix step's options. `unsafe` and `add` name datasets; the workflow hands the job their files
    (data/raw/<name>.parquet), whose stem is the rows' `source`."""

    unsafe: str | None = None
    ratio: float = 0.0
    n: int | None = None  # rows after mixing; default: as many as the task data has
    add: str | None = None
    k: int | None = None  # rows of `add` appended; default: all of them
    seed: int = 0

    def __post_init__(self):
        if self.unsafe is None and self.add is None:
            raise ValueError("mix needs option 'unsafe' (a dataset to mix in) or 'add' (a dataset to append)")
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"mix option 'ratio' must be in [0, 1], not {self.ratio}")
        if self.unsafe is None and self.ratio:
            raise ValueError("mix option 'ratio' needs 'unsafe'")
        for name in ("n", "k"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"mix option {name!r} must be >= 0")


def source_name(path: str | Path) -> str:
    return Path(path).name.removesuffix(".parquet")


def labelled(table: pa.Table, source: str, unsafe: bool) -> list[dict]:
    """Rows as dicts with `source` filled where the row has none and `unsafe` kept where a previous step set it."""
    rows = table.to_pylist()
    for row in rows:
        if not row.get("source"):
            row["source"] = source
        if row.get("unsafe") is None:
            row["unsafe"] = unsafe
    return rows


def sample(rows: list[dict], k: int, rng: random.Random, path: str, what: str) -> list[int]:
    """k distinct row numbers, in a seeded random order; asking for more rows than there are is an error."""
    if k > len(rows):
        raise DataError(path, None, None, f"the mix needs {k} {what} rows, the table has {len(rows)}")
    return rng.sample(range(len(rows)), k)


def mix(task: pa.Table, opts: MixOptions, task_source: str, unsafe: pa.Table | None = None,
        add: pa.Table | None = None, paths: dict[str, str] | None = None) -> tuple[pa.Table, pa.Table]:
    """(mixed table, decisions). Decisions: every task row (kept when sampled), then every added row (`kept`, its
    reason `mix:added_unsafe:<source>` or `mix:added:<source>`), so rows in + rows added = kept + dropped."""
    paths = paths or {}
    rng = random.Random(opts.seed)
    task_rows = labelled(task, task_source, False)
    decisions: list[tuple[str, bool, str]] = []
    if opts.unsafe is not None:
        n = len(task_rows) if opts.n is None else opts.n
        n_unsafe = int(opts.ratio * n)
        picked = sample(task_rows, n - n_unsafe, rng, paths.get("task", "<task>"), "task")
        unsafe_source = source_name(opts.unsafe)
        unsafe_rows = labelled(unsafe, unsafe_source, True)
        extra = [unsafe_rows[i] for i in sample(unsafe_rows, n_unsafe, rng, opts.unsafe, "unsafe")]
        for row in extra:
            row["unsafe"] = True  # the unsafe dataset's rows are unsafe whatever a column there says
        chosen = set(picked)
        decisions += [(r["id"], i in chosen, "mix:task" if i in chosen else "mix:not_sampled")
                      for i, r in enumerate(task_rows)]
        rows = [task_rows[i] for i in picked] + prefixed(extra, unsafe_source)
        decisions += [(r["id"], True, f"mix:added_unsafe:{unsafe_source}") for r in rows[len(picked):]]
        rng.shuffle(rows)
    else:
        rows = task_rows
        decisions += [(r["id"], True, "mix:task") for r in rows]
    if opts.add is not None:
        add_source = source_name(opts.add)
        add_rows = labelled(add, add_source, False)
        k = len(add_rows) if opts.k is None else opts.k
        appended = prefixed([add_rows[i] for i in sample(add_rows, k, rng, opts.add, "added")], add_source)
        rows += appended
        decisions += [(r["id"], True, f"mix:added:{add_source}") for r in appended]
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise DataError(paths.get("task", "<task>"), None, "id", "the mix repeats an id")
    out = records_to_table(rows)
    ids, kept, reasons = (list(x) for x in zip(*decisions, strict=True)) if decisions else ([], [], [])
    return out, decisions_table(ids, kept, reasons, [None] * len(ids))


def prefixed(rows: list[dict], source: str) -> list[dict]:
    """Rows from another dataset get ids `<source>/<id>`: stable, and never equal to a task row's id."""
    return [{**r, "id": f"{source}/{r['id']}"} for r in rows]


def main(argv=None) -> None:
    args = step_cli(MixOptions, "mix", __doc__, argv, lambda p: p.add_argument(
        "--task_source", required=True, help="`source` of the task rows: the training set's name"))
    opts = args.options
    try:
        unsafe = read_table(opts.unsafe) if opts.unsafe else None
        add = read_table(opts.add) if opts.add else None
        out, decisions = mix(read_table(args.input), opts, args.task_source, unsafe, add, {"task": args.input})
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    write_table(out, args.output)
    write_table(decisions, args.decisions)
    n_unsafe = sum(out.column("unsafe").to_pylist())
    print(f"mix: {out.num_rows} rows, {n_unsafe} unsafe -> {args.output}")


if __name__ == "__main__":
    main()
