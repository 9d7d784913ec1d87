"""What every scorer CLI (score, judge, toxicity, bbq) shares: the `--generations`/`--seeds` arguments, reading
each seed's generation file, and writing the result JSON with its per-example Parquet beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from workflow_scripts.io import DataError, atomic_file, write_json

# Keys every result JSON carries (README "Seeds"); the report reads them from every metric alike.
RESULT_KEYS = ("metric", "value", "ci95", "n", "n_seeds", "per_seed", "seed_sd", "unit")


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """`--generations` (one Parquet per seed) and `--seeds` (each file's training seed, in the same order)."""
    parser.add_argument("--generations", nargs="+", required=True, help="one generation Parquet per seed")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="the training seed of each generation file, in the same order (default: 0, 1, ...)")


def seeded_files(paths: list, seeds: list[int] | None = None) -> list[tuple[int, str]]:
    """(seed, path) for each generation file; seeds default to 0, 1, ... ."""
    paths = [str(p) for p in paths]
    seeds = list(range(len(paths))) if seeds is None else list(seeds)
    if len(seeds) != len(paths):
        raise ValueError(f"{len(paths)} generation files ({' '.join(paths)}) but {len(seeds)} seeds "
                         f"({' '.join(map(str, seeds))}): give one seed per file, in the same order")
    if len(set(seeds)) != len(seeds):
        # Results group examples by seed: a repeated seed would pool two files into one seed's mean.
        raise ValueError(f"seeds {' '.join(map(str, seeds))} repeat a seed (generation files: {' '.join(paths)})")
    return list(zip(seeds, paths, strict=True))


def load_generations(paths: list, seeds: list[int] | None = None,
                     limit: int | None = None) -> list[tuple[int, str, list[dict], dict]]:
    """(seed, path, rows, generation settings) per generation file; seeds default to 0, 1, ...; `limit` keeps the
    first N rows of each file (the same prompts for every seed), for judging a sample when judging is costly."""
    out = []
    for seed, path in seeded_files(paths, seeds):
        table = pq.read_table(path)
        for col in ("id", "messages", "completion"):
            if col not in table.column_names:
                raise DataError(path, None, col, "missing column (not a generation file?)")
        rows = table.to_pylist()[:limit]
        seen: set[str] = set()
        for row_no, row in enumerate(rows):
            if row["id"] in seen:
                raise DataError(path, row_no, "id", f"duplicate id {row['id']!r}")
            seen.add(row["id"])
        out.append((seed, path, rows, generation_settings(table)))
    return out


def generation_settings(table: pa.Table) -> dict:
    """The generation parameters a generation file carries in its `safeft` schema metadata."""
    return json.loads((table.schema.metadata or {}).get(b"safeft", b"{}"))


def write_result(result: dict, examples: list[dict] | pa.Table, output: str | Path, name: str,
                 generations: list[tuple] | None = None, note: str = "", **fields) -> dict:
    """The epilogue of every scorer: the result JSON at `output` and its per-example rows at
    `X.examples.parquet`, each written to a temporary name and renamed (examples first, so a JSON that exists
    has its examples). After the scorer's own keys come `name`, `fields` in order, then, given `generations`,
    the first file's generation settings and the list of files. Prints a one-line summary (plus `note`)."""
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise ValueError(f"result for {name!r} lacks {', '.join(missing)} (every result has {', '.join(RESULT_KEYS)})")
    result = {**result, "name": name, **fields}
    if generations is not None:
        result["generation"] = generations[0][3]
        result["generation_files"] = [g[1] for g in generations]
    out = Path(output)
    table = examples if isinstance(examples, pa.Table) else pa.Table.from_pylist(examples)
    with atomic_file(out.with_suffix(".examples.parquet"), suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    write_json(result, out)
    lo, hi = result["ci95"]
    print(f"{name}: {result['value']:.4f} (95% CI {lo:.4f}-{hi:.4f}, n={result['n']}{', ' + note if note else ''})")
    return result
