"""Collect results/{exp}/{metric}.json into results/report/: summary.parquet, summary.md / report.md / summary.html
(tables with 95% CIs, deltas against a baseline marked when they are not separated, pairwise separation) and plots.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from workflow_scripts.io import DataError, atomic_file, write_table

REQUIRED = ("value", "ci95", "n", "n_seeds")
RUNTIME_SCHEMA = pa.schema([("rule", pa.string()), ("jobs", pa.int64()), ("seconds", pa.float64()),
                            ("max_seconds", pa.float64()), ("peak_rss_mb", pa.float64()), ("share", pa.float64())])
NOT_SEPARATED = "†"
ROW_SCHEMA = pa.schema([
    ("experiment", pa.string()), ("metric", pa.string()), ("scorer", pa.string()), ("unit", pa.string()),
    ("value", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("n", pa.int64()),
    ("n_seeds", pa.int64()), ("per_seed", pa.list_(pa.struct([("seed", pa.string()), ("value", pa.float64())]))),
    ("seed_sd", pa.float64()), ("is_baseline", pa.bool_()), ("delta_vs_baseline", pa.float64()),
    ("separated_vs_baseline", pa.bool_()), ("note", pa.string()),
])


# ---------------------------------------------------------------------------------------------- rows and separation
def load_result(path: str | Path) -> dict:
    """One summary row from results/{exp}/{metric}.json; the experiment and metric come from the path."""
    path = Path(path)
    try:
        r = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, None, None, f"cannot read results JSON: {err}") from err
    for key in REQUIRED:
        if key not in r:
            raise DataError(path, None, key, "missing")
    ci = r["ci95"]
    if not (isinstance(ci, list) and len(ci) == 2):
        raise DataError(path, None, "ci95", f"expected [low, high], got {ci!r}")
    scorer = r.get("metric")
    per_seed = r.get("per_seed") or {}
    return {"experiment": path.parent.name, "metric": path.stem, "scorer": scorer,
            "unit": r.get("unit") or ("percent" if scorer == "rouge1" else "fraction"),
            "value": _num(r["value"]), "ci_low": _num(ci[0]), "ci_high": _num(ci[1]), "n": int(r["n"]),
            "n_seeds": int(r["n_seeds"]),
            "per_seed": [{"seed": str(s), "value": _num(v)} for s, v in per_seed.items()],
            "seed_sd": _num(r.get("seed_sd")), "is_baseline": False, "delta_vs_baseline": None,
            "separated_vs_baseline": None, "note": None}


def _num(x) -> float | None:
    return None if x is None else float(x)


def _finite(*xs) -> bool:
    return all(x is not None and not math.isnan(x) for x in xs)


def collect(paths: list[str]) -> list[dict]:
    """One row per (experiment, metric) from results/{exp}/{metric}.json files (manifest.json is skipped)."""
    return [load_result(p) for p in paths if Path(p).name != "manifest.json"]


def judge_rows(paths: list[str]) -> list[dict]:
    """The judged results (LLM judges and guards): who judged, how answers were read, what did not parse, and
    the agreement with the keyword rule where the scorer reports it."""
    out = []
    for path in paths:
        path = Path(path)
        if path.name == "manifest.json":
            continue
        r = json.loads(path.read_text())
        if "judge" not in r:
            continue
        kappa = (r.get("agreement_with_keyword") or {}).get("cohen_kappa")
        out.append({"experiment": path.parent.name, "metric": path.stem, "judge": r["judge"].get("model"),
                    "answer": r.get("answer_mode") or r["judge"].get("kind") or "generate",
                    "unparsed": f"{r.get('n_unparsed', 0)} of {r.get('n_total', r.get('n'))}",
                    "kappa": "n/a" if kappa is None else f"{kappa:.2f}"})
    return out


def judge_blocks(rows: list[dict]) -> list[tuple]:
    if not rows:
        return []
    return [("h2", "Judges"),
            ("table", ["experiment", "metric", "judge", "answers read by", "unparsed", "kappa vs keyword rule"],
             [[r["experiment"], r["metric"], r["judge"], r["answer"], r["unparsed"], r["kappa"]] for r in rows]),
            ("p", "A judge is only as good as its model: a small local model (the demo's 135M SmolLM2) runs the "
                  "machinery but is a weak judge, whatever share of its answers parse. Kappa is Cohen's agreement "
                  "with the keyword refusal rule on the same completions (1 = full agreement, 0 = chance).")]


def separated(a: dict, b: dict) -> bool:
    """True when the two rows' 95% CIs do not overlap; touching intervals (a.high == b.low) count as overlapping,
    and a row without a finite CI is never separated from anything."""
    if not _finite(a["ci_low"], a["ci_high"], b["ci_low"], b["ci_high"]):
        return False
    return a["ci_high"] < b["ci_low"] or b["ci_high"] < a["ci_low"]


def add_deltas(rows: list[dict], baseline: str | None) -> list[dict]:
    """Set delta_vs_baseline and separated_vs_baseline on every non-baseline row whose metric the baseline has."""
    base = {r["metric"]: r for r in rows if r["experiment"] == baseline}
    for r in rows:
        r["is_baseline"] = r["experiment"] == baseline
        b = base.get(r["metric"])
        if b is None or r["is_baseline"] or not _finite(r["value"], b["value"]):
            r["delta_vs_baseline"], r["separated_vs_baseline"] = None, None
            continue
        r["delta_vs_baseline"] = r["value"] - b["value"]
        r["separated_vs_baseline"] = separated(r, b)
    return rows


def order_rows(rows: list[dict], experiments: list[str]) -> list[dict]:
    """Rows in report order: experiments as listed, metrics in first-seen order."""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    rank = {e: i for i, e in enumerate(experiments)}
    return sorted(rows, key=lambda r: (rank.get(r["experiment"], len(rank)), metrics.index(r["metric"])))


def pairwise(rows: list[dict], experiments: list[str], baseline: str | None) -> list[dict]:
    """Every pair of non-baseline experiments per metric: delta (second minus first) and whether CIs separate."""
    by = {(r["experiment"], r["metric"]): r for r in rows}
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    others = [e for e in experiments if e != baseline]
    out = []
    for m in metrics:
        have = [e for e in others if (e, m) in by]
        for i, a in enumerate(have):
            for b in have[i + 1:]:
                ra, rb = by[(a, m)], by[(b, m)]
                delta = rb["value"] - ra["value"] if _finite(ra["value"], rb["value"]) else None
                out.append({"metric": m, "a": a, "b": b, "delta": delta, "separated": separated(ra, rb),
                            "unit": ra["unit"]})
    return out


# ------------------------------------------------------------------------------------- safety and over-refusal
HANDLED = "handled_right"


def handled_rows(paths: list[str], harmful: str | None, benign: list[str]) -> list[dict]:
    """Per experiment with the harmful metric and every benign metric: the share of all those prompts handled
    right (a harmful prompt refused, a benign one answered), pooled over prompts, with the two-level bootstrap CI.

    A model that refuses everything scores the benign share of the prompts, one that refuses nothing the
    harmful share: only one that tells them apart scores high. Reads the per-example Parquet beside each JSON.
    """
    from workflow_scripts.score import summarise

    if not harmful or not benign:
        return []
    by_exp: dict[str, dict[str, Path]] = {}
    for p in paths:
        path = Path(p)
        by_exp.setdefault(path.parent.name, {})[path.stem] = path
    out = []
    for exp, files in by_exp.items():
        if harmful not in files or not all(b in files for b in benign):
            continue
        per_seed: dict[str, list[float]] = {}
        for metric in [harmful, *benign]:
            examples = files[metric].with_suffix(".examples.parquet")
            try:
                table = pq.read_table(examples, columns=["seed", "value"]).to_pylist()
            except (OSError, pa.ArrowInvalid, KeyError) as err:
                raise DataError(examples, None, None, f"cannot read per-example results: {err}") from err
            for row in table:
                refused = float(row["value"])
                per_seed.setdefault(str(row["seed"]), []).append(refused if metric == harmful else 1.0 - refused)
        r = summarise(per_seed)
        out.append({"experiment": exp, "metric": HANDLED, "scorer": f"{harmful} + {' + '.join(benign)}",
                    "unit": "fraction", "value": r["value"], "ci_low": r["ci95"][0], "ci_high": r["ci95"][1],
                    "n": r["n"], "n_seeds": r["n_seeds"],
                    "per_seed": [{"seed": k, "value": v} for k, v in r["per_seed"].items()],
                    "seed_sd": r["seed_sd"], "is_baseline": False, "delta_vs_baseline": None,
                    "separated_vs_baseline": None, "note": None})
    return out


# --------------------------------------------------------------------------------------------------- run time
def runtime_rows(bench_dir: str | Path) -> list[dict]:
    """Wall time and peak memory per rule, summed from Snakemake's benchmark files (benchmarks/<rule>/...tsv):
    one row per rule, largest total first, with its share of all the time."""
    import csv

    per_rule: dict[str, dict] = {}
    root = Path(bench_dir)
    for f in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        rule = f.relative_to(root).parts[0]
        with f.open(newline="") as fh:
            records = list(csv.DictReader(fh, delimiter="\t"))
        if not records:
            continue
        # A benchmark with `repeat` has several lines: the job took their mean.
        seconds = sum(float(r["s"]) for r in records) / len(records)
        rss = max((float(r["max_rss"]) for r in records if r.get("max_rss") not in (None, "", "-", "NA")),
                  default=float("nan"))
        r = per_rule.setdefault(rule, {"rule": rule, "jobs": 0, "seconds": 0.0, "max_seconds": 0.0,
                                       "peak_rss_mb": float("nan")})
        r["jobs"] += 1
        r["seconds"] += seconds
        r["max_seconds"] = max(r["max_seconds"], seconds)
        if not math.isnan(rss):
            r["peak_rss_mb"] = rss if math.isnan(r["peak_rss_mb"]) else max(r["peak_rss_mb"], rss)
    total = sum(r["seconds"] for r in per_rule.values()) or 1.0
    rows = sorted(per_rule.values(), key=lambda r: -r["seconds"])
    for r in rows:
        r["share"] = r["seconds"] / total
    return rows


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def runtime_blocks(rows: list[dict]) -> list[tuple]:
    if not rows:
        return []
    total = sum(r["seconds"] for r in rows)
    body = [[r["rule"], str(r["jobs"]), _minutes(r["seconds"]), f"{100 * r['share']:.0f}%",
             _minutes(r["seconds"] / r["jobs"]), _minutes(r["max_seconds"]),
             "n/a" if math.isnan(r["peak_rss_mb"]) else f"{r['peak_rss_mb']:.0f} MiB"] for r in rows]
    return [("h2", "Where the time went"),
            ("p", f"Summed from Snakemake's benchmark files (`benchmarks/<rule>/`): {_minutes(total)} of job time "
                  "in all, the cost of building everything once (jobs that ran in parallel count fully; a rerun "
                  "replaces its job's figure)."),
            ("table", ["rule", "jobs", "wall time", "share", "mean per job", "longest job", "peak memory (RSS)"],
             body)]


def summary_rows(paths: list[str], experiments: list[str], baseline: str | None,
                 extra: list[dict] | None = None) -> list[dict]:
    """Load, check and order the rows (plus already computed `extra` rows); every path must belong to a listed
    experiment."""
    rows = collect(paths) + list(extra or [])
    for r in rows:
        if r["experiment"] not in experiments:
            raise DataError(f"results/{r['experiment']}/{r['metric']}.json", None, "experiment",
                            f"not in the report's experiments ({', '.join(experiments)})")
    rows = order_rows(add_deltas(rows, baseline), experiments)
    for r in rows:
        if r["n_seeds"] == 1:
            r["note"] = "one seed: the CI covers prompt sampling only, not training variance"
    return rows


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


# ------------------------------------------------------------------------------------------------------ formatting
def _scale(unit: str) -> float:
    return 100.0 if unit == "fraction" else 1.0


def fmt_value(x: float | None, unit: str) -> str:
    return "n/a" if not _finite(x) else f"{x * _scale(unit):.1f}%"


def fmt_delta(d: float | None, unit: str) -> str:
    if not _finite(d):
        return "n/a"
    d = d * _scale(unit)
    return f"{'+' if d >= 0 else '−'}{abs(d):.1f} pp"


def cell(r: dict | None) -> str:
    """value (CI), n and, against the baseline, the delta with the not-separated marker when the CIs overlap."""
    if r is None:
        return "-"
    u = r["unit"]
    text = f"{fmt_value(r['value'], u)} ({fmt_value(r['ci_low'], u)}–{fmt_value(r['ci_high'], u)}), n={r['n']}"
    if r["delta_vs_baseline"] is not None:
        text += f", {fmt_delta(r['delta_vs_baseline'], u)}"
        if not r["separated_vs_baseline"]:
            text += f" {NOT_SEPARATED}"
    return text


def blocks(rows: list[dict], experiments: list[str], baseline: str | None, notes: dict | None = None,
           full: bool = True, runtime: list[dict] | None = None, filters: list[str] = (),
           judges: list[dict] = (), rounds: list[str] = ()) -> list[tuple]:
    """The report as ("h1"|"h2"|"p"|"table", ...) blocks, rendered to Markdown or HTML by the caller."""
    notes = notes or {}
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    by = {(r["experiment"], r["metric"]): r for r in rows}
    present = [e for e in experiments if any((e, m) in by for m in metrics)]
    out: list[tuple] = [("h1", "SafeFT summary")]
    head = ["experiment", "seeds"] + [f"{m} (95% CI)" for m in metrics]
    body = []
    for exp in present:
        seeds = max(by[(exp, m)]["n_seeds"] for m in metrics if (exp, m) in by)
        label = f"{exp} (reference)" if exp == baseline else exp
        if notes.get(exp):
            label += f": {notes[exp]}"
        body.append([label, f"{seeds} (single run)" if seeds == 1 else str(seeds)]
                    + [cell(by.get((exp, m))) for m in metrics])
    out.append(("table", head, body))

    legend = []
    marked = [r for r in rows if r["delta_vs_baseline"] is not None and not r["separated_vs_baseline"]]
    if baseline is None:
        legend.append("No baseline is set (`report: baseline:`), so no deltas are shown.")
    else:
        legend.append(f"Deltas are in percentage points (pp) against `{baseline}`. "
                      f"{NOT_SEPARATED} = **not separated**: this row's 95% CI overlaps the baseline's, so the "
                      "difference is within the noise of this sample size; treat it as no measured difference.")
        missing = [m for m in metrics if (baseline, m) not in by]
        if missing:
            legend.append(f"The baseline `{baseline}` has no result for {', '.join(missing)}: no deltas there.")
        if rows and not marked and any(r["delta_vs_baseline"] is not None for r in rows):
            legend.append("Every delta shown is separated from the baseline (non-overlapping 95% CIs).")
    legend.append("Intervals are 95% bootstrap CIs over prompts and, with several seeds, over seeds; "
                  "separated means the two intervals do not overlap (touching counts as overlapping).")
    single = [e for e in present if all(by[(e, m)]["n_seeds"] == 1 for m in metrics if (e, m) in by)]
    if single:
        legend.append(f"Single run (one seed): {', '.join(single)}. Such a row is an illustration, not evidence: "
                      "its CI covers the sampling of prompts only, not the variance between training runs.")
    scorers = {r["scorer"] for r in rows}
    if "safe_rate" in scorers:
        legend.append("safe_rate: share of harmful prompts refused (keyword rule).")
    out += [("p", t) for t in legend]
    if not full:
        return out

    out.append(("h2", "Pairwise separation (experiments other than the baseline)"))
    pairs = pairwise(rows, experiments, baseline)
    if not pairs:
        out.append(("p", "Fewer than two non-baseline experiments per metric: nothing to compare."))
    for m in metrics:
        mp = [p for p in pairs if p["metric"] == m]
        if not mp:
            continue
        sep = [f"{p['a']} vs {p['b']}" for p in mp if p["separated"]]
        out.append(("h3", m))
        out.append(("table", ["pair", "difference (second − first)", "separated"],
                    [[f"{p['a']} vs {p['b']}", fmt_delta(p["delta"], p["unit"]),
                      "yes" if p["separated"] else f"no {NOT_SEPARATED} (CIs overlap)"] for p in mp]))
        out.append(("p", f"Separated pairs: {', '.join(sep)}." if sep else
                    f"No pair is separated on {m}: the data do not order these experiments."))

    seeded = [r for r in rows if r["n_seeds"] > 1]
    if seeded:
        out.append(("h2", "Per-seed values"))
        out.append(("table", ["experiment", "metric", "per seed", "sd between seeds"],
                    [[r["experiment"], r["metric"],
                      ", ".join(f"seed {s['seed']}: {fmt_value(s['value'], r['unit'])}" for s in r["per_seed"]),
                      "n/a" if not _finite(r["seed_sd"]) else f"{r['seed_sd'] * _scale(r['unit']):.1f} pp"]
                     for r in seeded]))
    if full:
        from workflow_scripts.filter_measures import measures_blocks
        from workflow_scripts.reversegen import rounds_blocks

        out += judge_blocks(list(judges))
        out += measures_blocks(list(filters))
        out += rounds_blocks(list(rounds))
        out += runtime_blocks(runtime or [])
    return out


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(bl: list[tuple]) -> str:
    lines: list[str] = []
    for b in bl:
        if b[0] in ("h1", "h2", "h3"):
            lines += ["#" * int(b[0][1]) + " " + b[1], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        else:
            _, head, body = b
            lines.append("| " + " | ".join(map(_md_escape, head)) + " |")
            lines.append("|" + "---|" * len(head))
            lines += ["| " + " | ".join(map(_md_escape, row)) + " |" for row in body]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _inline_html(text: str) -> str:
    """Escape, then render the two Markdown inline marks the blocks use (`code`, **bold**)."""
    parts = html.escape(text).split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


def to_html(bl: list[tuple]) -> str:
    """A standalone page (no external assets) so Snakemake's report can show it inline."""
    body = []
    for b in bl:
        if b[0] in ("h1", "h2", "h3"):
            body.append(f"<{b[0]}>{html.escape(b[1])}</{b[0]}>")
        elif b[0] == "p":
            body.append(f"<p>{_inline_html(b[1])}</p>")
        else:
            _, head, rows = b
            th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
            trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>")
    style = ("body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1em}"
             "th,td{border:1px solid #bbb;padding:.3em .6em;text-align:left;font-size:.9em}th{background:#eee}"
             "code{background:#f4f4f4;padding:0 .2em}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>SafeFT summary</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def markdown(rows: list[dict], experiments: list[str], baseline: str | None, notes: dict | None = None,
             full: bool = True) -> str:
    return to_markdown(blocks(rows, experiments, baseline, notes, full))


# ----------------------------------------------------------------------------------------------------------- plots
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
          "#bcbd22"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")


def _axis_label(metric: str, rows: list[dict]) -> str:
    scorer = next((r["scorer"] for r in rows if r["metric"] == metric and r["scorer"]), None)
    what = f"{metric} ({scorer})" if scorer and scorer != metric else metric
    return f"{what}, % (95% CI)"


def _place_labels(ax, points: list[tuple[float, float]], labels: list[str], colors: list[str]) -> None:
    """Greedy label placement: for each point, the first of eight offsets whose text box stays inside the axes and
    overlaps neither an earlier label nor a marker, else the offset with the least such overlap."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    marks = [ax.transData.transform(p) for p in points]
    axbox = ax.get_window_extent(renderer)
    placed = []
    offsets = [(8, 8), (8, -14), (-8, 8), (-8, -14), (0, 14), (0, -18), (14, -3), (-14, -3)]
    for (x, y), label, color in zip(points, labels, colors, strict=True):
        best = None
        for dx, dy in offsets:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            t = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, fontsize=9,
                            color=color, annotation_clip=False)
            box = t.get_window_extent(renderer).expanded(1.05, 1.1)
            # Costs in square pixels: overlap with earlier labels, twice the part outside the axes (where it would
            # hit the title or tick labels), and a fixed price per marker covered.
            cost = sum(_overlap(box, o) for o in placed)
            cost += 2 * (box.width * box.height - _overlap(box, axbox))
            cost += sum(400.0 for m in marks if box.contains(*m))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, t, box)
            else:
                t.remove()
            if cost == 0:
                break
        placed.append(best[2])


def _label_0_to_100(axis) -> None:
    """The limits leave room outside 0-100 for markers and labels; no tick claims such a value."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}" if -1e-9 <= v <= 100 + 1e-9 else ""))


def _limits(values: list[float]) -> tuple[float, float]:
    """Axis limits on a 0-100 scale: the data plus room for labels, never narrower than 10 points (identical
    values would otherwise zoom to a meaningless ±0.05), at most 10 points past 0 or 100 (unlabelled there)."""
    lo, hi = min(values), max(values)
    pad = max(0.2 * (hi - lo), 5.0)
    return max(lo - pad, -10.0), min(hi + pad, 110.0)


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def plot_scatter(rows: list[dict], experiments: list[str], safety: str, utility: str, path: str | Path,
                 baseline: str | None = None, title: str | None = None) -> list[str]:
    """Safety (y) against utility (x), CI bars both ways, one labelled point per experiment with both metrics.
    Returns the experiments plotted; raises ValueError when none has both."""
    plt = _pyplot()
    by = {(r["experiment"], r["metric"]): r for r in rows}
    exps = [e for e in experiments if (e, safety) in by and (e, utility) in by
            and _finite(by[(e, safety)]["value"], by[(e, utility)]["value"])]
    if not exps:
        raise ValueError(f"no experiment has both {safety!r} and {utility!r} results to plot")
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    points, labels, colors = [], [], []
    one_seed = [max(by[(e, safety)]["n_seeds"], by[(e, utility)]["n_seeds"]) == 1 for e in exps]
    for i, e in enumerate(exps):
        s, u = by[(e, safety)], by[(e, utility)]
        ks, ku = _scale(s["unit"]), _scale(u["unit"])
        x, y = u["value"] * ku, s["value"] * ks
        xerr = [[x - u["ci_low"] * ku], [u["ci_high"] * ku - x]] if _finite(u["ci_low"], u["ci_high"]) else None
        yerr = [[y - s["ci_low"] * ks], [s["ci_high"] * ks - y]] if _finite(s["ci_low"], s["ci_high"]) else None
        color = COLORS[i % len(COLORS)]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="*" if e == baseline else "o", ms=14 if e == baseline else 8,
                    color=color, ecolor=color, elinewidth=1.2, capsize=4, alpha=0.9, zorder=3)
        points.append((x, y))
        # Mark single runs per point only when the plot mixes them with multi-seed points; else say it once below.
        tag = " [1 seed]" if one_seed[i] and not all(one_seed) else ""
        labels.append(e + (" (baseline)" if e == baseline else "") + tag)
        colors.append(color)
    ax.set_xlabel(_axis_label(utility, rows))
    ax.set_ylabel(_axis_label(safety, rows))
    ax.set_title(title or f"Safety vs utility: {safety} against {utility}")
    ax.grid(True, alpha=0.3)
    xs = [v for e in exps for v in (by[(e, utility)]["ci_low"], by[(e, utility)]["ci_high"], by[(e, utility)]["value"])
          if _finite(v)]
    ys = [v for e in exps for v in (by[(e, safety)]["ci_low"], by[(e, safety)]["ci_high"], by[(e, safety)]["value"])
          if _finite(v)]
    ax.set_xlim(*_limits([v * _scale(by[(exps[0], utility)]["unit"]) for v in xs]))
    ax.set_ylim(*_limits([v * _scale(by[(exps[0], safety)]["unit"]) for v in ys]))
    _label_0_to_100(ax.xaxis)
    _label_0_to_100(ax.yaxis)
    _place_labels(ax, points, labels, colors)
    foot = "Bars: 95% bootstrap CIs; points whose bars overlap on an axis are not separated on that metric."
    if all(one_seed):
        foot += "\nEvery point is a single training run (one seed): an illustration, not evidence."
    left_out = [e for e in experiments if e not in exps and any(r["experiment"] == e for r in rows)]
    if left_out:
        foot += f"\nNot plotted (lacking {safety} or {utility}): {', '.join(left_out)}."
    fig.text(0.01, -0.04, foot, fontsize=8, color="#555")
    _save(fig, path)
    plt.close(fig)
    return exps


def plot_bars(rows: list[dict], experiments: list[str], metric: str, path: str | Path,
              baseline: str | None = None) -> None:
    """One bar per experiment with its 95% CI; the baseline is hatched and drawn as a dashed line, and bars whose
    CI overlaps the baseline's are pale and marked not separated."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    by = {r["experiment"]: r for r in rows if r["metric"] == metric}
    exps = [e for e in experiments if e in by]
    if not exps:
        raise ValueError(f"no results for metric {metric!r}")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(exps) + 2), 4.8))
    k = _scale(by[exps[0]]["unit"])
    for i, e in enumerate(exps):
        r = by[e]
        v = r["value"] * k if _finite(r["value"]) else 0.0
        err = ([[v - r["ci_low"] * k], [r["ci_high"] * k - v]] if _finite(r["value"], r["ci_low"], r["ci_high"])
               else None)
        faded = r["separated_vs_baseline"] is False
        ax.bar(i, v, yerr=err, capsize=5, color="#888888" if e == baseline else COLORS[i % len(COLORS)],
               alpha=0.45 if faded else 0.9, hatch="//" if e == baseline else None, edgecolor="black", linewidth=0.6)
        text = fmt_value(r["value"], r["unit"])
        if r["delta_vs_baseline"] is not None:
            text += "\n" + fmt_delta(r["delta_vs_baseline"], r["unit"]) + ("" if r["separated_vs_baseline"]
                                                                           else f" {NOT_SEPARATED}")
        top = r["ci_high"] * k if _finite(r["ci_high"]) else v
        ax.text(i, top + 1.5, text, ha="center", va="bottom", fontsize=8)
    handles = []
    if baseline in by and _finite(by[baseline]["value"]):
        ax.axhline(by[baseline]["value"] * k, color="black", ls="--", lw=1)
        handles.append(Patch(facecolor="#888888", hatch="//", edgecolor="black", label=f"baseline: {baseline}"))
    if any(by[e]["separated_vs_baseline"] is False for e in exps):
        handles.append(Patch(facecolor="#bbbbbb", alpha=0.45, edgecolor="black",
                             label=f"pale, {NOT_SEPARATED}: CI overlaps the baseline (not separated)"))
    ax.set_xticks(range(len(exps)))
    one_seed = [by[e]["n_seeds"] == 1 for e in exps]
    mixed = not all(one_seed) and any(one_seed)
    ax.set_xticklabels([e + ("\n[1 seed]" if mixed and by[e]["n_seeds"] == 1 else "") for e in exps],
                       rotation=20, ha="right", fontsize=9)
    if all(one_seed):
        ax.set_xlabel("every bar is a single training run (one seed): an illustration, not evidence", fontsize=8,
                      color="#555")
    ax.set_ylabel(_axis_label(metric, rows))
    ax.set_title(f"{metric} by experiment (bars: 95% CI)")
    ymax = max((by[e]["ci_high"] * k for e in exps if _finite(by[e]["ci_high"])), default=100.0)
    ax.set_ylim(0, min(max(ymax * 1.25, 10), 118))
    _label_0_to_100(ax.yaxis)
    ax.grid(True, axis="y", alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2,
                  frameon=False)
    _save(fig, path)
    plt.close(fig)


def read_curve(train_log: str | Path) -> list[tuple[int, float]]:
    """(step, training loss) points from a training job's train_log.json."""
    path = Path(train_log)
    try:
        history = json.loads(path.read_text()).get("log_history") or []
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, None, None, f"cannot read training log: {err}") from err
    return [(int(h["step"]), float(h["loss"])) for h in history if "loss" in h and "step" in h]


def plot_training_curves(logs: dict[str, list[str]], chains: dict[str, str], path: str | Path) -> list[str]:
    """Loss against step for every training job: one panel per method chain (small multiples), one colour per
    experiment, each seed a thin line and the mean over seeds (at the steps every seed logged) bold. Returns the
    panel titles, in order."""
    import numpy as np

    plt = _pyplot()
    panels: dict[str, list[str]] = {}
    for exp in logs:
        panels.setdefault(chains.get(exp) or "no method", []).append(exp)
    if not panels:
        raise ValueError("no training logs to plot")
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False, sharey=True)
    colour = {e: COLORS[i % len(COLORS)] for i, e in enumerate(logs)}
    for ax, (chain, exps) in zip(axes.flat, panels.items(), strict=False):
        for exp in exps:
            curves = [read_curve(p) for p in logs[exp]]
            curves = [c for c in curves if c]
            for c in curves:
                ax.plot([x for x, _ in c], [y for _, y in c], color=colour[exp], lw=0.7, alpha=0.45)
            if curves:
                common = sorted(set.intersection(*(set(x for x, _ in c) for c in curves)))
                mean = [float(np.mean([dict(c)[x] for c in curves])) for x in common]
                ax.plot(common, mean, color=colour[exp], lw=2.2,
                        label=f"{exp} ({len(curves)} seed{'s' * (len(curves) != 1)})")
        ax.set_title(chain, fontsize=9)
        ax.set_xlabel("optimiser step", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Training loss per method chain (thin: seeds, bold: their mean)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return list(panels)


# ---------------------------------------------------------------------------------------------------- terminal
def print_summary(parquet_path: str | Path, console=None, inputs: list[str] = ()) -> bool:
    """Print summary.parquet as a rich table: value [CI], delta and the not-separated marker. With `inputs` (the
    results it summarises), print only a one-line warning when one of them is newer, so a stale table is never
    shown as this run's outcome. Returns whether the table was printed."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    newer = [p for p in inputs if os.path.exists(p) and os.path.getmtime(p) > os.path.getmtime(parquet_path)]
    if newer:
        console.print(f"{parquet_path} is older than {newer[0]}: build it (rule report) to see the summary.")
        return False
    rows = pq.read_table(parquet_path).to_pylist()
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    exps = list(dict.fromkeys(r["experiment"] for r in rows))
    by = {(r["experiment"], r["metric"]): r for r in rows}
    baseline = next((r["experiment"] for r in rows if r["is_baseline"]), None)
    table = Table(title="SafeFT summary (95% CI)", caption=(
        f"Δ in pp vs {baseline}; {NOT_SEPARATED} not separated (CIs overlap)" if baseline else "no baseline set"))
    table.add_column("experiment", style="bold")
    table.add_column("seeds", justify="right")
    for m in metrics:
        table.add_column(m, justify="right")
    for e in exps:
        seeds = max(by[(e, m)]["n_seeds"] for m in metrics if (e, m) in by)
        cells = []
        for m in metrics:
            r = by.get((e, m))
            if r is None:
                cells.append("-")
                continue
            u = r["unit"]
            text = f"{fmt_value(r['value'], u)} [{fmt_value(r['ci_low'], u)}, {fmt_value(r['ci_high'], u)}]"
            if r["delta_vs_baseline"] is not None:
                d = fmt_delta(r["delta_vs_baseline"], u)
                text += (f" [green]Δ{d}[/]" if r["separated_vs_baseline"] and r["delta_vs_baseline"] > 0 else
                         f" [red]Δ{d}[/]" if r["separated_vs_baseline"] else f" [dim]Δ{d} {NOT_SEPARATED}[/]")
            cells.append(text)
        table.add_row(e + (" (ref)" if e == baseline else ""), f"{seeds}" + (" (1 run)" if seeds == 1 else ""),
                      *cells)
    console.print(table)
    return True


# ---------------------------------------------------------------------------------------------------------- CLI
def build(results: list[str], experiments: list[str], baseline: str | None, notes: dict, parquet: str,
          markdown_path: str, report_md: str | None = None, html_path: str | None = None,
          scatter: str | None = None, bars_dir: str | None = None, safety: str = "safe_rate",
          utility: str = "utility", benign: list[str] = (), benchmarks: str | None = None,
          runtime_path: str | None = None, refusal_scatter: str | None = None, curves: str | None = None,
          train_logs: dict[str, list[str]] | None = None, chains: dict[str, str] | None = None,
          filters: list[str] = (), rounds: list[str] = ()) -> list[dict]:
    """Write every requested output from the results JSONs; returns the summary rows."""
    rows = summary_rows(results, experiments, baseline, handled_rows(results, safety, list(benign)))
    runtime = runtime_rows(benchmarks) if benchmarks else []
    if runtime_path:
        write_table(pa.Table.from_pylist(runtime, schema=RUNTIME_SCHEMA), runtime_path)
    write_table(to_table(rows), parquet)
    with atomic_file(markdown_path) as tmp:
        tmp.write_text(markdown(rows, experiments, baseline, notes, full=False))
    full = blocks(rows, experiments, baseline, notes, full=True, runtime=runtime, filters=filters,
                  judges=judge_rows(results), rounds=rounds)
    if report_md:
        with atomic_file(report_md) as tmp:
            tmp.write_text(to_markdown(full))
    if html_path:
        with atomic_file(html_path, suffix=".html") as tmp:
            tmp.write_text(to_html(full))
    if scatter:
        plot_scatter(rows, experiments, safety, utility, scatter, baseline)
    if curves:
        plot_training_curves(train_logs or {}, chains or {}, curves)
    if refusal_scatter:
        plot_scatter(rows, experiments, safety, benign[0], refusal_scatter, baseline,
                     title=f"Safety vs over-refusal: {safety} against {benign[0]} (lower right is best)")
    if bars_dir:
        for m in dict.fromkeys(r["metric"] for r in rows):
            plot_bars(rows, experiments, m, Path(bars_dir) / f"{m}.png", baseline)
    return rows


def _by_experiment(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        exp, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --train_logs wants EXP=PATH, got {item!r}")
        out.setdefault(exp, []).append(path)
    return out


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["print"]:
        ap = argparse.ArgumentParser(prog="python -m workflow_scripts.report print",
                                     description="Print summary.parquet as a table.")
        ap.add_argument("parquet")
        print_summary(ap.parse_args(argv[1:]).parquet)
        return
    ap = argparse.ArgumentParser(description=__doc__, epilog="Subcommand: `print SUMMARY.parquet` prints the table.")
    ap.add_argument("--results", nargs="+", required=True)
    ap.add_argument("--experiments", nargs="+", required=True, help="row order")
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--notes_json", default="{}", help='{"exp": "one-line description"}')
    ap.add_argument("--parquet", required=True)
    ap.add_argument("--markdown", required=True, help="short summary: the main table and its legend")
    ap.add_argument("--report_md", default=None, help="full report: + pairwise separation and per-seed values")
    ap.add_argument("--html", default=None, help="the full report as one standalone HTML page")
    ap.add_argument("--scatter", default=None, help="safety vs utility PNG")
    ap.add_argument("--refusal_scatter", default=None, help="safety vs over-refusal PNG (first --benign metric)")
    ap.add_argument("--bars_dir", default=None, help="writes {metric}.png per metric here")
    ap.add_argument("--safety", default="safe_rate", help="metric on the scatter's y axis")
    ap.add_argument("--utility", default="utility", help="metric on the scatter's x axis")
    ap.add_argument("--benign", nargs="*", default=[],
                    help=f"over-refusal metrics that join --safety in the {HANDLED} score")
    ap.add_argument("--benchmarks", default=None, help="Snakemake's benchmarks/ folder: time per rule")
    ap.add_argument("--runtime", default=None, help="the time-per-rule table as Parquet")
    ap.add_argument("--curves", default=None, help="training-loss curves PNG (needs --train_logs)")
    ap.add_argument("--train_logs", nargs="*", default=[], metavar="EXP=TRAIN_LOG",
                    help="each training job's train_log.json, prefixed by its experiment")
    ap.add_argument("--chains_json", default="{}", help='{"exp": "its method chain, e.g. preview(real, m=6)"}')
    ap.add_argument("--filters", nargs="*", default=[], help="results/{exp}/filter.json of chains with a ground truth")
    ap.add_argument("--rounds", nargs="*", default=[], help="results/{exp}/rounds.json of ReverseGen chains")
    args = ap.parse_args(argv)
    try:
        rows = build(args.results, args.experiments, args.baseline, json.loads(args.notes_json), args.parquet,
                     args.markdown, args.report_md, args.html, args.scatter, args.bars_dir, args.safety,
                     args.utility, args.benign, args.benchmarks, args.runtime, args.refusal_scatter,
                     args.curves, _by_experiment(args.train_logs), json.loads(args.chains_json), args.filters,
                     args.rounds)
    except (DataError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(markdown(rows, args.experiments, args.baseline, json.loads(args.notes_json), full=False))


if __name__ == "__main__":
    main()
