"""The training lifecycle, written once for every objective (workflow_scripts/objectives.py: sft, weighted_sft,
dpo): LoRA (peft) or full fine-tuning, fixed seeds, precision by hardware, DeepSpeed ZeRO under torchrun, trackers,
and periodic checkpoints so a killed or preempted job resumes where it stopped instead of starting over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from workflow_scripts.hardware import describe as describe_hardware
from workflow_scripts.hardware import resolve_dtype
from workflow_scripts.io import DataError, sha256_file, sha256_text
from workflow_scripts.objectives import OBJECTIVES, recipe_problems

log = logging.getLogger("safeft.train")

DEFAULT_RECIPE = {
    "objective": "sft", "finetune": "lora", "epochs": 1, "lr": 3e-4, "batch_size": 8, "grad_accum": 1,
    "max_length": 512, "warmup_ratio": 0.0, "scheduler": "linear", "weight_decay": 0.0, "lora_r": 16,
    "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear", "merge": False, "deepspeed": None,
    "dtype": "auto", "gradient_checkpointing": False, "checkpoint_steps": 200, "global_batch_size": None,
    "report_to": "none", "max_steps": None, "continue_adapter": False, "optim": "adamw_torch", "warmup_steps": None,
    "prompt_format": "chat",
}


class RecipeError(ValueError):
    """A recipe key that was renamed, belongs to another objective, or has a value no objective takes."""


def full_recipe(recipe: dict | None) -> dict:
    """The recipe with the lifecycle's and its objective's defaults filled in; a wrong key is a RecipeError."""
    recipe = recipe or {}
    problems = recipe_problems(recipe)
    if problems:
        raise RecipeError("; ".join(problems))
    recipe = {**DEFAULT_RECIPE, **recipe}
    return {**OBJECTIVES[recipe["objective"]].defaults, **recipe}


@contextlib.contextmanager
def scoped_environ(values: dict):
    """Set environment variables for the block only."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TrackerError(ValueError):
    """A recipe's report_to that cannot work here (unknown tracker, its package not installed)."""


# Experiment trackers the Trainer can report to: the module that must import, and the extra that installs it.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}


def tracker_list(report_to: str | list[str] | None) -> list[str]:
    """The recipe's `report_to` as the Trainer's list; a tracker whose package is missing is an error that names
    the extra to install."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n and n != "none"]
    for name in names:
        if name not in TRACKERS:
            raise TrackerError(f"recipe report_to: unknown tracker {name!r} (none, {', '.join(TRACKERS)})")
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"recipe report_to: {name} needs the `{extra}` extra: pip install 'safeft[{extra}]'")
    return names


def tracker_environment(trackers: list[str], run_name: str, log_root: str = "logs/tensorboard") -> dict:
    """Where each tracker writes, unless the user's environment already says: TensorBoard event files under
    logs/tensorboard/<run name> (the checkpoint folder is deleted after training), one W&B group per experiment."""
    env = {}
    if "tensorboard" in trackers and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
        env["TENSORBOARD_LOGGING_DIR"] = str(Path(log_root) / run_name)
    if "wandb" in trackers and not os.environ.get("WANDB_RUN_GROUP"):
        env["WANDB_RUN_GROUP"] = run_name.split("/")[0]
    return env


def grad_accum_steps(recipe: dict, world_size: int) -> int:
    """Gradient accumulation that keeps the recipe's global batch whatever number of GPUs the job was given;
    without `global_batch_size` the recipe's own grad_accum is used and the global batch scales with the GPUs."""
    target = recipe.get("global_batch_size")
    if not target:
        return recipe["grad_accum"]
    per_step = recipe["batch_size"] * world_size
    if target % per_step:
        raise ValueError(f"recipe global_batch_size {target} is not a multiple of batch_size {recipe['batch_size']}"
                         f" x {world_size} processes")
    return target // per_step


def template_hash(tokenizer) -> str:
    """sha256 of the chat template: generation must use the one training used."""
    return sha256_text(tokenizer.chat_template or "")


def run_fingerprint(base_model: str, data_paths: list[str], recipe: dict, seed: int) -> str:
    """What a checkpoint was trained on: resuming is only right when all of it is unchanged."""
    return sha256_text(json.dumps({"base": str(base_model), "data": [sha256_file(p) for p in data_paths],
                                   "recipe": recipe, "seed": seed}, sort_keys=True, default=str))


def last_checkpoint(checkpoint_dir: Path, fingerprint: str) -> str | None:
    """The newest complete checkpoint of this very run, or None. A checkpoint of another run is not resumed.

    The Trainer writes trainer_state.json last, so a checkpoint without a readable one was cut off mid-save
    (SIGKILL) and is skipped in favour of the one before it.
    """
    stamp = checkpoint_dir / "fingerprint.txt"
    if not checkpoint_dir.is_dir() or not stamp.exists() or stamp.read_text() != fingerprint:
        return None
    found = sorted((p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in found:
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return str(ckpt)
    return None


class StopOnSignal:
    """SIGTERM (scancel, preemption) -> save a checkpoint at the end of the current step and stop."""

    def __init__(self):
        from transformers import TrainerCallback

        self.received = False
        outer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if outer.received:
                    control.should_save = True
                    control.should_training_stop = True
                return control

        self.callback = Callback()
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True


def load_model(path: str, recipe: dict, dtype):
    """The model to train. With `continue_adapter`, the base folder must be a peft adapter: its base model is
    loaded with the adapter on top, trainable, and no new adapter is added (ForgetFilter's rounds continue the
    previous round's adapter, as the reference does); rank and targets are then the adapter's own."""
    from transformers import AutoModelForCausalLM

    from workflow_scripts.llm import resolve_model

    base, adapter = resolve_model(path)
    if not recipe["continue_adapter"]:
        if adapter is not None:
            # A new adapter saved over it would name only the adapter's base: generation would drop this one.
            raise ValueError(f"the base model {path} is a LoRA adapter on {base}: train its recipe with merge: true,"
                             " or continue it with continue_adapter: true")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if adapter is None or recipe["finetune"] != "lora":
        raise ValueError(f"continue_adapter: {path} must be a LoRA adapter folder and the recipe finetune: lora")
    from peft import PeftModel

    log.info("continuing the adapter %s on %s", adapter, base)
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter,
                                     is_trainable=True)


def train(base_model: str, data_paths: list[str], out_dir: str, recipe: dict, seed: int = 0,
          threads: int | None = None, checkpoint_dir: str | None = None, run_name: str | None = None) -> dict:
    """Fine-tune `base_model` on the concatenated tables with the recipe's objective; write the adapter (or
    merged/full weights) to out_dir.

    Checkpoints go to `checkpoint_dir` (default: out_dir + ".checkpoints") every `checkpoint_steps` optimiser
    steps and are resumed from when the same run is started again; the weights are assembled in
    out_dir + ".partial" and renamed to out_dir only when complete. Under torchrun every rank calls this.
    """
    import torch
    from transformers import AutoTokenizer, set_seed

    recipe = full_recipe(recipe)
    objective = OBJECTIVES[recipe["objective"]]
    trackers = tracker_list(recipe["report_to"])
    run_name = run_name or Path(out_dir).name
    main_rank = int(os.environ.get("RANK", "0")) == 0
    out = Path(out_dir)
    staging = Path(f"{out_dir}.partial")
    checkpoints = Path(checkpoint_dir or f"{out_dir}.checkpoints")
    if threads:
        torch.set_num_threads(threads)
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Bad data fails here, before a model is loaded.
    examples = objective.examples(tokenizer, data_paths, recipe)
    log.info("objective %s: %d examples from %s", recipe["objective"], len(examples), data_paths)

    precision = resolve_dtype(recipe["dtype"])
    if precision["warning"] and main_rank:
        log.warning("%s", precision["warning"])
    log.info("precision %s (requested %s; %s native bfloat16: %s)", precision["dtype"], precision["requested"],
             precision["device"], precision["native_bf16"])
    # The resolved precision is part of the run: a checkpoint trained in bf16 is not resumed in float32.
    fingerprint = run_fingerprint(base_model, data_paths, {**recipe, "dtype": precision["dtype"]}, seed)
    resume = last_checkpoint(checkpoints, fingerprint)
    if main_rank:
        shutil.rmtree(staging, ignore_errors=True)
        if resume is None:
            # Checkpoints of an older run (other data, recipe or seed) must not leak into this one.
            shutil.rmtree(checkpoints, ignore_errors=True)
            checkpoints.mkdir(parents=True)
            (checkpoints / "fingerprint.txt").write_text(fingerprint)
    log.info("resuming from %s", resume) if resume else log.info("starting from step 0")

    model = load_model(base_model, recipe, getattr(torch, precision["dtype"]))
    args = objective.arguments(
        recipe,
        output_dir=str(checkpoints), num_train_epochs=recipe["epochs"],
        max_steps=recipe["max_steps"] or -1,
        learning_rate=recipe["lr"], per_device_train_batch_size=recipe["batch_size"],
        gradient_accumulation_steps=grad_accum_steps(recipe, int(os.environ.get("WORLD_SIZE", "1"))),
        # transformers reads a warmup_steps below 1 as a share of the steps: warmup_ratio, unless steps are given.
        warmup_steps=recipe["warmup_steps"] if recipe["warmup_steps"] is not None else recipe["warmup_ratio"],
        optim=recipe["optim"],
        lr_scheduler_type=recipe["scheduler"], weight_decay=recipe["weight_decay"],
        logging_steps=max(1, len(examples) // (recipe["batch_size"] * recipe["grad_accum"] * 10)),
        # Optimiser state is kept with the weights so a resumed run continues the same trajectory.
        save_strategy="steps" if recipe["checkpoint_steps"] else "no",
        save_steps=recipe["checkpoint_steps"] or 500, save_total_limit=1,
        report_to=trackers, run_name=run_name, seed=seed, data_seed=seed,
        # One loss line per logging step reads better in a job log than a progress bar.
        disable_tqdm=True,
        bf16=precision["dtype"] == "bfloat16", fp16=precision["dtype"] == "float16",
        deepspeed=recipe["deepspeed"],
        gradient_checkpointing=recipe["gradient_checkpointing"],
        # Batches of similar length waste less compute on padding.
        train_sampling_strategy="group_by_length", use_cpu=not torch.cuda.is_available(),
    )
    stop = StopOnSignal()
    # The trackers' callbacks read where to write from the environment when the Trainer creates them.
    with scoped_environ(tracker_environment(trackers, run_name)):
        trainer = objective.trainer(model, tokenizer, examples, recipe, args, [stop.callback])
    if recipe["finetune"] == "lora":
        trainer.model.print_trainable_parameters()
    n_tokens = objective.tokens(trainer)
    log.info("%d tokens per epoch", n_tokens)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - start
    if stop.received:
        log.info("stopped by SIGTERM at step %d; checkpoint saved in %s", trainer.state.global_step, checkpoints)
        raise SystemExit(143)

    # Every rank takes part: ZeRO-3 gathers the partitioned weights; only the main process writes.
    if recipe["finetune"] == "lora" and recipe["merge"]:
        if trainer.is_world_process_zero():
            trainer.model.merge_and_unload().save_pretrained(staging, safe_serialization=True)
    else:
        trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return {}
    tokenizer.save_pretrained(staging)
    info = {
        "base_model": str(base_model), "data": [str(p) for p in data_paths], "recipe": recipe,
        "objective": recipe["objective"],
        "seed": seed, "examples": len(examples), "tokens": n_tokens, "train_seconds": round(seconds, 1),
        "tokens_per_second": round(n_tokens * (trainer.state.epoch or recipe["epochs"]) / seconds, 1)
        if not resume else None,
        "resumed_from": Path(resume).name if resume else None, "global_step": trainer.state.global_step,
        "world_size": trainer.args.world_size, "precision": precision, "hardware": describe_hardware(),
        "train_loss": result.training_loss, "chat_template_sha256": template_hash(tokenizer),
        "log_history": trainer.state.log_history,
    }
    (staging / "train_log.json").write_text(json.dumps(info, indent=2, default=str))
    (staging / "training_args.bin").unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return info


def launch_command(argv: list[str], recipe: dict, n_gpus: int, module: str = "workflow_scripts.train"
                   ) -> list[str] | None:
    """The torchrun command that re-runs this CLI with one process per GPU, or None to train in this process.

    The GPU count is what the job was given (SLURM's gres sets the visible devices), not a config value, so one
    rule runs unchanged on a laptop and on a 4-GPU node. DeepSpeed needs the distributed environment that torchrun
    sets up even for a single process.
    """
    if os.environ.get("RANK") is not None or (n_gpus <= 1 and not recipe.get("deepspeed")):
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(max(n_gpus, 1)),
            "-m", module, *argv]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True, help="HF model folder")
    ap.add_argument("--data", required=True, nargs="+", help="canonical Parquet training tables")
    ap.add_argument("--output", required=True)
    ap.add_argument("--recipe", default="{}", help="JSON object overriding the default recipe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--checkpoint_dir", default=None, help="default: OUTPUT.checkpoints")
    ap.add_argument("--run_name", default=None, help="tracker run name (rules: experiment/seed/rule)")
    args = ap.parse_args(argv)
    recipe = json.loads(args.recipe)
    problems = recipe_problems(recipe)
    if problems:  # before torchrun starts one process per GPU to say the same
        print("error: " + "; ".join(problems), file=sys.stderr)
        raise SystemExit(2)
    import torch

    command = launch_command(sys.argv[1:] if argv is None else argv, recipe, torch.cuda.device_count())
    if command:
        print("launching:", " ".join(command), flush=True)
        os.execv(command[0], command)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        info = train(args.base, args.data, args.output, recipe, args.seed, args.threads,
                     args.checkpoint_dir, args.run_name)
    except (DataError, TrackerError, RecipeError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if not info:  # not the main process of a multi-GPU job
        return
    print(f"done: {info['examples']} examples, loss {info['train_loss']:.4f}, {info['train_seconds']} s, "
          f"{info['tokens_per_second']} tokens/s")


if __name__ == "__main__":
    main()
