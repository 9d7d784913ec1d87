"""Batched vs one-at-a-time HF generation on the demo model: prints tokens/s of each and their ratio.

    python bench/bench_generate.py [--model models/base/smollm2] [--prompts 32] [--batch_size 16]

Both runs use the same backend object, prompts and greedy settings, in this one process; the target is a
ratio >= 4x.
"""

import argparse
import tempfile
import time
from pathlib import Path

from workflow_scripts import demo_data, generate, models


def count_tokens(tokenizer, texts):
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="HF model folder (default: convert the demo GGUF)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = args.model
    if model is None:
        model = str(Path(tempfile.mkdtemp()) / "smollm2")
        models.materialise("demo_gguf", Path(model))
    backend = generate.HFBackend(model, threads=args.threads)
    prompts = [r["messages"][:1] for r in demo_data.math_set(args.prompts, 7, "bench")]
    backend.generate(prompts[:2], generate.GenParams(max_new_tokens=4, batch_size=2))  # warm-up

    results = {}
    for label, batch in (("one at a time", 1), (f"batched ({args.batch_size})", args.batch_size)):
        params = generate.GenParams(max_new_tokens=args.max_new_tokens, batch_size=batch)
        start = time.perf_counter()
        texts = backend.generate(prompts, params)
        seconds = time.perf_counter() - start
        results[label] = count_tokens(backend.tokenizer, texts) / seconds
        print(f"{label:>16}: {len(prompts)} prompts in {seconds:6.1f} s, {results[label]:7.1f} new tokens/s")
    one, batched = results.values()
    print(f"ratio batched / one-at-a-time: {batched / one:.2f}x (target >= 4x)")


if __name__ == "__main__":
    main()
