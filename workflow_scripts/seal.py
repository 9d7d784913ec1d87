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
import shutil
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
    # A DeepSpeed config (e.g. deepspeed/zero3.json): the selector's model runs under DeepSpeed, one process per GPU
    # the job has (torchrun), each batch split across them; `gpus` is what the job asks for on a cluster.
    deepspeed: str | None = None
    gpus: int | None = None

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


def bilevel_step(model, z, model_opt, selector_opt, safe_batch, ft_batch, ft_rows, lam: float, activation: str,
                 engine=None, world: int = 1, sizes: tuple[float, float] | None = None):
    """One step of both levels, from one forward pass per batch. Returns (model loss, safe loss, mean ft loss).

    Under DeepSpeed, `engine` takes the model's step (and averages its gradients over the `world` processes, each
    with its share of the batch); the selector's gradient is averaged the same way, so every process keeps the
    same logits. `sizes` (safe, fine-tuning) divide each process's loss sums instead of its row counts, so that
    the average over processes is the whole batch's mean even when the shares differ in size."""
    import torch

    l_safe_rows = example_losses(engine or model, safe_batch)
    l_ft = example_losses(engine or model, ft_batch)
    safe_size, ft_size = sizes or (len(l_safe_rows), len(l_ft))
    l_safe = l_safe_rows.sum() / safe_size
    rows = torch.as_tensor(ft_rows, device=z.device)
    w = weights(z, activation)[rows]
    loss = lam * l_safe + (1 - lam) * (w.detach() * l_ft).sum() / ft_size
    if engine is None:
        model_opt.zero_grad()
        loss.backward()
        model_opt.step()
    else:
        engine.backward(loss)
        engine.step()
    # The selector's loss reuses the fine-tuning losses, detached: no second forward pass.
    selector_loss = (weights(z, activation)[rows] * l_ft.detach()).sum() / ft_size
    selector_opt.zero_grad()
    selector_loss.backward()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(z.grad)
        z.grad /= world
    selector_opt.step()
    return float(loss.detach()), float(l_safe.detach()), float(l_ft.detach().mean())


def shard(rows: list[int], rank: int, world: int) -> list[int]:
    """This process's share of a batch (every world-th row); a batch smaller than the world is used whole."""
    return rows[rank::world] if len(rows) >= world else rows


def share_size(rows: list[int], world: int) -> float:
    """What a process divides its loss sum by: len / world for a split batch (the processes' average is then the
    batch mean however unevenly it split), the whole length for one that every process holds whole."""
    return len(rows) / world if len(rows) >= world else len(rows)


def deepspeed_config(path: str, micro_batch: int, world: int, dtype: str) -> dict:
    """The DeepSpeed config file with its "auto" values filled as the Trainer would: one micro-batch per process
    and step, no gradient clipping (the reference clips none), the precision the hardware probe chose."""
    config = json.loads(Path(path).read_text())
    for key, value in {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                       "train_batch_size": micro_batch * world, "gradient_clipping": 0.0}.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for name in ("bf16", "fp16"):
        if config.get(name, {}).get("enabled") == "auto":
            config[name]["enabled"] = dtype == {"bf16": "bfloat16", "fp16": "float16"}[name]
    return config


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
    resumes from the checkpoint: LoRA weights, both Adam states, the logits and the position in the epoch.
    With `deepspeed` (under torchrun) every process returns the same result; the caller writes it from rank 0."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workflow_scripts.hardware import resolve_dtype
    from workflow_scripts.objectives import encode_table

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(opts.seed)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ft = encode_table(tokenizer, ft_table, opts.max_length, paths[0])
    safe = encode_table(tokenizer, safe_table, opts.max_length, paths[1])
    precision = resolve_dtype(opts.dtype)
    if precision["warning"]:
        log.warning("%s", precision["warning"])
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    else:
        device = "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, precision["dtype"])).to(device)
    model = get_peft_model(model, LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=0.0,
                                             target_modules=list(opts.target_modules), task_type="CAUSAL_LM"))
    model.train()
    z = initial_logits(len(ft), opts.activation).to(device).requires_grad_()
    model_opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=opts.lr, betas=(0.9, 0.95))
    selector_opt = torch.optim.Adam([z], lr=opts.selector_lr, betas=(0.9, 0.95), weight_decay=0.0)
    engine = None
    if opts.deepspeed:
        import deepspeed

        deepspeed.init_distributed()
        # DeepSpeed wraps the model and our Adam (ZeRO partitions its state); the selector stays a plain replica.
        micro = -(-opts.batch_size // world)
        engine, model_opt, _, _ = deepspeed.initialize(
            model=model, optimizer=model_opt,
            config=deepspeed_config(opts.deepspeed, micro, world, precision["dtype"]))

    ft_ids, safe_ids = ft_table.column("id").to_pylist(), safe_table.column("id").to_pylist()
    fingerprint = run_fingerprint(opts, base, ft_ids, safe_ids, precision["dtype"])
    if opts.deepspeed:  # partitions depend on the world size, and the config's contents matter, not its name
        fingerprint += f":world{world}:" + hashlib.sha256(Path(opts.deepspeed).read_bytes()).hexdigest()
    ckpt = Path(checkpoint) / "selector_state.pt" if checkpoint else None
    epoch, position, step, history = 0, 0, 0, []
    if ckpt and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["fingerprint"] == fingerprint:
            if engine is None:
                set_peft_model_state_dict(model, state["adapter"])
                model_opt.load_state_dict(state["model_opt"])
            else:  # the model and its optimizer state from DeepSpeed's own (partitioned) checkpoint of that step
                loaded, _ = engine.load_checkpoint(str(ckpt.parent), tag=state["deepspeed_tag"],
                                                   load_module_strict=False)
                if loaded is None:
                    raise RuntimeError(f"{ckpt.parent}: DeepSpeed checkpoint {state['deepspeed_tag']} named by "
                                       f"{ckpt.name} could not be loaded")
            selector_opt.load_state_dict(state["selector_opt"])
            with torch.no_grad():
                z.copy_(state["z"])
            epoch, position, step, history = state["epoch"], state["position"], state["step"], state["history"]
            log.info("resuming the selector at epoch %d, batch %d (step %d)", epoch, position, step)
        else:
            log.info("checkpoint %s belongs to another run: starting afresh", ckpt)

    def checkpoint_now():
        if not ckpt:
            return
        state = {"fingerprint": fingerprint, "selector_opt": selector_opt.state_dict(), "z": z.detach().cpu(),
                 "epoch": epoch, "position": position, "step": step, "history": history}
        if engine is None:
            state.update(adapter=get_peft_model_state_dict(model), model_opt=model_opt.state_dict())
        else:
            # Every process writes its partition under a tag of this step; the state that names the tag is
            # written after it, so a kill in between resumes from the previous, complete pair.
            state["deepspeed_tag"] = f"step{step}"
            # The frozen base stays out: only the adapter and its optimizer state (GBs less for an 8B model).
            engine.save_checkpoint(str(ckpt.parent), tag=state["deepspeed_tag"], exclude_frozen_parameters=True)
        if rank == 0:
            save_state(ckpt, state)
            if engine is not None:  # the tags before this one are no longer named by any state
                for old in ckpt.parent.glob("step*"):
                    if old.is_dir() and old.name != state["deepspeed_tag"]:
                        shutil.rmtree(old, ignore_errors=True)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # no process leaves (or reads the state) before rank 0 has written it

    stop = {"signal": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    start = time.time()
    try:
        while epoch < opts.epochs:
            lam = lam_at(epoch, opts.lam, opts.lam_decay)
            plan = batches(epoch_orders(len(safe), len(ft), opts.seed, epoch), opts.batch_size)
            while position < len(plan):
                full_safe, full_ft = plan[position]
                safe_rows, ft_rows = shard(full_safe, rank, world), shard(full_ft, rank, world)
                loss, l_safe, l_ft = bilevel_step(
                    model, z, model_opt, selector_opt, collate([safe[i] for i in safe_rows], tokenizer.pad_token_id,
                                                               device),
                    collate([ft[i] for i in ft_rows], tokenizer.pad_token_id, device), ft_rows, lam, opts.activation,
                    engine, world, (share_size(full_safe, world), share_size(full_ft, world)))
                position += 1
                step += 1
                history.append({"step": step, "epoch": epoch, "lam": lam, "loss": loss, "safe_loss": l_safe,
                                "ft_loss": l_ft})
                log.info("epoch %d step %d: loss %.4f (safe %.4f, fine-tuning %.4f), lam %.2f", epoch, step, loss,
                         l_safe, l_ft, lam)
                if stopping(stop["signal"] or step == stop_after, world, z.device):
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
                    "world_size": world, "deepspeed": opts.deepspeed, "history": history}}


def stopping(local: bool, world: int, device="cpu") -> bool:
    """Whether to stop at this step: any process that got SIGTERM stops them all at the same step."""
    if world == 1:
        return local
    import torch
    import torch.distributed as dist

    flag = torch.tensor([float(local)], device=device)  # on the GPU: NCCL reduces only CUDA tensors
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


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
    import torch

    from workflow_scripts.train import launch_command

    # Only a DeepSpeed selector splits its batches across processes; without it, one process on one device.
    command = launch_command(sys.argv[1:] if argv is None else argv, {"deepspeed": opts.deepspeed},
                             torch.cuda.device_count() if opts.deepspeed else 1, module="workflow_scripts.seal")
    if command:
        print("launching:", " ".join(command), flush=True)
        os.execv(command[0], command)
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
    if int(os.environ.get("RANK", "0")) != 0:  # the other processes of a DeepSpeed run hold the same result
        return
    out, decisions, selector = selection_tables(table, result["logits"], result["weights"], opts.p)
    write_table(selector, args.selector)
    write_table(decisions, args.decisions)
    write_table(out, args.output)
    write_json(result["log"], Path(args.selector).with_suffix(".log.json"))
    print(f"seal: kept {out.num_rows} of {table.num_rows} rows after {result['log']['steps']} steps "
          f"({result['log']['seconds']} s)")


if __name__ == "__main__":
    main()
