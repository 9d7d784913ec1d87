"""Generation stage: completions for every prompt of a canonical eval table through one LLM endpoint
(workflow_scripts.llm: hf, vllm or openai), written with their generation params; `--cache` answers repeated
requests from a disk cache.
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
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
    params = GenParams(args.max_new_tokens, args.temperature, args.top_p, args.batch_size, args.seed)
    with cli_errors():
        table = read_table(args.input)
        if args.limit:
            table = table.slice(0, args.limit)
        backend = open_backend(endpoint_from_args(args), threads=args.threads, cache=args.cache)
        start = time.time()
        out = generate_table(table, backend, params, args.input)
    with atomic_file(args.output, suffix=".parquet") as tmp:
        pq.write_table(out, tmp, compression="zstd")
    if args.cache:
        print(f"cache {args.cache}: {backend.hits} hits, {backend.misses} misses, {backend.sent} sent")
    inner = getattr(backend, "backend", backend)
    if isinstance(inner, OpenAIBackend):
        print(f"{inner.url}: {inner.requests} requests, {inner.retries} of them retries")
    print(f"done: {out.num_rows} completions in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
