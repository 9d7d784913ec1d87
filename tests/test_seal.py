"""SEAL: the weight formulas, the lambda schedule, one bilevel step against a hand-computed Adam update of the
selector, top-p selection by id, and a killed selector run that resumes to the same selector."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from smk_helpers import TINY, smk

from workflow_scripts import demo_data, seal
from workflow_scripts.io import records_to_table, write_table


def test_weights_start_at_one_and_softmax_weights_sum_to_n():
    z = seal.initial_logits(5, "softmax")
    assert torch.allclose(seal.weights(z, "softmax"), torch.ones(5))
    z = torch.tensor([0.3, -1.0, 2.0, 0.0])
    assert seal.weights(z, "softmax").sum().item() == pytest.approx(4.0)
    assert torch.allclose(seal.weights(seal.initial_logits(3, "sigmoid"), "sigmoid"), torch.ones(3), atol=1e-4)
    assert seal.weights(torch.tensor([0.0]), "sigmoid").item() == 1.0


def test_lambda_drops_after_the_first_epoch():
    assert [seal.lam_at(e, 1.0, 0.03) for e in range(3)] == [1.0, pytest.approx(0.97), pytest.approx(0.94)]
    assert seal.lam_at(50, 1.0, 0.03) == 0.0


def test_epochs_zip_two_shuffled_orders_and_replay_the_same_batches():
    pairs = seal.epoch_orders(5, 8, seed=0, epoch=0)
    assert len(pairs) == 5 and sorted(s for s, _ in pairs) == list(range(5))
    assert len({f for _, f in pairs}) == 5
    assert seal.epoch_orders(5, 8, 0, 0) == pairs and seal.epoch_orders(5, 8, 0, 1) != pairs
    assert [len(b[0]) for b in seal.batches(pairs, 2)] == [2, 2, 1]


def test_top_p_is_by_id_whatever_rows_were_dropped_upstream():
    ids = ["a7", "c2", "x", "b9", "q"]  # not contiguous: earlier steps dropped rows
    keep = seal.select(ids, [0.5, 0.9, 0.1, 0.9, 0.3], p=0.6)
    assert keep == [True, True, False, True, False]
    table = records_to_table([{"id": i, "messages": [{"role": "user", "content": i},
                                                     {"role": "assistant", "content": "ok"}], "unsafe": i == "x"}
                              for i in ids])
    out, decisions, selector = seal.selection_tables(table, [0.5, 0.9, 0.1, 0.9, 0.3], [1.0] * 5, 0.6)
    assert out.column("id").to_pylist() == ["a7", "c2", "b9"]
    assert selector.column("rank").to_pylist() == [3, 1, 5, 2, 4] and selector.column("unsafe").to_pylist()[2]
    assert decisions.column("score").to_pylist() == [0.5, 0.9, 0.1, 0.9, 0.3]


def small_sets(n_ft=6, n_safe=4):
    ft = records_to_table(demo_data.math_set(n_ft, 3, "ft"))
    safe = records_to_table(demo_data.refusal_set(n_safe, 0))
    return ft, safe


def test_one_bilevel_step_matches_a_hand_computed_adam_update(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workflow_scripts.objectives import encode_table

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    ft, safe = small_sets()
    ft_ex, safe_ex = encode_table(tok, ft, 256), encode_table(tok, safe, 256)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    z = torch.tensor([0.1, 0.4, -0.2, 0.1, 0.0, 0.3], requires_grad=True)
    lr = 5e-3
    selector_opt = torch.optim.Adam([z], lr=lr, betas=(0.9, 0.95))
    model_opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    rows = [4, 1, 2]
    safe_batch, ft_batch = seal.collate(safe_ex[:2], tok.pad_token_id, "cpu"), seal.collate(
        [ft_ex[i] for i in rows], tok.pad_token_id, "cpu")
    with torch.no_grad():  # the losses the step will see: before the model moves
        l_ft = seal.example_losses(model, ft_batch)
    z0 = z.detach().clone()
    seal.bilevel_step(model, z, model_opt, selector_opt, safe_batch, ft_batch, rows, lam=0.9, activation="softmax")
    # d/dz_k mean_i(N s_i l_i) = (N / B) sum_i l_i s_i (delta_ik - s_k) over the batch rows i
    s, n, b = torch.softmax(z0, 0), 6, len(rows)
    grad = torch.zeros(6)
    for i, li in zip(rows, l_ft, strict=True):
        grad += n / b * li * s[i] * ((torch.arange(6) == i).float() - s)
    # Adam's first step: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps)
    expected = z0 - lr * grad / (grad.abs() + 1e-8)
    assert torch.allclose(z.detach(), expected, atol=1e-6)
    # every logit moves, those outside the batch too (the softmax couples them)
    assert (z.detach() != z0).all()


def test_a_killed_selector_run_resumes_to_the_same_selector(tiny_model_dir, tmp_path):
    ft, safe = small_sets(8, 8)
    opts = seal.SealOptions(safe="safe", epochs=2, batch_size=2, lr=1e-3, checkpoint_steps=3, max_length=256)
    whole = seal.train_selector(str(tiny_model_dir), ft, safe, opts, threads=1)
    assert whole["log"]["steps"] == 8 and len(whole["logits"]) == 8
    lams = [h["lam"] for h in whole["log"]["history"]]
    assert lams[:4] == [1.0] * 4 and lams[4:] == [pytest.approx(0.97)] * 4
    ckpt = tmp_path / "ckpt"
    assert seal.train_selector(str(tiny_model_dir), ft, safe, opts, ckpt, threads=1, stop_after=5) is None
    assert (ckpt / "selector_state.pt").exists()
    resumed = seal.train_selector(str(tiny_model_dir), ft, safe, opts, ckpt, threads=1)
    assert resumed["log"]["steps"] == 8
    assert resumed["logits"] == pytest.approx(whole["logits"], abs=1e-6)
    # other options: the old state is not resumed
    other = seal.SealOptions(**{**opts.__dict__, "selector_lr": 1e-2})
    fresh = seal.train_selector(str(tiny_model_dir), ft, safe, other, ckpt, threads=1)
    assert fresh["log"]["history"][0]["step"] == 1


def test_seal_step_in_the_tiny_workflow_measures_its_filter(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["datasets"]["tiny_unsafe"] = {"generator": "unsafe_compliance", "n": 8}
    cfg["experiments"]["tiny_seal"] = {
        "model": "tiny_aligned", "train": "tiny_math_train", "recipe": "tiny", "eval": {"safe_rate": "tiny_harmful"},
        "methods": [{"method": "mix", "unsafe": "tiny_unsafe", "ratio": 0.25, "n": 16},
                    {"method": "seal", "safe": "tiny_refusals", "p": 0.75, "epochs": 1, "batch_size": 4,
                     "max_length": 256, "lr": 1e-3}]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = smk(tmp_path, "-n", "-p", "results/tiny_seal/filter.json", "--configfile", str(tmp_path / "cfg.yaml")).stdout
    assert "rule seal:" in out and "--checkpoint_dir checkpoints/tiny_seal/seal_2" in out
    smk(tmp_path, "--cores", "2", "results/tiny_seal/filter.json", "--configfile", str(tmp_path / "cfg.yaml"))
    measures = json.loads((tmp_path / "results/tiny_seal/filter.json").read_text())["steps"][1]
    assert measures["step"] == "seal" and measures["rows_kept"] == 12 and measures["unsafe_in"] == 4
    assert measures["score_drops"] == "low" and 0 <= measures["score_auc"] <= 1
    selector = pq.read_table(tmp_path / "data/tiny_seal/steps/2_seal.selector.parquet")
    assert selector.num_rows == 16 and set(selector.column_names) >= {"id", "logit", "weight", "rank", "unsafe"}
    assert json.loads((tmp_path / "data/tiny_seal/steps/2_seal.selector.log.json").read_text())["steps"] == 4


def test_seal_cli_rejects_a_bad_option(tmp_path, capsys):
    ft, safe = small_sets()
    write_table(ft, tmp_path / "ft.parquet")
    with pytest.raises(SystemExit) as exc:
        seal.main(["--input", str(tmp_path / "ft.parquet"), "--output", "o", "--decisions", "d", "--selector", "s",
                   "--base", "b", "--options", json.dumps({"safe": "x", "activation": "tanh"})])
    assert exc.value.code == 2 and "'activation' must be one of softmax, sigmoid" in capsys.readouterr().err


def test_paper_scale_seal_plans_on_the_gpu_class(tmp_path):
    out = smk(tmp_path, "-n", "-p", "results/orca_seal_safeinstr/win_rate.json").stdout
    command = next(line for line in out.splitlines() if "workflow_scripts.seal --input" in line)
    options = json.loads(command.split("--options '")[1].split("'")[0])
    assert options["safe"] == "data/raw/hh_rlhf_chosen.parquet" and options["p"] == 0.8
    assert options["deepspeed"] == "deepspeed/zero3.json" and options["gpus"] == 4  # ZeRO-3 on 4 GPUs
    assert "models/base/llama3_8b_instruct" in command
    assert "Open-Orca/SlimOrca" in out and "--baseline_generations generations/orca_sft/" in out


def test_batches_split_across_processes_and_the_deepspeed_config_is_filled(tmp_path):
    assert seal.shard([5, 1, 7, 2], 0, 2) == [5, 7] and seal.shard([5, 1, 7, 2], 1, 2) == [1, 2]
    assert seal.shard([3], 1, 2) == [3]  # a batch smaller than the world: every process uses it whole
    path = tmp_path / "z3.json"
    path.write_text(json.dumps({"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3},
                                "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    config = seal.deepspeed_config(str(path), micro_batch=16, world=4, dtype="bfloat16")
    assert config["train_batch_size"] == 64 and config["train_micro_batch_size_per_gpu"] == 16
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 0.0
    assert config["bf16"]["enabled"] is True and config["zero_optimization"] == {"stage": 3}


SELECTOR_SCRIPT = """
import json, os, sys
from workflow_scripts import demo_data, seal
from workflow_scripts.io import records_to_table
base, out, stop_after, zero = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ft = records_to_table(demo_data.math_set(8, 3, "ft"))
safe = records_to_table(demo_data.refusal_set(8, 0))
opts = seal.SealOptions(safe="safe", epochs=2, batch_size=2, lr=1e-3, checkpoint_steps=0, max_length=256,
                        dtype="float32", deepspeed=zero)
first = seal.train_selector(base, ft, safe, opts, out + "/ckpt", threads=1, stop_after=stop_after or None)
# stopped: the same processes start again from the files, as a rerun of the job would
result = first or seal.train_selector(base, ft, safe, opts, out + "/ckpt", threads=1)
with open(f"{out}/rank{os.environ['RANK']}.json", "w") as f:
    json.dump(result, f)
"""


def zero_selector(tiny_model_dir, out, procs, stop_after=0):
    import os
    import subprocess
    import sys

    script = out / "selector.py"
    out.mkdir(parents=True, exist_ok=True)
    script.write_text(SELECTOR_SCRIPT)
    zero = str(Path(__file__).resolve().parents[1] / "deepspeed" / "zero3.json")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(procs), str(script), str(tiny_model_dir), str(out), str(stop_after), zero],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]


def test_the_zero3_selector_on_two_processes_is_the_single_device_algorithm(tiny_model_dir, tmp_path):
    ft, safe = small_sets(8, 8)
    opts = seal.SealOptions(safe="safe", epochs=2, batch_size=2, lr=1e-3, checkpoint_steps=0, max_length=256,
                            dtype="float32")
    plain = seal.train_selector(str(tiny_model_dir), ft, safe, opts, threads=1)
    # Two processes, one row of each batch apiece: the averaged gradients are the whole batch's, and both
    # processes end with the same logits.
    two = zero_selector(tiny_model_dir, tmp_path / "two", 2)
    assert two[0]["log"]["world_size"] == 2 and two[0]["log"]["deepspeed"].endswith("zero3.json")
    assert two[0]["logits"] == two[1]["logits"]
    assert two[0]["logits"] == pytest.approx(plain["logits"], abs=1e-5)
    # Stopped after 5 steps (DeepSpeed's partitioned checkpoint + the selector state), then resumed.
    resumed = zero_selector(tiny_model_dir, tmp_path / "resumed", 2, stop_after=5)
    assert resumed[0]["log"]["steps"] == 8 and resumed[0]["logits"] == pytest.approx(plain["logits"], abs=1e-5)
    assert (tmp_path / "resumed" / "ckpt" / "step5").is_dir()


def test_uneven_shares_average_to_the_batch_mean():
    # 5 rows on 2 processes (3 + 2): each divides its sum by 5 / 2, and the mean of the two is the batch mean.
    losses = [1.0, 2.0, 3.0, 4.0, 5.0]
    rows = [0, 1, 2, 3, 4]
    shares = [seal.shard(rows, r, 2) for r in range(2)]
    per_process = [sum(losses[i] for i in share) / seal.share_size(rows, 2) for share in shares]
    assert sum(per_process) / 2 == pytest.approx(sum(losses) / 5)
    assert seal.share_size([7], 2) == 1 and seal.shard([7], 1, 2) == [7]
