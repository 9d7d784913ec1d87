"""Throughput of the preview CLI (batched, streaming) against the reference tool's one-record-at-a-time loop.

Generates GSM8K-shaped JSONL (question ~45 words, answer ~60 words ending in `#### N`), runs
`python -m workflow_scripts.preview --mode real` on all of it in a child process (wall time and that child's
peak RSS), and the reference loop on a prefix of the same file in this process (before and after ours; the
faster run counts), checks both outputs agree, and prints records/s and the ratio.

    python bench/bench_preview.py [--n 1000000] [--baseline_n 50000] [--tokenizer_path DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina", "Randy", "Mark",
         "Janet", "Carla", "Toulouse", "Eliza", "Joy", "Mrs. Snyder", "Jean", "Marie", "Terry"]
THINGS = ["clips", "eggs", "apples", "pages", "dollars", "cupcakes", "marbles", "stickers", "books", "miles",
          "hours", "sheep", "cookies", "pencils", "tickets", "flowers", "candies", "boxes", "shirts", "cards"]
VERBS = ["sold", "bought", "baked", "read", "earned", "collected", "gave away", "found", "drove", "made"]
FILLER = ("and then she had half as many more in the next week so how many does the store have left after "
          "all of this if every one of them costs twice as much as last year when they were on sale for the "
          "whole month of April while her brother kept the rest").split()


def gsm8k_like(rng: random.Random) -> dict:
    name, thing, verb = rng.choice(NAMES), rng.choice(THINGS), rng.choice(VERBS)
    a, b = rng.randint(2, 99), rng.randint(2, 12)
    words = rng.choices(FILLER, k=30)
    question = (f"{name} {verb} {a} {thing} in April, {' '.join(words[:15])}. In May {name} {verb} {b} times "
                f"as many {thing}, {' '.join(words[15:])}. How many {thing} did {name} have in total?")
    c = a * b
    steps = rng.choices(FILLER, k=28)
    answer = (f"In May {name} {verb} {a}*{b} = <<{a}*{b}={c}>>{c} {thing}. "
              f"{' '.join(steps[:14]).capitalize()}.\n"
              f"Altogether {name} {verb} {a}+{c} = <<{a}+{c}={a + c}>>{a + c} {thing}, "
              f"{' '.join(steps[14:])}.\n#### {a + c}")
    return {"question": question, "answer": answer}


def write_data(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    pool = [json.dumps(gsm8k_like(rng)) for _ in range(min(n, 50_000))]
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, n, 10_000):
            # Records repeat after the pool, with a unique id so no two lines are identical.
            stop = min(n, start + 10_000)
            f.write("".join(f'{{"id": {i}, {pool[i % len(pool)][1:]}\n' for i in range(start, stop)))


def demo_tokenizer(out: Path) -> Path:
    from transformers import AutoTokenizer

    from workflow_scripts import models

    gguf = models.demo_gguf_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def run_ours(src: Path, dst: Path, tokenizer_path: Path, m: int) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and peak RSS (bytes) of the CLI, measured on that child alone via wait4."""
    cmd = [sys.executable, "-m", "workflow_scripts.preview", "--input_file", str(src),
           "--output_file", str(dst), "--input_format", "jsonl", "--output_format", "jsonl",
           "--input_field", "question", "--output_field", "answer", "--mode", "real", "--m", str(m),
           "--tokenizer_path", str(tokenizer_path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"preview CLI failed with exit code {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def run_reference(src: Path, dst: Path, tokenizer, m: int, limit: int) -> tuple[float, float, int]:
    """The reference main.py's loop on the first `limit` records: read all, tokenize each, write all."""
    with open(src, encoding="utf-8") as f:
        lines = [line for _, line in zip(range(limit), f, strict=False)]
    with open(os.devnull, "w") as devnull:
        t0, c0 = time.perf_counter(), time.process_time()
        data = [json.loads(line) for line in lines if line.strip()]
        processed = []
        for index, item in enumerate(data, 1):
            if "question" not in item or "answer" not in item:
                raise ValueError(f"Item {index} is missing a field")
            tokens = tokenizer.tokenize(item["answer"])
            item["question"] = item["question"] + " The answer begins with: " + \
                tokenizer.convert_tokens_to_string(tokens[:m])
            processed.append(item)
            if index % 1000 == 0:
                print(f"Processed {index} items...", file=devnull)
        with open(dst, "w", encoding="utf-8") as f:
            for item in processed:
                f.write(json.dumps(item) + "\n")
        return time.perf_counter() - t0, time.process_time() - c0, len(processed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="records for our CLI")
    ap.add_argument("--baseline_n", type=int, default=50_000, help="records for the reference loop")
    ap.add_argument("--m", type=int, default=6)
    ap.add_argument("--tokenizer_path", type=Path, help="default: the demo SmolLM2 tokenizer from its GGUF")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_preview.") as tmp:
        tmp = Path(tmp)
        tok_path = args.tokenizer_path or demo_tokenizer(tmp / "tokenizer")
        src = tmp / "gsm8k_like.jsonl"
        t0 = time.perf_counter()
        write_data(src, args.n)
        size = src.stat().st_size
        took = time.perf_counter() - t0
        print(f"data: {args.n:,} records, {size / 2**20:.0f} MiB, written in {took:.1f} s")

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_path)
        limit = min(args.baseline_n, args.n)
        # This box may be shared: time the reference before and after ours and keep its faster run, so a
        # busy spell cannot flatter the ratio.
        ref_runs = [run_reference(src, tmp / "reference.jsonl", tokenizer, args.m, limit)]
        ours_s, ours_cpu, rss = run_ours(src, tmp / "ours.jsonl", tok_path, args.m)
        ref_runs.append(run_reference(src, tmp / "reference.jsonl", tokenizer, args.m, limit))
        ref_s, ref_cpu, count = min(ref_runs)

        print(f"ours (batched, streaming CLI, end to end incl. startup): {args.n:,} records in {ours_s:.1f} s"
              f" = {args.n / ours_s:,.0f} records/s ({ours_cpu:.1f} CPU s); peak RSS {rss / 2**20:.0f} MiB"
              " (target <= 1536 MiB)")
        ref_rate = count / ref_s
        extrapolated = ""
        if count < args.n:
            extrapolated = f", extrapolated to {args.n:,} records: {args.n / ref_rate:.0f} s"
        print(f"reference loop (one record at a time, timed on the first {count:,} records, excluding its "
              f"startup; faster of {len(ref_runs)} runs: {', '.join(f'{r[0]:.1f}' for r in ref_runs)} s): "
              f"{ref_s:.1f} s = {ref_rate:,.0f} records/s ({ref_cpu:.1f} CPU s){extrapolated}")
        with open(tmp / "ours.jsonl", "rb") as f:
            head = b"".join(line for _, line in zip(range(count), f, strict=False))
        same = head == (tmp / "reference.jsonl").read_bytes()
        print(f"outputs on those {count:,} records byte-identical: {same}")
        print(f"speed-up: {(args.n / ours_s) / ref_rate:.1f}x wall (target >= 5x), "
              f"{(args.n / ours_cpu) / (count / ref_cpu):.1f}x CPU time")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
