"""A sweep's report: every metric against the swept axis (one line per method chain or other axis, 95% CI bands,
a ring on each point separated from the no-method line), a table of the same, and the filter measures of the
points whose data carried the `unsafe` ground truth. Writes results/sweeps/{sweep}/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workflow_scripts.filter_measures import measures_blocks
from workflow_scripts.io import DataError, atomic_file
from workflow_scripts.report import (
    COLORS,
    NOT_SEPARATED,
    _finite,
    _pyplot,
    _save,
    _scale,
    cell,
    fmt_value,
    load_result,
    separated,
    to_markdown,
)
from workflow_scripts.sweeps import line_label


def sweep_rows(results: list[str], points: dict[str, dict], x_axis: str) -> list[dict]:
    """One row per result file, with the point's x value and its line: the values of the other axes, joined."""
    rows = []
    for path in results:
        r = load_result(path)
        coords = points.get(r["experiment"])
        if coords is None:
            raise DataError(path, None, "experiment", "not a point of this sweep")
        r["x"] = coords[x_axis]
        r["line"] = line_label(coords, x_axis)
        rows.append(r)
    return rows


def mark_separated(rows: list[dict], baseline_line: str | None) -> list[dict]:
    """`separated_vs_baseline` on each row: whether its CI and the baseline line's at the same x and metric do not
    overlap (None on the baseline line itself, or where it has no point)."""
    base = {(r["metric"], r["x"]): r for r in rows if r["line"] == baseline_line}
    for r in rows:
        b = base.get((r["metric"], r["x"]))
        r["is_baseline"] = r["line"] == baseline_line
        r["delta_vs_baseline"] = (r["value"] - b["value"] if b is not None and not r["is_baseline"]
                                  and _finite(r["value"], b["value"]) else None)
        r["separated_vs_baseline"] = separated(r, b) if r["delta_vs_baseline"] is not None else None
    return rows


def plot_metric(rows: list[dict], metric: str, x_axis: str, path: str | Path, baseline_line: str | None) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    mine = [r for r in rows if r["metric"] == metric]
    k = _scale(mine[0]["unit"]) if mine else 100.0
    for i, line in enumerate(dict.fromkeys(r["line"] for r in mine)):
        pts = sorted((r for r in mine if r["line"] == line), key=lambda r: r["x"])
        xs = [r["x"] for r in pts]
        color = COLORS[i % len(COLORS)]
        ax.plot(xs, [r["value"] * k for r in pts], marker="o", color=color, lw=2 if line == baseline_line else 1.4,
                label=line + (" (no method)" if line == baseline_line else ""))
        ax.fill_between(xs, [r["ci_low"] * k for r in pts], [r["ci_high"] * k for r in pts], color=color, alpha=0.15)
        sep = [r for r in pts if r["separated_vs_baseline"]]
        ax.scatter([r["x"] for r in sep], [r["value"] * k for r in sep], s=160, facecolors="none",
                   edgecolors=color, linewidths=1.5)
    ax.set_xlabel(x_axis)
    ax.set_ylabel(f"{metric}, % (95% CI band)" if k == 100 else metric)
    title = f"{metric} against {x_axis}"
    if baseline_line:
        title += f"\n(ringed: separated from '{baseline_line}' at that {x_axis})"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def build(sweep: str, results: list[str], points: dict[str, dict], x_axis: str, baseline_line: str | None,
          out_dir: str | Path, filters: list[str] = ()) -> list[dict]:
    out_dir = Path(out_dir)
    rows = mark_separated(sweep_rows(results, points, x_axis), baseline_line)
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    blocks: list[tuple] = [("h1", f"Sweep {sweep}: metrics against {x_axis}")]
    if baseline_line:
        blocks.append(("p", f"Deltas against the `{baseline_line}` line at the same {x_axis}; {NOT_SEPARATED} = not "
                            "separated (the 95% CIs overlap)."))
    lines = list(dict.fromkeys(r["line"] for r in rows))
    xs = sorted(dict.fromkeys(r["x"] for r in rows))
    by = {(r["metric"], r["line"], r["x"]): r for r in rows}
    for m in metrics:
        blocks.append(("h2", m))
        blocks.append(("table", [x_axis] + lines, [[str(x)] + [cell(by.get((m, line, x))) for line in lines]
                                                    for x in xs]))
        plot_metric(rows, m, x_axis, out_dir / f"{m}.png", baseline_line)
    blocks += measures_blocks(list(filters), (x_axis, {e: str(c[x_axis]) for e, c in points.items()}))
    with atomic_file(out_dir / "summary.md") as tmp:
        tmp.write_text(to_markdown(blocks))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sweep", required=True)
    p.add_argument("--points_json", required=True, help='{"experiment": {"axis": value, ...}}')
    p.add_argument("--x", required=True, help="the axis on the x axis")
    p.add_argument("--baseline_line", default=None, help="the line the others are compared with (no method)")
    p.add_argument("--results", nargs="+", required=True)
    p.add_argument("--filters", nargs="*", default=[])
    p.add_argument("--out_dir", required=True)
    args = p.parse_args(argv)
    try:
        rows = build(args.sweep, args.results, json.loads(args.points_json), args.x, args.baseline_line,
                     args.out_dir, args.filters)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"sweep {args.sweep}: {len(rows)} results -> {args.out_dir}")
    for r in rows:
        print(f"  {r['experiment']} {r['metric']}: {fmt_value(r['value'], r['unit'])}")


if __name__ == "__main__":
    main()
