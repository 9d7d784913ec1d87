"""Training objectives on the one lifecycle: weighted SFT's loss and data checks, DPO through TRL, and recipe keys
that were renamed or belong to another objective."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from workflow_scripts import objectives, train
from workflow_scripts.io import DataError, records_to_table, write_table


def conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def weighted_data(path, weights):
    table = records_to_table([{"id": str(i), "messages": conv(f"add {i} and 1", f"#### {i + 1}")}
                              for i in range(len(weights))])
    write_table(table.append_column("weight", pa.array(weights, pa.float64())), path)
    return path


def test_weighted_answer_loss_is_the_per_example_mean_times_weight():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[objectives.IGNORE, objectives.IGNORE, 3, 4, 5],
                           [objectives.IGNORE, 1, 2, objectives.IGNORE, objectives.IGNORE]])
    per_example = []
    for b in range(2):
        losses = [torch.nn.functional.cross_entropy(logits[b, t - 1], labels[b, t]) for t in range(1, 5)
                  if labels[b, t] != objectives.IGNORE]
        per_example.append(torch.stack(losses).mean())
    weights = torch.tensor([2.0, 0.5])
    got = objectives.weighted_answer_loss(logits, labels, weights)
    assert torch.allclose(got, (per_example[0] * 2.0 + per_example[1] * 0.5) / 2)
    # Weight 0 removes an example; all-ones is the plain per-example mean.
    assert torch.allclose(objectives.weighted_answer_loss(logits, labels, torch.tensor([1.0, 0.0])),
                          per_example[0] / 2)


def test_recipe_problems_name_the_key():
    assert objectives.recipe_problems({"finetune": "lora", "objective": "dpo", "beta": 0.2}) == []
    assert objectives.recipe_problems({"method": "lora"}, "recipes.align") == [
        "recipes.align.method: renamed to 'finetune' (write finetune: lora)"]
    assert objectives.recipe_problems({"beta": 0.1}, "recipes.x") == [
        "recipes.x.beta: only applies to objective dpo (this recipe's is sft)"]
    assert "unknown objective 'ppo'" in objectives.recipe_problems({"objective": "ppo"})[0]
    assert "must be lora or full" in objectives.recipe_problems({"finetune": "qlora"})[0]
    with pytest.raises(train.RecipeError, match="renamed to 'finetune'"):
        train.full_recipe({"method": "full"})
    assert "dpo cannot continue an adapter" in objectives.recipe_problems(
        {"objective": "dpo", "continue_adapter": True})[0]


def test_an_adapter_is_continued_only_when_asked(tiny_model_dir, tmp_path):
    """A new adapter on top of an unmerged one would name only the first adapter's base: generation would silently
    drop the first adapter. That is an error; continue_adapter trains the same adapter further, with its own rank."""
    from safetensors.torch import load_file

    data = str(weighted_data(tmp_path / "d.parquet", [1.0] * 8))
    first = tmp_path / "first"
    recipe = {"epochs": 1, "batch_size": 4, "lr": 1e-2, "max_length": 64, "lora_r": 4, "target_modules": ["q_proj"]}
    train.train(str(tiny_model_dir), [data], str(first), recipe)
    with pytest.raises(ValueError, match="is a LoRA adapter on .*merge: true.*continue_adapter: true"):
        train.train(str(first), [data], str(tmp_path / "stacked"), recipe)
    again = tmp_path / "again"
    train.train(str(first), [data], str(again), {**recipe, "continue_adapter": True, "lora_r": 16, "max_steps": 1})
    config = json.loads((again / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_model_dir)
    log = json.loads((again / "train_log.json").read_text())
    assert log["global_step"] == 1  # max_steps overrides the epoch
    before, after = load_file(first / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="must be a LoRA adapter folder"):
        train.train(str(tiny_model_dir), [data], str(tmp_path / "x"), {**recipe, "continue_adapter": True})


def test_weighted_sft_errors_name_file_row_and_field(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    recipe = train.full_recipe({"objective": "weighted_sft"})
    bad = weighted_data(tmp_path / "bad.parquet", [1.0, -1.0])
    with pytest.raises(DataError, match=r"bad.parquet.*row 1: field 'weight'.*id '1'"):
        objectives.OBJECTIVES["weighted_sft"].examples(tok, [str(bad)], recipe)
    plain = tmp_path / "plain.parquet"
    write_table(records_to_table([{"id": "a", "messages": conv("q", "a")}]), plain)
    with pytest.raises(DataError, match="missing column"):
        objectives.OBJECTIVES["weighted_sft"].examples(tok, [str(plain)], recipe)


def test_weighted_sft_trains_and_zero_weights_leave_the_adapter_untouched(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    recipe = {"objective": "weighted_sft", "epochs": 1, "batch_size": 4, "lr": 1e-2, "max_length": 64}
    out = tmp_path / "zero"
    train.train(str(tiny_model_dir), [str(weighted_data(tmp_path / "z.parquet", [0.0] * 8))], str(out), recipe)
    log = json.loads((out / "train_log.json").read_text())
    assert log["objective"] == "weighted_sft" and log["examples"] == 8
    # LoRA's B matrices start at zero; with every weight 0 the loss has no gradient and they stay zero.
    weights = load_file(out / "adapter_model.safetensors")
    assert all(torch.count_nonzero(w) == 0 for k, w in weights.items() if "lora_B" in k)
    out = tmp_path / "ones"
    train.train(str(tiny_model_dir), [str(weighted_data(tmp_path / "o.parquet", [1.0] * 8))], str(out), recipe)
    weights = load_file(out / "adapter_model.safetensors")
    assert any(torch.count_nonzero(w) > 0 for k, w in weights.items() if "lora_B" in k)


def test_dpo_trains_a_lora_adapter_through_trl(tiny_model_dir, tmp_path):
    pairs = pa.Table.from_pylist([
        {"id": str(i), "prompt": f"how do I do thing {i}?", "chosen": "I cannot help with that.",
         "rejected": f"Sure, step 1 of thing {i}."} for i in range(8)])
    data = tmp_path / "pairs.parquet"
    pq.write_table(pairs, data)
    out = tmp_path / "dpo"
    recipe = {"objective": "dpo", "beta": 0.1, "epochs": 1, "batch_size": 4, "lr": 1e-3, "max_length": 64}
    info = train.train(str(tiny_model_dir), [str(data)], str(out), recipe)
    assert (out / "adapter_config.json").exists()
    log = json.loads((out / "train_log.json").read_text())
    assert log["objective"] == "dpo" and log["examples"] == 8 and info["tokens"] > 0
    assert any("loss" in h for h in log["log_history"])


def test_dpo_pairs_errors_name_the_row(tmp_path):
    data = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "q", "chosen": "x", "rejected": ""}]), data)
    with pytest.raises(DataError, match=r"row 0: field 'rejected'"):
        objectives.read_preferences(str(data))
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "q"}]), data)
    with pytest.raises(DataError, match="missing: chosen, rejected"):
        objectives.read_preferences(str(data))


def test_train_cli_rejects_a_renamed_key_before_loading_anything(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--base", "nowhere", "--data", "nowhere.parquet", "--output", "o",
                    "--recipe", json.dumps({"method": "lora"})])
    assert exc.value.code == 2
    assert "recipe.method: renamed to 'finetune'" in capsys.readouterr().err


def test_answer_only_logits_give_the_full_loss_and_gradients(tiny_model_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           objectives.lora_config(train.full_recipe({})))
    ids = torch.randint(3, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # right padding
    labels = ids.clone()
    labels[0, :7], labels[1, :5], labels[2, :8], labels[2, 9:] = -100, -100, -100, -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    cut = objectives.answer_inputs(model, batch)
    assert cut["logits_to_keep"] == objectives.answer_span(labels) == 12 - 4
    assert cut["labels"].shape == (3, 8) and (cut["labels"] != -100).sum() == (labels != -100).sum()

    def loss_and_grads(inputs, loss_of=lambda out, labels: out.loss, **kwargs):
        model.zero_grad()
        inputs = dict(inputs)
        labels = inputs["labels"]
        out = model(**inputs, **kwargs)
        loss = loss_of(out, labels)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    for kwargs in ({}, {"num_items_in_batch": torch.tensor(11)}):
        full, cut_loss = loss_and_grads(batch, **kwargs), loss_and_grads(cut, **kwargs)
        assert cut_loss[0] == pytest.approx(full[0], rel=1e-5)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(full[1], cut_loss[1], strict=True))
    # weighted_sft's per-example losses read the cut logits the same way.
    weights = torch.tensor([1.0, 0.5, 2.0])

    def weighted(out, labels):
        return objectives.weighted_answer_loss(out.logits, labels, weights)

    plain = {k: v for k, v in batch.items() if k != "labels"}
    full = loss_and_grads({**plain, "labels": labels}, weighted)
    short = loss_and_grads({**{k: v for k, v in cut.items() if k != "labels"}, "labels": cut["labels"]}, weighted)
    assert short[0] == pytest.approx(full[0], rel=1e-5)
    # No answer token in the batch: nothing is cut.
    assert objectives.answer_span(torch.full((2, 5), -100)) == 5
