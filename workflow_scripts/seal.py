"""SEAL (Shen et al.): learn one weight per fine-tuning example by bilevel optimisation against a safe dataset, then
keep the top p of the examples by their learnt logit. One method step; the selector's model is discarded and the
experiment's recipe fine-tunes the base on the kept rows.

Per step, a safe batch and a fine-tuning batch (two independently shuffled orders, zipped): the model (LoRA) takes
an Adam step on lam * mean safe loss + (1 - lam) * mean(w_i * l_i) with the weights detached, then the selector
takes an Adam step on mean(w_i(z) * l_i) with the same losses detached. w = N * softmax(z) (or 2 * sigmoid(z)).
lam drops by lam_decay at the start of every epoch after the first. Everything is keyed by example id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from workflow_scripts.io import DataError, decisions_table, read_table, write_json, write_table
from workflow_scripts.methods import step_cli

log = logging.getLogger("safeft.seal")
ACTIVATIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class SealOptions:
    """A seal step's options; `safe` names the safe dataset (the job gets its file). Defaults: the reference's
    settings (LoRA r16, alpha 16 on q and v; model lr 1e-5, selector lr 5e-3; 3 epochs; batch 64; p = 0.8)."""

    safe: str
    p: float = 0.8
    activation: str = "softmax"
    lam: float = 1.0
    lam_decay: float = 0.03
    epochs: int = 3
    lr: float = 1e-5
    selector_lr: float = 5e-3
    batch_size: int = 64
    lora_r: int = 16
    lora_alpha: int = 16
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    max_length: int = 512
    seed: int = 0
    checkpoint_steps: int = 20
    dtype: str = "auto"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"seal option 'activation' must be one of {', '.join(ACTIVATIONS)}")
        if not 0 < self.p <= 1:
            raise ValueError(f"seal option 'p' must be in (0, 1], not {self.p}")
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"seal option {name!r} must be >= 1")


# ---------------------------------------------------------------- the selector's pieces


def initial_logits(n: int, activation: str):
    import torch

    return torch.full((n,), 0.1 if activation == "softmax" else -1e-4, dtype=torch.float32)


def weights(z, activation: str):
    """Example weights from the logits: N * softmax(z) (start at 1, sum to N) or 2 * sigmoid(z) (start near 1)."""
    import torch

    return z.numel() * torch.softmax(z, 0) if activation == "softmax" else 2 * torch.sigmoid(z)


def lam_at(epoch: int, lam: float, decay: float) -> float:
    """The safe loss's share in epoch `epoch` (0-based): lam, less decay for every epoch after the first."""
    return max(lam - decay * epoch, 0.0)


def epoch_orders(n_safe: int, n_ft: int, seed: int, epoch: int) -> list[tuple[list[int], list[int]]]:
    """The epoch's batches as (safe rows, fine-tuning rows) of two independently shuffled orders, zipped: as many
    batches as the shorter order fills (a last, smaller batch included). Seeded by (seed, epoch), so a resumed
    run replays the same batches."""
    import random

    rng = random.Random(f"seal:{seed}:{epoch}")
    safe, ft = list(range(n_safe)), list(range(n_ft))
    rng.shuffle(safe)
    rng.shuffle(ft)
    return list(zip(safe, ft, strict=False))


def batches(pairs: list[tuple[int, int]], size: int) -> list[tuple[list[int], list[int]]]:
    return [([s for s, _ in pairs[k:k + size]], [f for _, f in pairs[k:k + size]]) for k in range(0, len(pairs), size)]


def collate(examples: list[dict], pad_id: int, device):
    import torch

    from workflow_scripts.objectives import IGNORE

    width = max(len(e["input_ids"]) for e in examples)

    def pad(key, value):
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples], device=device)

    return {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE)}


def example_losses(model, batch):
    from workflow_scripts.objectives import answer_losses

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return answer_losses(logits, batch["labels"])


def bilevel_step(model, z, model_opt, selector_opt, safe_batch, ft_batch, ft_rows, lam: float, activation: str):
    """One step of both levels, from one forward pass per batch. Returns (model loss, safe loss, mean ft loss)."""
    import torch

    l_safe = example_losses(model, safe_batch).mean()
    l_ft = example_losses(model, ft_batch)
    rows = torch.as_tensor(ft_rows)
    w = weights(z, activation)[rows]
    loss = lam * l_safe + (1 - lam) * (w.detach() * l_ft).mean()
    model_opt.zero_grad()
    loss.backward()
    model_opt.step()
    # The selector's loss reuses the fine-tuning losses, detached: no second forward pass.
    selector_loss = (weights(z, activation)[rows] * l_ft.detach()).mean()
    selector_opt.zero_grad()
    selector_loss.backward()
    selector_opt.step()
    return float(loss.detach()), float(l_safe.detach()), float(l_ft.detach().mean())


def select(ids: list[str], logits: list[float], p: float) -> list[bool]:
    """Keep the int(p * N) examples with the highest logits (ties: earlier row first), by position in `ids`."""
    k = int(p * len(ids))
    order = sorted(range(len(ids)), key=lambda i: (-logits[i], i))
    keep = set(order[:k])
    return [i in keep for i in range(len(ids))]


# ---------------------------------------------------------------- the resumable selector run


def run_fingerprint(opts: SealOptions, base: str, ft_ids: list[str], safe_ids: list[str], dtype: str) -> str:
    blob = json.dumps({"opts": asdict(opts), "base": str(Path(base).resolve()), "ft": ft_ids, "safe": safe_ids,
                       "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_state(path: Path, state: dict) -> None:
    """Write the checkpoint under a temporary name and rename it: a kill mid-write leaves the previous one."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_selector(base: str, ft_table: pa.Table, safe_table: pa.Table, opts: SealOptions,
                   checkpoint: str | Path | None = None, threads: int | None = None, stop_after: int | None = None,
                   paths: tuple[str, str] = ("<fine-tuning set>", "<safe set>")) -> dict | None:
    """Train the selector; returns {"logits", "weights", "log"} or None when stopped (SIGTERM, or `stop_after`
    optimiser steps for tests) after saving a checkpoint. A run started again with the same inputs and options
    resumes from the checkpoint: LoRA weights, both Adam states, the logits and the position in the epoch."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workflow_scripts.hardware import resolve_dtype
    from workflow_scripts.objectives import encode_table

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(opts.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ft = encode_table(tokenizer, ft_table, opts.max_length, paths[0])
    safe = encode_table(tokenizer, safe_table, opts.max_length, paths[1])
    precision = resolve_dtype(opts.dtype)
    if precision["warning"]:
        log.warning("%s", precision["warning"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, precision["dtype"])).to(device)
    model = get_peft_model(model, LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=0.0,
                                             target_modules=list(opts.target_modules), task_type="CAUSAL_LM"))
    model.train()
    z = initial_logits(len(ft), opts.activation).to(device).requires_grad_()
    model_opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=opts.lr, betas=(0.9, 0.95))
    selector_opt = torch.optim.Adam([z], lr=opts.selector_lr, betas=(0.9, 0.95), weight_decay=0.0)

    ft_ids, safe_ids = ft_table.column("id").to_pylist(), safe_table.column("id").to_pylist()
    fingerprint = run_fingerprint(opts, base, ft_ids, safe_ids, precision["dtype"])
    ckpt = Path(checkpoint) / "selector_state.pt" if checkpoint else None
    epoch, position, step, history = 0, 0, 0, []
    if ckpt and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["fingerprint"] == fingerprint:
            set_peft_model_state_dict(model, state["adapter"])
            model_opt.load_state_dict(state["model_opt"])
            selector_opt.load_state_dict(state["selector_opt"])
            with torch.no_grad():
                z.copy_(state["z"])
            epoch, position, step, history = state["epoch"], state["position"], state["step"], state["history"]
            log.info("resuming the selector at epoch %d, batch %d (step %d)", epoch, position, step)
        else:
            log.info("checkpoint %s belongs to another run: starting afresh", ckpt)

    def checkpoint_now():
        if ckpt:
            save_state(ckpt, {"fingerprint": fingerprint, "adapter": get_peft_model_state_dict(model),
                              "model_opt": model_opt.state_dict(), "selector_opt": selector_opt.state_dict(),
                              "z": z.detach().cpu(), "epoch": epoch, "position": position, "step": step,
                              "history": history})

    stop = {"signal": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    start = time.time()
    try:
        while epoch < opts.epochs:
            lam = lam_at(epoch, opts.lam, opts.lam_decay)
            plan = batches(epoch_orders(len(safe), len(ft), opts.seed, epoch), opts.batch_size)
            while position < len(plan):
                safe_rows, ft_rows = plan[position]
                loss, l_safe, l_ft = bilevel_step(
                    model, z, model_opt, selector_opt, collate([safe[i] for i in safe_rows], tokenizer.pad_token_id,
                                                               device),
                    collate([ft[i] for i in ft_rows], tokenizer.pad_token_id, device), ft_rows, lam, opts.activation)
                position += 1
                step += 1
                history.append({"step": step, "epoch": epoch, "lam": lam, "loss": loss, "safe_loss": l_safe,
                                "ft_loss": l_ft})
                log.info("epoch %d step %d: loss %.4f (safe %.4f, fine-tuning %.4f), lam %.2f", epoch, step, loss,
                         l_safe, l_ft, lam)
                if stop["signal"] or step == stop_after:
                    checkpoint_now()
                    return None
                if opts.checkpoint_steps and step % opts.checkpoint_steps == 0:
                    checkpoint_now()
            epoch, position = epoch + 1, 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    z_final = z.detach().cpu()
    return {"logits": z_final.tolist(), "weights": weights(z_final, opts.activation).tolist(),
            "log": {"steps": step, "seconds": round(time.time() - start, 1), "precision": precision,
                    "history": history}}


def selection_tables(table: pa.Table, logits: list[float], w: list[float], p: float
                     ) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(kept rows in input order, decisions with score = logit, selector table: id, logit, weight, rank, unsafe)."""
    ids = table.column("id").to_pylist()
    kept = select(ids, logits, p)
    order = sorted(range(len(ids)), key=lambda i: (-logits[i], i))
    rank = {i: r for r, i in enumerate(order, 1)}
    columns = {"id": ids, "logit": logits, "weight": w, "rank": [rank[i] for i in range(len(ids))], "kept": kept}
    if "unsafe" in table.column_names:
        columns["unsafe"] = table.column("unsafe").to_pylist()
    reasons = [f"seal:{'top' if k else 'below'}_p={p}" for k in kept]
    return (table.filter(pa.array(kept, pa.bool_())), decisions_table(ids, kept, reasons, logits),
            pa.Table.from_pydict(columns))


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    def extra(p):
        p.add_argument("--base", required=True, help="the experiment's base model folder")
        p.add_argument("--selector", required=True, help="selector.parquet: id, logit, weight, rank, unsafe")
        p.add_argument("--checkpoint_dir", default=None, help="resumable selector state")
        p.add_argument("--threads", type=int, default=None)

    args = step_cli(SealOptions, "seal", __doc__, argv, extra)
    opts = args.options
    try:
        table, safe = read_table(args.input), read_table(opts.safe)
        if table.num_rows == 0 or safe.num_rows == 0:
            raise DataError(args.input if table.num_rows == 0 else opts.safe, None, None, "no rows to train on")
        result = train_selector(args.base, table, safe, opts, args.checkpoint_dir, args.threads,
                                paths=(args.input, opts.safe))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if result is None:
        print("seal: stopped by SIGTERM; the selector state is saved for the rerun", file=sys.stderr)
        raise SystemExit(143)
    out, decisions, selector = selection_tables(table, result["logits"], result["weights"], opts.p)
    write_table(selector, args.selector)
    write_table(decisions, args.decisions)
    write_table(out, args.output)
    write_json(result["log"], Path(args.selector).with_suffix(".log.json"))
    print(f"seal: kept {out.num_rows} of {table.num_rows} rows after {result['log']['steps']} steps "
          f"({result['log']['seconds']} s)")


if __name__ == "__main__":
    main()
