"""A LoRA training step of the demo model: logits over every position against logits only where they predict
answer tokens (the sft objective's AnswerLogitsTrainer), in the same process.

    python bench/bench_train_step.py --model /tmp/smollm2 [--batches 6] [--threads 2]

(/tmp/smollm2 as in bench_generate.py; without --model the demo GGUF is converted into a temporary folder first.)

The batches are the demo's benign fine-tuning rows (demo_data: arithmetic and how-to answers) encoded as the sft
objective encodes them (chat template, labels on the answer only), 8 rows each, padded as the Trainer's collator
pads them. Each step is a forward and backward pass of the demo recipe's adapter (all linear layers, r16); the
optimiser step is the same for both and left out. It prints the CPU, the seconds per step of each way, their
ratio, and the largest difference between the two ways' losses.
"""

import argparse
import time

import torch

from workflow_scripts import demo_data, hardware, models, objectives, train


def batches(tokenizer, n_batches, size=8):
    from transformers import DataCollatorForSeq2Seq

    rows = demo_data.math_set(n_batches * size // 2, 3, "bench") + \
        demo_data.howto_set(n_batches * size - n_batches * size // 2, 3, "bench")
    examples = [objectives.encode_example(tokenizer, r["messages"], 256) for r in rows]
    examples.sort(key=lambda e: len(e["input_ids"]))  # the Trainer groups by length
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=objectives.IGNORE)
    return [collate(examples[i:i + size]) for i in range(0, len(examples), size)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: convert the demo GGUF)")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = models.demo_model_dir(args.model)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           objectives.lora_config(train.full_recipe({})))
    data = batches(tokenizer, args.batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    print(f"cpu: {hardware.cpu_model()}, {args.threads} threads; {len(data)} batches of 8, {tokens} tokens")

    def step(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.item()

    ways = {"every position": lambda b: b, "answer positions": lambda b: objectives.answer_inputs(model, b)}
    step(data[0])  # warm-up
    seconds, losses = {}, {}
    for _ in range(2):  # alternated, so that a change in machine load hits both
        for name, inputs in ways.items():
            start = time.perf_counter()
            losses[name] = [step(inputs(b)) for b in data]
            seconds[name] = min(seconds.get(name, float("inf")), (time.perf_counter() - start) / len(data))
    for name, s in seconds.items():
        print(f"{name:>16}: {s:5.2f} s a step, {tokens / len(data) / s:6.1f} tokens/s")
    full, cut = seconds.values()
    diff = max(abs(a - b) for a, b in zip(*losses.values(), strict=True))
    print(f"ratio every / answer positions: {full / cut:.2f}x; largest loss difference {diff:.2e}")


if __name__ == "__main__":
    main()
