"""ReAlign rewrite throughput with many requests in flight against one at a time: both runs send the same rewrite
requests (n samples per item) through the openai backend to a loopback OpenAI-compatible server that answers
each after a fixed latency, and print requests/s of each and their ratio (target >= 15x).

    python bench/bench_realign.py [--items 32] [--n 2] [--latency 0.2] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fake_openai import FakeOpenAI  # noqa: E402

from workflow_scripts import realign  # noqa: E402
from workflow_scripts.llm import GenParams, OpenAIBackend  # noqa: E402


def rewriter(messages, body):
    """A well-formed revision: the original answer (as the prompt gives it), restructured."""
    original = messages[-1]["content"].split("Original answer:\n", 1)[1].split("\n\nWrite the revised", 1)[0]
    return f"{realign.START}\n1. Answer: {original}\n2. Why: it follows.\n{realign.END}"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--n", type=int, default=2, help="rewrites per item")
    ap.add_argument("--latency", type=float, default=0.2, help="server seconds per request")
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    template, criteria = realign.load_prompt(realign.REWRITE_PROMPT), realign.load_criteria()
    prompts = [realign.rewrite_prompt(template, f"How do I do task {i}?", f"Do step {i}, then check it.",
                                      "how_to_generation", criteria["how_to_generation"], [])
               for i in range(args.items)]
    requests = args.items * args.n
    results = {}
    with FakeOpenAI(reply=rewriter, latency=args.latency) as server:
        for label, concurrency in (("sequential", 1), (f"{args.concurrency} in flight", args.concurrency)):
            backend = OpenAIBackend("bench", base_url=server.url, concurrency=concurrency, timeout=30)
            with contextlib.redirect_stdout(io.StringIO()):  # the backend's progress lines
                backend.generate(prompts[:1], GenParams(seed=-1))  # warm-up: first connection
                start = time.perf_counter()
                replies = realign.rewrite(prompts, backend, GenParams(), args.n)
                seconds = time.perf_counter() - start
            parsed = sum(realign.parse_rewrite(r) is not None for item in replies for r in item)
            assert parsed == requests, f"{label}: only {parsed}/{requests} replies parsed"
            results[label] = requests / seconds
            print(f"{label:>16}: {requests} rewrite requests in {seconds:6.2f} s, {results[label]:7.1f} requests/s")
    one, many = results.values()
    print(f"ratio {args.concurrency} in flight / sequential: {many / one:.1f}x (target >= 15x; "
          f"ideal {min(args.concurrency, args.items):d}x at {args.latency:g} s latency)")


if __name__ == "__main__":
    main()
