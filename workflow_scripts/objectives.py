"""Training objectives that plug into the one training lifecycle in train.py: each turns the model, tokenizer,
training tables, recipe and training arguments into a Trainer that the lifecycle runs, resumes and saves.
"""

from __future__ import annotations

import functools
import inspect
import math

import pyarrow as pa
import pyarrow.parquet as pq

from workflow_scripts.io import DataError, read_table

IGNORE = -100
FINETUNE = ("lora", "full")
# chat: conversations through the tokenizer's chat template; text: one user turn as raw text and the answer right
# after it (a base model's completion, e.g. ReverseGen's proposer), with the tokenizer's BOS and an EOS at the end.
PROMPT_FORMATS = ("chat", "text")
# Recipe keys renamed since: the old name is an error that says what to write instead.
RENAMED = {"method": "finetune"}


def recipe_problems(recipe: dict, where: str = "recipe") -> list[str]:
    """What is wrong with a recipe's keys, one line each starting with `where` (e.g. `recipes.align`)."""
    problems = [f"{where}.{old}: renamed to {new!r} (write {new}: {recipe[old]})"
                for old, new in RENAMED.items() if old in recipe]
    if recipe.get("finetune", "lora") not in FINETUNE:
        problems.append(f"{where}.finetune: must be lora or full, not {recipe['finetune']!r}")
    objective = recipe.get("objective", "sft")
    if recipe.get("prompt_format", "chat") not in PROMPT_FORMATS:
        problems.append(f"{where}.prompt_format: must be chat or text, not {recipe['prompt_format']!r}")
    if objective not in OBJECTIVES:
        problems.append(f"{where}.objective: unknown objective {objective!r} ({', '.join(OBJECTIVES)})")
    if recipe.get("continue_adapter") and objective == "dpo":
        # TRL would score the reference with the adapter switched off: the adapter's base, not the model continued.
        problems.append(f"{where}.continue_adapter: dpo cannot continue an adapter; merge the previous one instead")
    for name, obj in OBJECTIVES.items():
        for key in obj.defaults:
            if key in recipe and name != objective:
                problems.append(f"{where}.{key}: only applies to objective {name} (this recipe's is {objective})")
    return problems


def new_adapter(recipe: dict) -> bool:
    """A LoRA recipe adds an adapter, unless it continues the base folder's own (train.load_model)."""
    return recipe["finetune"] == "lora" and not recipe.get("continue_adapter")


def lora_config(recipe: dict):
    from peft import LoraConfig

    return LoraConfig(r=recipe["lora_r"], lora_alpha=recipe["lora_alpha"], lora_dropout=recipe["lora_dropout"],
                      target_modules=recipe["target_modules"], task_type="CAUSAL_LM")


def encode_example(tokenizer, messages: list[dict], max_length: int) -> dict:
    """Token ids of the whole conversation with labels only on the final assistant turn.

    The prompt is rendered with add_generation_prompt=True, exactly as generation will see it; the full
    conversation must extend it token for token, or the template cannot be used for masked SFT.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant turn to train on")
    prompt_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("chat template renders the prompt differently with and without the answer")
    # The template already writes any BOS/special tokens itself.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        # Tokenisation across the boundary merged tokens: fall back to concatenating the two pieces.
        answer_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        full_ids = prompt_ids + answer_ids
    labels = [IGNORE] * len(prompt_ids) + full_ids[len(prompt_ids):]
    full_ids, labels = full_ids[:max_length], labels[:max_length]
    return {"input_ids": full_ids, "attention_mask": [1] * len(full_ids), "labels": labels}


def text_parts(messages: list[dict]) -> tuple[str, str]:
    """(prompt, answer) of a prompt_format text example: one user turn, then the assistant turn."""
    if [m["role"] for m in messages] != ["user", "assistant"]:
        raise ValueError("prompt_format text takes one user turn (the raw prompt) and the assistant turn")
    return messages[0]["content"], messages[1]["content"]


def encode_text_example(tokenizer, messages: list[dict], max_length: int) -> dict:
    """Token ids of a raw-text prompt (with the tokenizer's own special tokens, e.g. BOS) and its answer followed
    by EOS, with labels only on the answer: a base model learns to complete the prompt and stop."""
    prompt, answer = text_parts(messages)
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_table(tokenizer, table: pa.Table, max_length: int, path: str = "<table>",
                 prompt_format: str = "chat") -> list[dict]:
    encode = encode_text_example if prompt_format == "text" else encode_example
    out = []
    for row, messages in enumerate(table.column("messages").to_pylist()):
        try:
            ex = encode(tokenizer, messages, max_length)
        except ValueError as err:
            raise DataError(path, row, "messages", str(err)) from err
        if all(label == IGNORE for label in ex["labels"]):
            raise DataError(path, row, "messages", f"no answer tokens left within max_length={max_length}")
        out.append(ex)
    return out


class SFT:
    """Cross-entropy on the final assistant turn of each `messages` conversation, averaged over the batch's answer
    tokens (the Trainer's own loss)."""

    defaults: dict = {}  # recipe keys that only this objective reads, with their defaults

    def examples(self, tokenizer, paths: list[str], recipe: dict) -> list[dict]:
        """The training examples of all tables, checked before any model is loaded; errors name file and row."""
        out = []
        for path in paths:
            out += encode_table(tokenizer, read_table(path), recipe["max_length"], path, recipe["prompt_format"])
        return out

    def arguments(self, recipe: dict, **kwargs):
        from transformers import TrainingArguments

        return TrainingArguments(**kwargs)

    def trainer_class(self):
        return answer_logits_trainer_class()

    def trainer(self, model, tokenizer, examples: list[dict], recipe: dict, args, callbacks: list):
        from transformers import DataCollatorForSeq2Seq

        if new_adapter(recipe):
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(recipe))
        # The collator pads input_ids and labels and carries any other feature (weighted_sft's `weight`) through.
        return self.trainer_class()(
            model=model, args=args, train_dataset=examples, callbacks=callbacks,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE))

    def tokens(self, trainer) -> int:
        return sum(len(e["input_ids"]) for e in trainer.train_dataset)


def answer_span(labels) -> int:
    """How many final positions of a batch predict every answer token: from the one before the first answer token
    of any row to the end."""
    labelled = (labels != IGNORE).any(0).nonzero()
    return labels.shape[1] - max(int(labelled[0]) - 1, 0) if len(labelled) else labels.shape[1]


@functools.cache
def _forward_keeps_logits(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def keeps_logits(model) -> bool:
    """Whether the (possibly PEFT- or DeepSpeed-wrapped) causal LM's forward takes `logits_to_keep`; asked every
    training step, so the signature is read once per model class."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_keeps_logits(type(base))


def answer_inputs(model, inputs: dict) -> dict:
    """The batch with logits kept only from the position before the first answer token on, and the labels cut to
    match (position t's logits score label t + 1). The vocabulary projection of the prompt positions, whose
    predictions the loss masks anyway, was a quarter of a LoRA step of the demo model (49k-token vocabulary) on
    a CPU."""
    if "labels" not in inputs or not keeps_logits(model):
        return inputs
    keep = answer_span(inputs["labels"])
    return {**inputs, "labels": inputs["labels"][:, -keep:], "logits_to_keep": keep}


def answer_logits_trainer_class():
    """The Trainer of sft: the model's own loss, on logits computed only where they predict answer tokens."""
    from transformers import Trainer

    class AnswerLogitsTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = answer_inputs(self.accelerator.unwrap_model(model), inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return AnswerLogitsTrainer


def answer_losses(logits, labels):
    """Each example's cross-entropy summed over its answer tokens / their count (prompt and padding masked)."""
    import torch.nn.functional as F

    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t + 1
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    answer = labels != IGNORE
    return (token_loss * answer).sum(1) / answer.sum(1).clamp(min=1)


def weighted_answer_loss(logits, labels, weights):
    """answer_losses times each example's weight, averaged over the batch: a weight of 0 removes an example, and
    with all weights 1 this is the per-example mean loss."""
    per_example = answer_losses(logits, labels)
    return (per_example * weights.to(per_example.dtype)).mean()


def weighted_trainer_class():
    """The Trainer subclass of weighted_sft (a function so that importing this module does not import torch)."""
    from transformers import Trainer

    class WeightedLossTrainer(Trainer):
        # A per-batch mean: the Trainer divides it by the gradient accumulation steps.
        loss_is_scaled_for_ga = False

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            # The Trainer drops every feature the model's forward does not take; the weights must reach the loss.
            if "weight" not in self._signature_columns:
                self._signature_columns.append("weight")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = answer_inputs(self.accelerator.unwrap_model(model), dict(inputs))
            weights, labels = inputs.pop("weight"), inputs.pop("labels")
            outputs = model(**inputs)
            loss = weighted_answer_loss(outputs.logits, labels, weights)
            return (loss, outputs) if return_outputs else loss

    return WeightedLossTrainer


class WeightedSFT(SFT):
    """SFT whose loss weighs each example by a number from the table's `weight_column` (default `weight`): each
    example's mean answer-token cross-entropy times its weight, averaged over the batch."""

    defaults = {"weight_column": "weight"}

    def examples(self, tokenizer, paths: list[str], recipe: dict) -> list[dict]:
        column = recipe["weight_column"]
        out = []
        for path in paths:
            table = read_table(path)
            if column not in table.column_names:
                raise DataError(path, None, column, f"missing column: objective weighted_sft reads each example's "
                                                    f"weight from it (recipe weight_column: {column})")
            examples = encode_table(tokenizer, table, recipe["max_length"], path, recipe["prompt_format"])
            ids = table.column("id").to_pylist()
            for row, (ex, weight) in enumerate(zip(examples, table.column(column).to_pylist(), strict=True)):
                if not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
                    raise DataError(path, row, column, f"id {ids[row]!r}: weight {weight!r} must be a finite "
                                                       f"number >= 0")
                out.append({**ex, "weight": float(weight)})
        return out

    def trainer_class(self):
        return weighted_trainer_class()


def as_messages(value, role: str) -> list[dict]:
    """A string as one message of `role`; a list of messages as it is."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def read_preferences(path: str) -> list[dict]:
    """Preference pairs in chat form: `id`; `prompt` (a messages list, or a string: one user turn), or else
    `messages` (the conversation before the answer, as eval prompts store it); `chosen` and `rejected` (a string:
    one assistant turn, or a list of assistant messages)."""
    table = pq.read_table(path)
    prompt_column = "prompt" if "prompt" in table.column_names or "messages" not in table.column_names else "messages"
    missing = [c for c in ("id", prompt_column, "chosen", "rejected") if c not in table.column_names]
    if missing:
        raise DataError(path, None, None, f"objective dpo needs columns id, prompt (or messages), chosen and "
                                          f"rejected; missing: {', '.join(missing)}")
    out = []
    for row, rec in enumerate(table.select(["id", prompt_column, "chosen", "rejected"]).to_pylist()):
        pair = {"id": rec["id"], "prompt": as_messages(rec[prompt_column], "user"),
                **{column: as_messages(rec[column], "assistant") for column in ("chosen", "rejected")}}
        if not pair["prompt"] or pair["prompt"][-1]["role"] == "assistant":
            raise DataError(path, row, prompt_column, f"id {rec['id']!r}: the prompt must end with a user turn "
                                                      f"(the answers belong in chosen and rejected)")
        for column in ("chosen", "rejected"):
            if not pair[column] or any(m["role"] != "assistant" or not m["content"] for m in pair[column]):
                raise DataError(path, row, column, f"id {rec['id']!r}: must be a non-empty answer (a string, or "
                                                   f"assistant messages)")
        out.append(pair)
    return out


def as_text(pair: dict) -> dict:
    """A chat-form pair as prompt_format text strings: the one user turn, and each single assistant answer."""
    if len(pair["prompt"]) != 1 or any(len(pair[c]) != 1 for c in ("chosen", "rejected")):
        raise ValueError("prompt_format text takes one user turn and one answer each for chosen and rejected")
    return {"prompt": pair["prompt"][0]["content"], "chosen": pair["chosen"][0]["content"],
            "rejected": pair["rejected"][0]["content"]}


def dpo_trainer_class():
    from trl import DPOTrainer

    class OfflineDPOTrainer(DPOTrainer):
        def _send_telemetry(self):
            pass  # a training job sends nothing to the Hub: models and data are never fetched implicitly either

    return OfflineDPOTrainer


class DPO:
    """Direct preference optimisation (TRL's DPOTrainer) on (prompt, chosen, rejected) pairs: `beta` scales the
    deviation penalty from the reference model (the base itself; with LoRA, the base with the adapter disabled),
    `loss_type` picks TRL's loss (sigmoid: the DPO paper's)."""

    defaults = {"beta": 0.1, "loss_type": "sigmoid"}

    def examples(self, tokenizer, paths: list[str], recipe: dict) -> list[dict]:
        out = []
        for path in paths:
            pairs = read_preferences(path)
            for row, pair in enumerate(pairs):
                if recipe["prompt_format"] == "text":
                    # Plain strings: TRL then tokenises them as they are and ends each answer with EOS.
                    try:
                        pair.update(as_text(pair))
                    except ValueError as err:
                        raise DataError(path, row, "prompt", f"id {pair['id']!r}: {err}") from err
                    prompt, special = pair["prompt"], True
                else:
                    prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True,
                                                           tokenize=False)
                    special = False
                # TRL drops such pairs silently; here the row is named instead.
                if len(tokenizer(prompt, add_special_tokens=special)["input_ids"]) >= recipe["max_length"]:
                    raise DataError(path, row, "prompt", f"id {pair['id']!r}: no answer tokens left within "
                                                         f"max_length={recipe['max_length']}")
            out += pairs
        return out

    def arguments(self, recipe: dict, **kwargs):
        from trl import DPOConfig

        # Tokenised pairs have no input_ids column for the length-grouping sampler to measure.
        kwargs["train_sampling_strategy"] = "random"
        return DPOConfig(**kwargs, beta=recipe["beta"], loss_type=[recipe["loss_type"]],
                         max_length=recipe["max_length"])

    def trainer(self, model, tokenizer, examples: list[dict], recipe: dict, args, callbacks: list):
        from datasets import Dataset

        trainer = dpo_trainer_class()(
            model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
            callbacks=callbacks, peft_config=lora_config(recipe) if recipe["finetune"] == "lora" else None)
        if len(trainer.train_dataset) != len(examples):
            raise ValueError(f"dpo: {len(examples) - len(trainer.train_dataset)} pairs were dropped in tokenisation")
        return trainer

    def tokens(self, trainer) -> int:
        data = trainer.train_dataset
        return sum(2 * len(p) + len(c) + len(r)
                   for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True))


OBJECTIVES = {"sft": SFT(), "weighted_sft": WeightedSFT(), "dpo": DPO()}
