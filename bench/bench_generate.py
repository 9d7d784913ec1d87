"""Generation throughput of the `hf` backend on the demo model: the old path against the new one.

    python -c 'from pathlib import Path; from workflow_scripts import models; \
               models.materialise("demo_gguf", Path("/tmp/smollm2"))'          # once, about a minute
    python bench/bench_generate.py --model /tmp/smollm2 [--prompts 128] [--max_new_tokens 32] [--threads 2]

Without --model the demo GGUF is converted into a temporary folder first (about a minute, every run).

The prompts are demo-style eval prompts (half demo_data.harmful_eval_set, half demo_data.math_set), answered
greedily by one backend object in this one process, in two ways:

  old   the path before issue 10: longest first, fixed batches of 16, each batch's prompts processed whole with
        left padding by one model.generate call;
  auto  HFBackend.generate with batch_size "auto": batches sized from the work and the free memory, the shared
        prompt prefix computed once and the rest in length-sorted chunks, greedy decoding that drops each row
        from the batch when it ends;
  auto, generate()  the same batches decoded by model.generate, which computes finished rows until the batch's
        last row ends (the auto path before rows were dropped).

It prints the CPU (or GPU) model, the measured float32 matmul peak (2048 x 2048 torch.matmul with the same
threads), new tokens/s of each path and their ratio (target >= 2x), the model FLOP utilisation of each
(2 x parameters x new tokens/s / peak: prompt processing counts as overhead) and how many greedy answers agree.
"""

import argparse
import time

import torch

from workflow_scripts import demo_data, hardware, llm, models


def count_tokens(tokenizer, texts):
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def old_generate(backend, prompts, max_new_tokens, batch_size=16):
    """HFBackend.generate as it was before issue 10 (greedy only): fixed batches, whole prompts left-padded."""
    texts = backend.render(prompts)
    lengths = [len(ids) for ids in backend.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = backend.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                  add_special_tokens=False).to(backend.device)
        with torch.inference_mode():
            gen = backend.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=backend.tokenizer.pad_token_id)
        new = gen[:, batch["input_ids"].shape[1]:]
        for i, text in zip(idx, backend.tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
            out[i] = text
    return out


def without_row_dropping(backend, prompts, max_new_tokens):
    """The auto path with model.generate decoding each batch (finished rows computed until the last one ends)."""
    backend._plain_greedy = lambda: False
    try:
        return backend.generate(prompts, llm.GenParams(max_new_tokens=max_new_tokens))
    finally:
        del backend._plain_greedy


def matmul_peak(device, n=2048, repeats=10):
    """Best float32 FLOP/s of an n x n matmul on this device (with the threads already set)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(3):
        torch.matmul(a, b)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        sync()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n ** 3 / best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: convert the demo GGUF)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--old_batch_size", type=int, default=16, help="the old path's fixed batch size")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = models.demo_model_dir(args.model)
    backend = llm.HFBackend(model, threads=args.threads)
    torch.set_num_threads(args.threads)
    device = backend.device
    name = torch.cuda.get_device_name(0) if device == "cuda" else hardware.cpu_model()
    peak = matmul_peak(device)
    params = sum(p.numel() for p in backend.model.parameters())
    print(f"{device}: {name}, {args.threads} threads; float32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"model {model}: {params / 1e6:.1f} M parameters, {backend.model.dtype}")

    half = args.prompts // 2
    prompts = [r["messages"][:1] for r in demo_data.harmful_eval_set(half, 0)]
    prompts += [r["messages"][:1] for r in demo_data.math_set(args.prompts - half, 7, "bench")]
    backend.generate(prompts[:2], llm.GenParams(max_new_tokens=4, batch_size=2))  # warm-up

    runs = {
        f"old (batch {args.old_batch_size})": lambda: old_generate(backend, prompts, args.max_new_tokens,
                                                                   args.old_batch_size),
        "auto, generate()": lambda: without_row_dropping(backend, prompts, args.max_new_tokens),
        "auto": lambda: backend.generate(prompts, llm.GenParams(max_new_tokens=args.max_new_tokens)),
    }
    rates, answers = {}, {}
    for label, run in runs.items():
        start = time.perf_counter()
        answers[label] = run()
        seconds = time.perf_counter() - start
        if label == "auto":
            label = f"auto (batch {backend.last_batch_size})"
            answers[label] = answers.pop("auto")
        rates[label] = count_tokens(backend.tokenizer, answers[label]) / seconds
        mfu = 2 * params * rates[label] / peak
        print(f"{label:>18}: {len(prompts)} prompts x {args.max_new_tokens} new tokens in {seconds:6.1f} s, "
              f"{rates[label]:7.1f} new tokens/s, MFU {mfu:6.1%}", flush=True)
    old, plain, new = rates.values()
    first, second, third = answers.values()
    same = sum(a == b == c for a, b, c in zip(first, second, third, strict=True))
    print(f"ratio auto / old: {new / old:.2f}x (target >= 2x); auto / auto with generate(): {new / plain:.2f}x; "
          f"greedy answers identical in all three: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
