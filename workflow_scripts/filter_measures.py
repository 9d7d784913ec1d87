"""Filter measures of an experiment's method chain: for every step, rows in, added, kept and dropped (checking
rows in + added == kept + dropped); where the rows carry the `unsafe` ground truth (a harmful mix upstream), the
precision, recall and F1 of the dropped set against the unsafe rows, and the AUC of the step's score.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from workflow_scripts.io import DataError, read_table, write_json


def auc(scores: list[float], positive: list[bool]) -> float | None:
    """Area under the ROC curve of `scores` for telling positives from negatives (ties count half): the
    Mann-Whitney statistic over average ranks. None when either class is empty."""
    n_pos = sum(positive)
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return None
    ranks = pd.Series(scores, dtype="float64").rank(method="average")
    rank_sum = float(ranks[pd.Series(positive, dtype=bool)].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def prf(dropped: list[bool], unsafe: list[bool]) -> dict:
    """Precision, recall and F1 of the dropped rows as a detector of the unsafe ones (None where undefined)."""
    tp = sum(d and u for d, u in zip(dropped, unsafe, strict=True))
    n_dropped, n_unsafe = sum(dropped), sum(unsafe)
    precision = tp / n_dropped if n_dropped else None
    recall = tp / n_unsafe if n_unsafe else None
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"true_positives": tp, "precision": precision, "recall": recall, "f1": f1}


def step_measures(name: str, table_in: pa.Table, table_out: pa.Table, decisions: pa.Table,
                  paths: tuple[str, str, str] = ("<in>", "<out>", "<decisions>")) -> dict:
    """The measures of one step from its input table, output table and decisions table."""
    in_path, out_path, dec_path = paths
    ids_in = table_in.column("id").to_pylist()
    dec = decisions.to_pydict()
    kept = dict(zip(dec["id"], dec["kept"], strict=True))
    missing = [i for i in ids_in if i not in kept]
    if missing:
        raise DataError(dec_path, None, "id", f"{len(missing)} input rows have no decision, e.g. {missing[0]!r}")
    added = [i for i in dec["id"] if i not in set(ids_in)]
    n_kept = sum(dec["kept"])
    n_dropped = len(dec["id"]) - n_kept
    if len(ids_in) + len(added) != n_kept + n_dropped or table_out.num_rows != n_kept:
        raise DataError(dec_path, None, "kept", f"rows in {len(ids_in)} + added {len(added)} != kept {n_kept} + "
                        f"dropped {n_dropped}, or the output ({out_path}) has {table_out.num_rows} rows")
    out = {"step": name, "rows_in": len(ids_in), "rows_added": len(added), "rows_kept": n_kept,
           "rows_dropped": n_dropped}
    if "unsafe" not in table_in.column_names:
        out["unsafe_known"] = False
        return out
    unsafe = [bool(u) for u in table_in.column("unsafe").to_pylist()]
    dropped = [not kept[i] for i in ids_in]
    out.update(unsafe_known=True, unsafe_in=sum(unsafe),
               unsafe_out=int(sum(table_out.column("unsafe").to_pylist())) if "unsafe" in table_out.column_names
               else None)
    if n_dropped:
        out.update(prf(dropped, unsafe))
    score = dict(zip(dec["id"], dec["score"], strict=True))
    scores = [score[i] for i in ids_in]
    if n_dropped and all(s is not None for s in scores):
        # A score orders the rows by the step's own rule: SEAL keeps high logits, ForgetFilter drops high
        # forgetting. Which end it drops is read off its decisions, so the AUC always asks "does the end the
        # step drops hold the unsafe rows?"
        drop_scores = [s for s, d in zip(scores, dropped, strict=True) if d]
        keep_scores = [s for s, d in zip(scores, dropped, strict=True) if not d]
        drops_high = not keep_scores or (sum(drop_scores) / len(drop_scores) >= sum(keep_scores) / len(keep_scores))
        out["score_drops"] = "high" if drops_high else "low"
        out["score_auc"] = auc([s if drops_high else -s for s in scores], unsafe)
    return out


def chain_measures(names: list[str], tables: list[str], decisions: list[str]) -> dict:
    """Measures of every step: `tables` is the chain's input then each step's output, `decisions` one per step."""
    if len(tables) != len(names) + 1 or len(decisions) != len(names):
        raise ValueError("need one table more than steps (the chain's input first) and one decisions table per step")
    steps = []
    for k, name in enumerate(names):
        steps.append(step_measures(name, read_table(tables[k]), read_table(tables[k + 1]),
                                   pq.read_table(decisions[k]), (tables[k], tables[k + 1], decisions[k])))
    return {"metric": "filter", "steps": steps}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def measures_blocks(paths: list[str], column: tuple[str, dict[str, str]] | None = None) -> list[tuple]:
    """Report blocks (workflow_scripts.report's shape): one table row per experiment, the measures of its chain's
    last step that dropped rows with the ground truth known; `column` adds (name, {experiment: value})."""
    body = []
    for path in paths:
        exp = Path(path).parent.name
        try:
            steps = json.loads(Path(path).read_text())["steps"]
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise DataError(path, None, "steps", f"cannot read filter measures: {err}") from err
        measured = [s for s in steps if s.get("unsafe_known") and s["rows_dropped"]]
        if not measured:
            continue
        s = measured[-1]
        auc_ = s.get("score_auc")
        body.append([exp, *([column[1][exp]] if column else []), s["step"], f"{s['unsafe_in']} / {s['rows_in']}",
                     str(s["rows_dropped"]), _pct(s.get("precision")), _pct(s.get("recall")), _pct(s.get("f1")),
                     "n/a" if auc_ is None else f"{auc_:.2f}"])
    if not body:
        return []
    head = ["experiment", *([column[0]] if column else []), "step", "unsafe in / rows in", "dropped", "precision",
            "recall", "F1", "score AUC"]
    return [("h2", "Filter measures"),
            ("p", "The last step of each chain that dropped rows, against the `unsafe` ground truth of the mix: "
                  "precision and recall of the dropped set as a detector of the unsafe rows, and the AUC of the "
                  "step's score (oriented so that the end the step drops counts as unsafe; 0.5 is chance). "
                  "Random selection shows what chance gives."),
            ("table", head, body)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", nargs="+", required=True, help="the method name of every step, in order")
    p.add_argument("--tables", nargs="+", required=True, help="the chain's input, then every step's output")
    p.add_argument("--decisions", nargs="+", required=True, help="every step's decisions table")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    try:
        result = chain_measures(args.steps, args.tables, args.decisions)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    write_json(result, args.output)
    for s in result["steps"]:
        extra = f", precision {s.get('precision')}, recall {s.get('recall')}" if s.get("unsafe_known") else ""
        print(f"{s['step']}: {s['rows_in']} in, {s['rows_added']} added, {s['rows_dropped']} dropped{extra}")


if __name__ == "__main__":
    main()
