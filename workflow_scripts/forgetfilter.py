"""ForgetFilter (Zhao et al., arXiv 2312.12736): fine-tune the base on the noisy set, continue on a safe set, and
drop the examples the model forgot most in between: unsafe examples are forgotten much more than safe ones.

The two fine-tunes are jobs of the shared training lifecycle (train.py) and the greedy generations over the noisy set
are sharded inference jobs (`generate` below); this module holds the pure parts (schedule, recipes, text
normalisation, ROUGE-1, forgetting, the two filter rules, the per-group curve) and the `run` command that scores and
filters. With `interleave: K` the model alternates K noisy and K safe rounds, each from the previous state, and the
forgetting of every round is reported as a curve per example group (unsafe and safe rows).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from workflow_scripts.io import DataError, atomic_file, decisions_table, read_table, shard_of, write_json, write_table
from workflow_scripts.methods import options_from_cli

log = logging.getLogger("safeft.forgetfilter")

PHASES = ("noisy", "safe")
SCORE_ROUNDS = ("last", "mean")
# The reference's fine-tuning settings (LoRA r8, alpha 16, dropout 0.05 on q and v; AdamW at 2e-4, batch 4 x
# grad-accum 4, linear schedule). Its loss covers prompt and response; ours is response-only like every recipe here.
REFERENCE_RECIPE = {
    "objective": "sft", "finetune": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"], "lr": 2e-4, "batch_size": 4, "grad_accum": 4, "scheduler": "linear",
    "max_length": 512,
}
# Removed before ROUGE, as the reference does; "</s>" is its EOS marker (our decoder already drops special tokens).
PUNCTUATION = (".", "?", "!", ";", ":", ",", "</s>")


@dataclass(frozen=True)
class ForgetFilterOptions:
    """A forgetfilter step's options; `safe` names the safe dataset, or several (the safe rounds train on all of
    them). Exactly one of `threshold` (drop when forgetting > phi) and `drop_fraction` (drop the top share of
    scores) is given."""

    safe: str | list
    threshold: float | None = None
    drop_fraction: float | None = None
    interleave: int = 1
    score_rounds: str = "last"
    epochs: float = 10.0
    safe_epochs: float = 1.0
    safe_steps: int | None = None
    recipe: dict = field(default_factory=dict)
    max_new_tokens: int = 128
    backend: str = "hf"
    batch_size: int | str = "auto"
    shards: int = 1
    seed: int = 0

    def __post_init__(self):
        if (self.threshold is None) == (self.drop_fraction is None):
            raise ValueError("forgetfilter needs exactly one of 'threshold' and 'drop_fraction'")
        if self.drop_fraction is not None and not 0 <= self.drop_fraction < 1:
            raise ValueError(f"forgetfilter option 'drop_fraction' must be in [0, 1), not {self.drop_fraction}")
        if self.score_rounds not in SCORE_ROUNDS:
            raise ValueError(f"forgetfilter option 'score_rounds' must be one of {', '.join(SCORE_ROUNDS)}")
        for name in ("interleave", "shards", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"forgetfilter option {name!r} must be >= 1")
        if self.backend not in ("hf", "vllm"):
            raise ValueError("forgetfilter option 'backend' must be hf or vllm (the models are local folders)")

    @property
    def safe_sets(self) -> list[str]:
        return [self.safe] if isinstance(self.safe, str) else list(self.safe)


# ---------------------------------------------------------------- the schedule and its recipes


def schedule(interleave: int) -> list[tuple[int, str]]:
    """The training rounds in order: (1, noisy), (1, safe), (2, noisy), ... for `interleave` rounds."""
    return [(r, phase) for r in range(1, interleave + 1) for phase in PHASES]


def previous(round_: int, phase: str) -> tuple[int, str] | None:
    """The state a round continues from: the noisy round continues the last safe round (None: the base)."""
    if phase == "safe":
        return round_, "noisy"
    return (round_ - 1, "safe") if round_ > 1 else None


def phase_recipe(opts: ForgetFilterOptions, round_: int, phase: str) -> dict:
    """The training recipe of a noisy or a safe round: the reference's settings, the step's `recipe` on top, the
    round's length (noisy: `epochs`; safe: `safe_epochs`, or `safe_steps` optimiser steps when given), and, for
    every round after the first with LoRA, the previous round's adapter continued rather than a new one."""
    from workflow_scripts.objectives import recipe_problems

    recipe = {**REFERENCE_RECIPE, **opts.recipe}
    problems = recipe_problems(recipe, "forgetfilter.recipe")
    if recipe.get("objective", "sft") != "sft":
        problems.append("forgetfilter.recipe.objective: the rounds are plain sft fine-tunes")
    if problems:
        raise ValueError("; ".join(problems))
    if phase == "noisy":
        recipe = {**recipe, "epochs": opts.epochs}
    else:
        recipe = {**recipe, "epochs": opts.safe_epochs}
        if opts.safe_steps:
            recipe["max_steps"] = opts.safe_steps
    # Every round after the first trains the same LoRA adapter further, as the reference's loadPeftModel does.
    if recipe.get("finetune", "lora") == "lora" and previous(round_, phase) is not None:
        recipe["continue_adapter"] = True
    return recipe


# ---------------------------------------------------------------- the workflow's paths (rules/methods/forgetfilter.smk)


def step_options(step: dict) -> ForgetFilterOptions:
    """The options of a config step (`method` and all)."""
    from workflow_scripts.methods import parse_options

    return parse_options(ForgetFilterOptions, {k: v for k, v in step.items() if k != "method"}, "forgetfilter")


def round_model(exp: str, i: int | str, round_: int, phase: str) -> str:
    return f"models/{exp}/forgetfilter_{i}/round{round_}_{phase}"


def round_base(exp: str, i: int | str, round_: int, phase: str, base: str) -> str:
    """The model a round starts from: the experiment's base for the first noisy round, else the previous round."""
    before = previous(round_, phase)
    return base if before is None else round_model(exp, i, *before)


def generation_files(exp: str, i: int | str, opts: ForgetFilterOptions) -> list[str]:
    return [f"data/{exp}/steps/{i}_forgetfilter/round{r}_{phase}_{k}-of-{opts.shards}.parquet"
            for r, phase in schedule(opts.interleave) for k in range(1, opts.shards + 1)]


# ---------------------------------------------------------------- scoring and filtering


def normalise(text: str, first_line: bool = False) -> str:
    """The reference's answer normalisation: lower-case, strip, remove . ? ! ; : , and the EOS marker; for a
    prediction (`first_line`) keep only its first non-empty line (a line of blanks counts as empty here)."""
    text = text.lower().strip()
    for mark in PUNCTUATION:
        text = text.replace(mark, "")
    text = text.strip()
    if first_line:
        text = next((line.strip() for line in text.split("\n") if line.strip()), "")
    return text


def rouge1_scores(references: list[str], predictions: list[str]) -> list[float]:
    """ROUGE-1 F of each normalised prediction against its normalised reference (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return [scorer.score(normalise(ref), normalise(pred, first_line=True))["rouge1"].fmeasure
            for ref, pred in zip(references, predictions, strict=True)]


def forgetting_rows(ids: list[str], references: list[str], generations: dict[tuple[int, str], list[str]]
                    ) -> list[dict]:
    """One row per example and round: ROUGE-1 after the noisy round, after the safe round, and their difference
    (the forgetting). `generations` maps (round, phase) to completions in the order of `ids`."""
    rounds = sorted({r for r, _ in generations})
    rows = []
    for r in rounds:
        noisy = rouge1_scores(references, generations[(r, "noisy")])
        safe = rouge1_scores(references, generations[(r, "safe")])
        rows += [{"id": i, "round": r, "rouge_noisy": a, "rouge_safe": b, "forgetting": a - b}
                 for i, a, b in zip(ids, noisy, safe, strict=True)]
    return rows


def example_scores(ids: list[str], rows: list[dict], score_rounds: str = "last") -> list[float]:
    """Each example's filter score: its forgetting in the last round, or the mean over the rounds."""
    by_id: dict[str, list[float]] = {i: [] for i in ids}
    for row in sorted(rows, key=lambda r: r["round"]):
        by_id[row["id"]].append(row["forgetting"])
    if score_rounds == "last":
        return [by_id[i][-1] for i in ids]
    return [sum(by_id[i]) / len(by_id[i]) for i in ids]


def filter_rule(scores: list[float], threshold: float | None = None, drop_fraction: float | None = None
                ) -> tuple[list[bool], list[str]]:
    """(kept, reason) per example. threshold: drop when the score is above it. drop_fraction: drop the
    int(drop_fraction * N) highest scores (ties: the earlier row first)."""
    if threshold is not None:
        kept = [s <= threshold for s in scores]
        return kept, [f"forgetfilter:{'at_or_below' if k else 'above'}_threshold={threshold}" for k in kept]
    k = int(drop_fraction * len(scores))
    dropped = set(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])
    kept = [i not in dropped for i in range(len(scores))]
    return kept, [f"forgetfilter:{'below' if k else 'top'}_drop_fraction={drop_fraction}" for k in kept]


def groups(table: pa.Table) -> dict[str, list[bool]]:
    """Example groups for the curve: unsafe and safe rows where a mix labelled them, and all rows."""
    out = {"all": [True] * table.num_rows}
    if "unsafe" in table.column_names:
        unsafe = [bool(u) for u in table.column("unsafe").to_pylist()]
        out["unsafe"] = unsafe
        out["safe"] = [not u for u in unsafe]
    return out


def curve(table: pa.Table, rows: list[dict]) -> list[dict]:
    """Per round and example group: mean ROUGE-1 after the noisy and the safe round, and the mean forgetting with
    its 95% bootstrap CI over the group's examples."""
    from workflow_scripts.score import bootstrap_ci

    position = {i: n for n, i in enumerate(table.column("id").to_pylist())}
    out = []
    for name, member in groups(table).items():
        for r in sorted({row["round"] for row in rows}):
            sel = [row for row in rows if row["round"] == r and member[position[row["id"]]]]
            if not sel:
                continue
            forgetting = [row["forgetting"] for row in sel]
            lo, hi = bootstrap_ci(forgetting)
            out.append({"group": name, "round": r, "n": len(sel),
                        "rouge_noisy": sum(row["rouge_noisy"] for row in sel) / len(sel),
                        "rouge_safe": sum(row["rouge_safe"] for row in sel) / len(sel),
                        "forgetting": sum(forgetting) / len(sel), "forgetting_ci": [lo, hi]})
    return out


def plot_curve(points: list[dict], path: str | Path) -> None:
    """ROUGE-1 after every round (noisy 1, safe 1, noisy 2, ...) per example group: the learning and forgetting
    curve of the paper's interleaved training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in dict.fromkeys(p["group"] for p in points):
        mine = sorted((p for p in points if p["group"] == name), key=lambda p: p["round"])
        xs = [x for p in mine for x in (2 * p["round"] - 1, 2 * p["round"])]
        ys = [y for p in mine for y in (p["rouge_noisy"], p["rouge_safe"])]
        ax.plot(xs, ys, marker="o", label=f"{name} rows")
    rounds = max(p["round"] for p in points)
    ax.set_xticks(range(1, 2 * rounds + 1), [f"{ph} {r}" for r in range(1, rounds + 1) for ph in PHASES])
    ax.set_ylabel("ROUGE-1 vs own response")
    ax.set_title("ForgetFilter: learning (noisy) and forgetting (safe)")
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def filter_tables(table: pa.Table, rows: list[dict], opts: ForgetFilterOptions
                  ) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(kept rows in input order, decisions with score = forgetting, per-example-and-round scores table)."""
    ids = table.column("id").to_pylist()
    scores = example_scores(ids, rows, opts.score_rounds)
    kept, reasons = filter_rule(scores, opts.threshold, opts.drop_fraction)
    per_round = pa.Table.from_pylist(rows)
    if "unsafe" in table.column_names:
        unsafe = dict(zip(ids, table.column("unsafe").to_pylist(), strict=True))
        per_round = per_round.append_column("unsafe", pa.array([unsafe[i] for i in per_round.column("id").to_pylist()],
                                                               pa.bool_()))
    return (table.filter(pa.array(kept, pa.bool_())), decisions_table(ids, kept, reasons, scores), per_round)


def read_generations(paths: list[str], ids: list[str]) -> dict[tuple[int, str], list[str]]:
    """Completions per (round, phase) in the order of `ids`, gathered from the shard files (each records its
    round, phase and shard in its metadata). Every id must be answered exactly once per round and phase."""
    found: dict[tuple[int, str], dict[str, str]] = {}
    for path in paths:
        table = pq.read_table(path)
        missing = [c for c in ("id", "completion") if c not in table.column_names]
        if missing:
            raise DataError(path, None, missing[0], "missing column")
        meta = json.loads((table.schema.metadata or {}).get(b"safeft_forgetfilter", b"{}"))
        if "round" not in meta:
            raise DataError(path, None, None, "not a forgetfilter generation shard (no round/phase metadata)")
        answers = found.setdefault((meta["round"], meta["phase"]), {})
        for row_no, (i, text) in enumerate(zip(table.column("id").to_pylist(), table.column("completion").to_pylist(),
                                               strict=True)):
            if i in answers:
                raise DataError(path, row_no, "id", f"{i!r} was answered twice in round {meta['round']} "
                                                    f"{meta['phase']}")
            answers[i] = text
    out = {}
    for key, answers in sorted(found.items()):
        missing = [i for i in ids if i not in answers]
        if missing:
            raise DataError(paths[0], None, "id", f"{len(missing)} rows (first {missing[0]!r}) have no completion "
                                                  f"in round {key[0]} {key[1]}")
        out[key] = [answers[i] for i in ids]
    return out


# ---------------------------------------------------------------- commands


def references(table: pa.Table, path: str) -> list[str]:
    out = []
    for row_no, messages in enumerate(table.column("messages").to_pylist()):
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(path, row_no, "messages", "a noisy-set row must end with the assistant turn to score")
        out.append(messages[-1]["content"])
    return out


def shard_rows(table: pa.Table, shard: int, shards: int) -> pa.Table:
    """The rows of shard `shard` (1-based) of `shards`, by id hash: the same split on every run."""
    keep = [shard_of(i, shards) == shard - 1 for i in table.column("id").to_pylist()]
    return table.filter(pa.array(keep, pa.bool_()))


def generate_main(argv: list[str]) -> None:
    from workflow_scripts.generate import generate_table
    from workflow_scripts.llm import Endpoint, GenParams, cli_errors, open_backend

    ap = argparse.ArgumentParser(description="Greedy completions of one shard of the noisy set from one round's "
                                             "model (the shared backend library: hf or vllm).")
    ap.add_argument("--input", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--round", type=int, required=True)
    ap.add_argument("--phase", choices=PHASES, required=True)
    ap.add_argument("--shard", required=True, help="K-of-N")
    ap.add_argument("--options", required=True)
    ap.add_argument("--cache", default=None, help="request cache: a killed job does not generate twice")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        opts = options_from_cli(ForgetFilterOptions, "forgetfilter", args.options, {})
    except ValueError as err:
        ap.error(str(err))
    shard, shards = (int(x) for x in args.shard.split("-of-"))
    with cli_errors():
        table = shard_rows(read_table(args.input), shard, shards)
        backend = open_backend(Endpoint(backend=opts.backend, model=args.model), threads=args.threads,
                               cache=args.cache)
        start = time.time()
        out = generate_table(table, backend, GenParams(opts.max_new_tokens, 0.0, 1.0, opts.batch_size, opts.seed),
                             args.input)
    meta = {**(out.schema.metadata or {}), b"safeft_forgetfilter": json.dumps(
        {"round": args.round, "phase": args.phase, "shard": shard, "shards": shards, "model": args.model}).encode()}
    with atomic_file(args.output, suffix=".parquet") as tmp:
        pq.write_table(out.replace_schema_metadata(meta), tmp, compression="zstd")
    print(f"forgetfilter: {out.num_rows} completions of round {args.round} {args.phase} in "
          f"{time.time() - start:.1f} s")


def run_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="Score forgetting from the rounds' generations and filter the rows.")
    ap.add_argument("--input", required=True, help="the noisy set: the previous step's table or the raw data")
    ap.add_argument("--output", required=True)
    ap.add_argument("--decisions", required=True)
    ap.add_argument("--scores", required=True, help="per example and round: rouge_noisy, rouge_safe, forgetting")
    ap.add_argument("--curve", required=True, help="curve JSON; the plot is written beside it (.png)")
    ap.add_argument("--generations", nargs="+", required=True)
    ap.add_argument("--options", required=True)
    args = ap.parse_args(argv)
    try:
        opts = options_from_cli(ForgetFilterOptions, "forgetfilter", args.options, {})
    except ValueError as err:
        ap.error(str(err))
    try:
        table = read_table(args.input)
        ids = table.column("id").to_pylist()
        gens = read_generations(args.generations, ids)
        expected = set(schedule(opts.interleave))
        if set(gens) != expected:
            raise DataError(args.generations[0], None, None, f"generations cover rounds {sorted(gens)}, the "
                                                             f"options ask for {sorted(expected)}")
        rows = forgetting_rows(ids, references(table, args.input), gens)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    out, decisions, per_round = filter_tables(table, rows, opts)
    points = curve(table, rows)
    write_table(per_round, args.scores)
    write_json({"options": {k: v for k, v in opts.__dict__.items() if k != "recipe"}, "rows": table.num_rows,
                "kept": out.num_rows, "curve": points}, args.curve)
    plot_curve(points, Path(args.curve).with_suffix(".png"))
    write_table(decisions, args.decisions)
    write_table(out, args.output)
    print(f"forgetfilter: kept {out.num_rows} of {table.num_rows} rows")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    commands = {"generate": generate_main, "run": run_main}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: python -m workflow_scripts.forgetfilter {{{','.join(commands)}}} ...")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
