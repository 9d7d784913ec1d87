"""Training survives a kill: checkpoints are resumed, never reused across runs, and a killed job leaves no output
that looks complete. DeepSpeed ZeRO runs the same code path on one CPU process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workflow_scripts import train
from workflow_scripts.io import records_to_table, write_table


def write_data(path: Path, n: int = 64) -> Path:
    rows = [{"id": str(i), "messages": [{"role": "user", "content": f"add {i} and 1"},
                                         {"role": "assistant", "content": f"{i} plus 1 is {i + 1}. #### {i + 1}"}]}
            for i in range(n)]
    write_table(records_to_table(rows), path)
    return path


def launch(tiny_model_dir, data, out, recipe, log):
    cmd = [sys.executable, "-m", "workflow_scripts.train", "--base", str(tiny_model_dir), "--data", str(data),
           "--output", str(out), "--recipe", json.dumps(recipe), "--threads", "1"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(predicate, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_training_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path, sig):
    data = write_data(tmp_path / "train.parquet")
    out = tmp_path / "model"
    ckpts = Path(f"{out}.checkpoints")
    recipe = {"epochs": 4, "batch_size": 2, "lr": 1e-3, "checkpoint_steps": 5}  # 128 steps
    with open(tmp_path / "first.log", "w") as log:
        proc = launch(tiny_model_dir, data, out, recipe, log)
        try:
            assert wait_for(lambda: any(ckpts.glob("checkpoint-*/trainer_state.json")), 240), \
                (tmp_path / "first.log").read_text()[-3000:]
            proc.send_signal(sig)  # scancel sends SIGTERM first, then SIGKILL after KillWait
            proc.wait(120)
        finally:
            proc.kill()
    assert proc.returncode != 0
    assert not out.exists(), "a killed job must not leave an output that looks complete"
    # A SIGKILL can land mid-save: the newest complete checkpoint is the one with its trainer_state.json.
    done_steps = max(int(p.parent.name.split("-")[1]) for p in ckpts.glob("checkpoint-*/trainer_state.json"))
    assert 0 < done_steps < 128

    info = train.train(str(tiny_model_dir), [str(data)], str(out), recipe, threads=1)
    assert info["resumed_from"] == f"checkpoint-{done_steps}"
    # The restored history continues past the checkpoint; a restart from step 0 would log steps twice.
    steps_logged = [h["step"] for h in info["log_history"] if "loss" in h]
    assert steps_logged == sorted(set(steps_logged)) and max(steps_logged) > done_steps
    assert info["global_step"] == 128
    assert (out / "adapter_model.safetensors").exists() and (out / "train_log.json").exists()
    assert not ckpts.exists() and not Path(f"{out}.partial").exists()


def test_checkpoint_of_another_run_is_not_resumed(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "train.parquet", n=8)
    out = tmp_path / "model"
    recipe = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "checkpoint_steps": 1}
    ckpts = Path(f"{out}.checkpoints")
    stale = ckpts / "checkpoint-1"
    stale.mkdir(parents=True)
    (ckpts / "fingerprint.txt").write_text("an older run with other data")
    (stale / "trainer_state.json").write_text("{}")
    info = train.train(str(tiny_model_dir), [str(data)], str(out), recipe, threads=1)
    assert info["resumed_from"] is None
    # Changing the seed changes the run: its checkpoints would not be resumed either.
    fp = train.run_fingerprint(str(tiny_model_dir), [str(data)], {**train.DEFAULT_RECIPE, **recipe}, 0)
    assert fp != train.run_fingerprint(str(tiny_model_dir), [str(data)], {**train.DEFAULT_RECIPE, **recipe}, 1)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_full_finetune_on_cpu(tiny_model_dir, tmp_path, stage):
    """The multi-GPU launch path (torchrun + ZeRO) with one CPU process and DeepSpeed's CPU accelerator."""
    data = write_data(tmp_path / "train.parquet", n=16)
    out = tmp_path / "model"
    repo = Path(__file__).resolve().parents[1]
    recipe = {"finetune": "full", "epochs": 1, "batch_size": 4, "lr": 1e-3, "max_length": 64,
              "deepspeed": str(repo / "deepspeed" / f"zero{stage}.json")}
    # The plain CLI, as the rule runs it: it relaunches itself under torchrun because the recipe names DeepSpeed.
    cmd = [sys.executable, "-m", "workflow_scripts.train", "--base", str(tiny_model_dir), "--data", str(data),
           "--output", str(out), "--recipe", json.dumps(recipe), "--threads", "1"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launching:" in proc.stdout and "torch.distributed.run" in proc.stdout
    log = json.loads((out / "train_log.json").read_text())
    assert log["recipe"]["deepspeed"].endswith(f"zero{stage}.json") and log["world_size"] == 1
    losses = [h["loss"] for h in log["log_history"] if "loss" in h]
    assert losses and all(loss == loss for loss in losses)  # finite, not NaN
    assert (out / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # the saved weights load as a full model
    assert sum(p.numel() for p in model.parameters()) > 0


def test_launch_command_one_process_per_gpu():
    argv = ["--base", "b", "--data", "d", "--output", "o"]
    assert train.launch_command(argv, {"finetune": "lora"}, 0) is None
    assert train.launch_command(argv, {"finetune": "lora"}, 1) is None
    cmd = train.launch_command(argv, {"finetune": "full", "deepspeed": "deepspeed/zero2.json"}, 4)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    assert cmd[-6:] == argv
    assert train.launch_command(argv, {"deepspeed": "z.json"}, 0)[5] == "1"


def test_global_batch_fixes_gradient_accumulation():
    recipe = {**train.DEFAULT_RECIPE, "batch_size": 16, "global_batch_size": 64}
    assert [train.grad_accum_steps(recipe, n) for n in (1, 2, 4)] == [4, 2, 1]
    assert train.grad_accum_steps({**train.DEFAULT_RECIPE, "grad_accum": 3}, 8) == 3
    with pytest.raises(ValueError, match="not a multiple"):
        train.grad_accum_steps(recipe, 3)
