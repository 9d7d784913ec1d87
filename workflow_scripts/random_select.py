"""Random selection, one method step: keep a seeded random share p of the training rows. The baseline every data
filter is compared with: its filter measures show what chance gives."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pyarrow as pa

from workflow_scripts.io import decisions_table, read_table, write_table
from workflow_scripts.methods import step_cli


@dataclass(frozen=True)
class RandomSelectOptions:
    p: float = 0.8  # share of rows kept: int(p * N), as SEAL's top-p
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.p <= 1:
            raise ValueError(f"random_select option 'p' must be in [0, 1], not {self.p}")


def random_select(table: pa.Table, opts: RandomSelectOptions) -> tuple[pa.Table, pa.Table]:
    """(kept rows in their input order, decisions). Each row's score is its seeded random draw; the int(p * N)
    highest draws are kept, as a score-based filter keeps its top p."""
    rng = random.Random(opts.seed)
    draws = [rng.random() for _ in range(table.num_rows)]
    keep = set(sorted(range(table.num_rows), key=lambda i: -draws[i])[:int(opts.p * table.num_rows)])
    kept = [i in keep for i in range(table.num_rows)]
    reasons = [f"random_select:{'kept' if k else 'dropped'}:p={opts.p}" for k in kept]
    out = table.filter(pa.array(kept, pa.bool_()))
    return out, decisions_table(table.column("id").to_pylist(), kept, reasons, draws)


def main(argv=None) -> None:
    args = step_cli(RandomSelectOptions, "random_select", __doc__, argv)
    opts = args.options
    out, decisions = random_select(read_table(args.input), opts)
    write_table(out, args.output)
    write_table(decisions, args.decisions)
    print(f"random_select: kept {out.num_rows} of {decisions.num_rows} rows -> {args.output}")


if __name__ == "__main__":
    main()
