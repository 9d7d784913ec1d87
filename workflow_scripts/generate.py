"""Generation stage: completions for every prompt of a canonical eval table through one LLM endpoint
(workflow_scripts.llm: hf, vllm or openai), written with their generation params; `--cache` answers repeated
requests from a disk cache. `--sets` makes several eval sets in one process, so the model loads once.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq

from workflow_scripts.io import DataError, atomic_file, read_table, sha256_text
from workflow_scripts.llm import (
    GenParams,
    OpenAIBackend,
    add_endpoint_args,
    cli_errors,
    endpoint_from_args,
    open_backend,
    parse_batch_size,
)


def split_prompt(messages: list[dict]) -> tuple[list[dict], str | None]:
    """The prompt is everything before a trailing assistant turn; that turn (if any) is the reference."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def generate_table(table: pa.Table, backend, params: GenParams, path: str = "<table>") -> pa.Table:
    """Completions for every row: id, prompt messages, completion, reference and the optional columns."""
    rows = table.to_pylist()
    prompts, references = [], []
    for row_no, row in enumerate(rows):
        prompt, answer = split_prompt(row["messages"])
        if not prompt or prompt[-1]["role"] != "user":
            raise DataError(path, row_no, "messages", "an eval prompt must end with a user turn")
        prompts.append(prompt)
        references.append(row.get("reference") or answer)
    completions = backend.generate(prompts, params)
    columns = {"id": [r["id"] for r in rows], "messages": prompts, "completion": completions,
               "reference": references}
    for key in ("category", "source"):
        if key in table.column_names:
            columns[key] = table.column(key).to_pylist()
    out = pa.Table.from_pydict(columns)
    meta = {"backend": backend.name, "params": asdict(params),
            "chat_template_sha256": sha256_text(backend.chat_template)}
    return out.replace_schema_metadata({"safeft": json.dumps(meta)})


SET_KEYS = {"input", "output", "max_new_tokens", "temperature", "top_p", "limit", "cache"}


def parse_sets(text: str) -> list[dict]:
    """--sets: a JSON list of eval sets, each {input, output} and optionally max_new_tokens, temperature, top_p,
    limit and cache (the single-set flags of the same names)."""
    try:
        sets = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--sets is not JSON: {err}") from err
    if not isinstance(sets, list) or not sets:
        raise argparse.ArgumentTypeError("--sets must be a non-empty JSON list")
    for i, spec in enumerate(sets):
        if not isinstance(spec, dict) or not {"input", "output"} <= spec.keys():
            raise argparse.ArgumentTypeError(f"--sets item {i} needs `input` and `output`")
        if unknown := spec.keys() - SET_KEYS:
            raise argparse.ArgumentTypeError(f"--sets item {i}: unknown keys {sorted(unknown)}")
    return sets


def run_set(backend, spec: dict, defaults: argparse.Namespace) -> None:
    """One eval set: read, generate, write (atomically), with the set's own params over the CLI's."""
    value = {k: spec.get(k, getattr(defaults, k)) for k in ("max_new_tokens", "temperature", "top_p", "limit")}
    params = GenParams(value["max_new_tokens"], value["temperature"], value["top_p"], defaults.batch_size,
                       defaults.seed)
    table = read_table(spec["input"])
    if value["limit"]:
        table = table.slice(0, value["limit"])
    start = time.time()
    out = generate_table(table, backend, params, spec["input"])
    with atomic_file(spec["output"], suffix=".parquet") as tmp:
        pq.write_table(out, tmp, compression="zstd")
    if spec.get("cache"):
        print(f"cache {spec['cache']}: {backend.hits} hits, {backend.misses} misses, {backend.sent} sent")
    print(f"done: {spec['output']}: {out.num_rows} completions in {time.time() - start:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input")
    ap.add_argument("--output")
    ap.add_argument("--sets", type=parse_sets, default=None,
                    help="instead of --input/--output: a JSON list of eval sets made in this one process")
    add_endpoint_args(ap)
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--batch_size", type=parse_batch_size, default="auto",
                    help="hf: 'auto' (from the prompts and free memory) or a fixed number of prompts per batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="first N prompts only")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", default=None, help="SQLite request cache: only requests not in it are generated")
    args = ap.parse_args(argv)
    if args.sets is not None and (args.input or args.output):
        ap.error("--sets names its inputs and outputs: no --input or --output with it")
    if args.sets is None and (args.input is None or args.output is None):
        ap.error("give --input and --output, or --sets")
    sets = args.sets or [{"input": args.input, "output": args.output, "cache": args.cache}]
    if args.sets and args.cache:
        ap.error("with --sets, each set names its own cache")
    with cli_errors():
        for spec in sets:  # every input is checked before the model loads
            read_table(spec["input"])
        endpoint, loaded = endpoint_from_args(args), {}  # one model for all sets, each with its own cache
        for spec in sets:
            run_set(open_backend(endpoint, threads=args.threads, cache=spec.get("cache"), loaded=loaded), spec,
                    args)
    for backend in loaded.values():
        if isinstance(backend, OpenAIBackend):
            print(f"{backend.url}: {backend.requests} requests, {backend.retries} of them retries")


if __name__ == "__main__":
    main()
