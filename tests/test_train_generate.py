import json
import os

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from workflow_scripts import generate, llm, objectives, train
from workflow_scripts.io import DataError, records_to_table, write_table


def conv(q, a=None):
    m = [{"role": "user", "content": q}]
    return m + ([{"role": "assistant", "content": a}] if a is not None else [])


def test_labels_cover_only_the_final_answer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "be brief"}] + conv("what is 2+2?", "4 #### 4")
    ex = objectives.encode_example(tok, messages, max_length=512)
    answer = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != objectives.IGNORE]
    text = tok.decode(answer)
    assert text.startswith("4 #### 4") and "<|im_end|>" in text
    assert "what is" not in text
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    assert ex["labels"].count(objectives.IGNORE) == len(tok(prompt, add_special_tokens=False)["input_ids"])


def test_encode_table_errors_name_the_row(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    table = records_to_table([{"id": "a", "messages": conv("q", "a")}, {"id": "b", "messages": conv("q")}])
    with pytest.raises(DataError, match=r"row 1: field 'messages'"):
        objectives.encode_table(tok, table, 64, "x.parquet")


def test_lora_training_writes_adapter_and_log(tiny_model_dir, tmp_path):
    data = tmp_path / "train.parquet"
    write_table(records_to_table([{"id": str(i), "messages": conv(f"add {i} and 1", f"#### {i + 1}")}
                                  for i in range(16)]), data)
    out = tmp_path / "model"
    info = train.train(str(tiny_model_dir), [str(data)], str(out), {"epochs": 1, "batch_size": 4, "lr": 1e-3})
    assert (out / "adapter_config.json").exists() and (out / "train_log.json").exists()
    log = json.loads((out / "train_log.json").read_text())
    assert log["examples"] == 16 and log["chat_template_sha256"] == info["chat_template_sha256"]
    assert any("loss" in h for h in log["log_history"])
    assert not (out / "trainer").exists()
    # dtype auto resolved by the machine's capability, recorded with the machine
    assert log["precision"]["requested"] == "auto" and log["precision"]["dtype"] in ("float32", "bfloat16")
    assert log["hardware"]["cpu"]


def test_report_to_tensorboard_writes_event_files_under_the_run_name(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    data = tmp_path / "train.parquet"
    write_table(records_to_table([{"id": str(i), "messages": conv(f"q{i}", f"a{i}")} for i in range(8)]), data)
    train.train(str(tiny_model_dir), [str(data)], str(tmp_path / "m"),
                {"epochs": 1, "batch_size": 4, "report_to": "tensorboard"}, run_name="exp/seed0/train")
    events = list((tmp_path / "logs/tensorboard/exp/seed0/train").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # set for the Trainer only


def test_report_to_errors_name_the_extra(monkeypatch):
    import importlib.util

    for var in ("TENSORBOARD_LOGGING_DIR", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(var, raising=False)
    assert train.tracker_list("none") == [] and train.tracker_list(None) == []
    with pytest.raises(train.TrackerError, match="unknown tracker 'neptune'"):
        train.tracker_list("neptune")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(train.TrackerError, match=r"pip install 'safeft\[wandb\]'"):
        train.tracker_list(["wandb"])
    env = train.tracker_environment(["tensorboard", "wandb"], "demo_x/seed1/train")
    assert env == {"TENSORBOARD_LOGGING_DIR": "logs/tensorboard/demo_x/seed1/train", "WANDB_RUN_GROUP": "demo_x"}


def test_full_finetune_and_merge_change_weights(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    data = tmp_path / "train.parquet"
    write_table(records_to_table([{"id": str(i), "messages": conv("hi", "I cannot help")} for i in range(8)]), data)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[0].mlp.up_proj.weight
    for recipe in ({"finetune": "full", "lr": 1e-3, "batch_size": 4},
                   {"finetune": "lora", "merge": True, "lr": 1e-2, "batch_size": 4}):
        out = tmp_path / recipe["finetune"]
        train.train(str(tiny_model_dir), [str(data)], str(out), recipe)
        assert not (out / "adapter_config.json").exists()
        after = AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.up_proj.weight
        assert not torch.allclose(before.float(), after.float())


def test_training_is_reproducible_with_a_seed(tiny_model_dir, tmp_path):
    data = tmp_path / "train.parquet"
    write_table(records_to_table([{"id": str(i), "messages": conv(f"q{i}", f"a{i}")} for i in range(8)]), data)
    losses = [train.train(str(tiny_model_dir), [str(data)], str(tmp_path / f"m{k}"),
                          {"batch_size": 4}, seed=7)["train_loss"] for k in range(2)]
    assert losses[0] == losses[1]


def test_split_prompt():
    assert generate.split_prompt(conv("q", "a")) == (conv("q"), "a")
    assert generate.split_prompt(conv("q")) == (conv("q"), None)


def test_hf_batched_greedy_matches_one_at_a_time(tiny_model_dir):
    backend = llm.HFBackend(str(tiny_model_dir))
    prompts = [conv("short"), conv("a much longer prompt with many more words in it than the first"),
               conv("medium length prompt here")]
    params = llm.GenParams(max_new_tokens=8, batch_size=3)
    batched = backend.generate(prompts, params)
    single = [backend.generate([p], llm.GenParams(max_new_tokens=8, batch_size=1))[0] for p in prompts]
    assert batched == single
    assert backend.tokenizer.padding_side == "left"


def test_generate_cli_on_adapter_and_metadata(tiny_model_dir, tmp_path):
    data = tmp_path / "train.parquet"
    write_table(records_to_table([{"id": str(i), "messages": conv(f"q{i}", f"a{i}")} for i in range(4)]), data)
    adapter = tmp_path / "adapter"
    train.train(str(tiny_model_dir), [str(data)], str(adapter), {"batch_size": 4})
    evals = tmp_path / "eval.parquet"
    write_table(records_to_table([{"id": "e1", "messages": conv("q1", "ref answer"), "category": "c"},
                                  {"id": "e2", "messages": conv("q2"), "reference": "#### 2"}]), evals)
    out = tmp_path / "gens.parquet"
    generate.main(["--model", str(adapter), "--input", str(evals), "--output", str(out),
                   "--max_new_tokens", "4", "--temperature", "0.7", "--seed", "1"])
    t = pq.read_table(out)
    assert t.column("id").to_pylist() == ["e1", "e2"]
    assert t.column("reference").to_pylist() == ["ref answer", "#### 2"]
    assert t.column("messages").to_pylist()[0] == conv("q1")
    meta = json.loads(t.schema.metadata[b"safeft"])
    assert meta["params"]["temperature"] == 0.7 and meta["backend"] == "hf"
    log = json.loads((adapter / "train_log.json").read_text())
    assert meta["chat_template_sha256"] == log["chat_template_sha256"]


def test_vllm_arguments_without_a_gpu(tiny_model_dir, tmp_path):
    args = llm.vllm_engine_args(str(tiny_model_dir), tensor_parallel_size=4, max_model_len=1024)
    assert args == {"model": str(tiny_model_dir), "tensor_parallel_size": 4, "seed": 0, "dtype": "auto",
                    "enable_lora": False, "max_model_len": 1024}
    greedy = llm.vllm_sampling_args(llm.GenParams(max_new_tokens=5))
    assert greedy == {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "seed": 0}


def test_eval_prompt_must_end_with_user(tiny_model_dir):
    table = records_to_table([{"id": "x", "messages": [{"role": "system", "content": "s"}]}])
    with pytest.raises(DataError, match="row 0: field 'messages'"):
        generate.generate_table(table, None, llm.GenParams(), "e.parquet")
