"""Collect results/{exp}/*.json into results/report/summary.parquet and a one-table summary.md with CIs and
deltas against a baseline experiment.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa

from workflow_scripts.io import atomic_file, write_table


def collect(paths: list[str]) -> list[dict]:
    """One row per (experiment, metric) from results/{exp}/{metric}.json files."""
    rows = []
    for p in paths:
        p = Path(p)
        r = json.loads(p.read_text())
        rows.append({"experiment": p.parent.name, "metric": p.stem, "value": r["value"],
                     "ci_low": r["ci95"][0], "ci_high": r["ci95"][1], "n": r["n"], "n_seeds": r["n_seeds"],
                     "scorer": r.get("metric")})
    return rows


def add_deltas(rows: list[dict], baseline: str | None) -> list[dict]:
    base = {r["metric"]: r["value"] for r in rows if r["experiment"] == baseline}
    for r in rows:
        r["delta_vs_baseline"] = r["value"] - base[r["metric"]] if r["metric"] in base else None
    return rows


def _fmt(value: float, scorer: str | None) -> str:
    return f"{value:.1f}" if scorer == "rouge1" else f"{100 * value:.1f}%"


def markdown(rows: list[dict], experiments: list[str], baseline: str | None, notes: dict | None = None) -> str:
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    by = {(r["experiment"], r["metric"]): r for r in rows}
    head = "| experiment | " + " | ".join(f"{m} (95% CI)" for m in metrics) + " |"
    lines = ["# SafeFT summary", "", head, "|" + "---|" * (len(metrics) + 1)]
    for exp in experiments:
        cells = []
        for m in metrics:
            r = by.get((exp, m))
            if r is None:
                cells.append("-")
                continue
            cell = (f"{_fmt(r['value'], r['scorer'])} ({_fmt(r['ci_low'], r['scorer'])}-"
                    f"{_fmt(r['ci_high'], r['scorer'])}), n={r['n']}")
            if r["delta_vs_baseline"] is not None and exp != baseline:
                d = r["delta_vs_baseline"]
                cell += f", {'+' if d >= 0 else ''}{d * (1 if r['scorer'] == 'rouge1' else 100):.1f}"
            cells.append(cell)
        label = f"{exp} (reference)" if exp == baseline else exp
        if notes and notes.get(exp):
            label += f": {notes[exp]}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "safe_rate: share of harmful prompts refused (keyword rule). Deltas are in percentage points "
              f"against `{baseline}`. Intervals are 95% percentile bootstrap CIs over prompts (and seeds)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", nargs="+", required=True)
    ap.add_argument("--experiments", nargs="+", required=True, help="row order")
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--notes_json", default="{}", help='{"exp": "one-line description"}')
    ap.add_argument("--parquet", required=True)
    ap.add_argument("--markdown", required=True)
    args = ap.parse_args(argv)
    rows = add_deltas(collect(args.results), args.baseline)
    write_table(pa.Table.from_pylist(rows), args.parquet)
    text = markdown(rows, args.experiments, args.baseline, json.loads(args.notes_json))
    with atomic_file(args.markdown) as tmp:
        tmp.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
