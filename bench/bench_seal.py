"""SEAL's selector run against plain LoRA SFT on the same fine-tuning rows, the same LoRA settings, batch size,
learning rate and epochs, each in its own child process (so each peak memory is its own).

    python bench/bench_seal.py --model models/base/smollm2_aligned [--rows 64] [--batch_size 8] [--epochs 1]

Prints each run's seconds and peak RSS, and the ratio selector / SFT (target: at most 2.5x). The selector also
forwards a safe batch per step, so its work per step is about twice SFT's.
"""

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workflow_scripts import demo_data  # noqa: E402
from workflow_scripts.io import records_to_table, write_table  # noqa: E402


def run_sft(model, data, args, out):
    from workflow_scripts.train import train

    recipe = {"finetune": "lora", "lora_r": 16, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
              "lr": 1e-5, "batch_size": args.batch_size, "epochs": args.epochs, "max_length": 256,
              "checkpoint_steps": 0, "report_to": "none", "dtype": args.dtype}
    train(model, [data], str(out), recipe, seed=0, threads=args.threads)


def run_seal(model, data, args, out):
    from workflow_scripts import seal
    from workflow_scripts.io import read_table

    ft = read_table(data)
    safe = records_to_table(demo_data.refusal_set(args.rows, 0))
    opts = seal.SealOptions(safe="safe", epochs=args.epochs, batch_size=args.batch_size, max_length=256,
                            checkpoint_steps=0, dtype=args.dtype)
    seal.train_selector(model, ft, safe, opts, threads=args.threads)


def child(name, model, data, args, out, queue):
    start = time.perf_counter()
    {"sft": run_sft, "seal": run_seal}[name](model, data, args, out)
    queue.put((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ft.parquet"
        write_table(records_to_table(demo_data.benign_mix(args.rows, 0)), data)
        results = {}
        ctx = mp.get_context("spawn")
        for name in ("sft", "seal"):
            queue = ctx.Queue()
            proc = ctx.Process(target=child, args=(name, args.model, str(data), args, Path(tmp) / name, queue))
            proc.start()
            seconds, rss = queue.get()
            proc.join()
            results[name] = seconds
            print(f"{name:>5}: {seconds:7.1f} s, peak RSS {rss:7.0f} MiB", flush=True)
    print(f"ratio selector / SFT: {results['seal'] / results['sft']:.2f}x (target <= 2.5x)")


if __name__ == "__main__":
    main()
