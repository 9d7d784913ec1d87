import json
import os
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from workflow_scripts import models


def test_tiny_llama_is_small_and_has_a_chat_template(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert model.config.hidden_size // model.config.num_attention_heads >= 32  # vLLM's minimum head size
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("héllo wörld 🙂 #### 42", add_special_tokens=False)["input_ids"]) == "héllo wörld 🙂 #### 42"


def test_demo_gguf_converts_to_a_saveable_safetensors_model(tmp_path):
    out = tmp_path / "smollm2"
    models.materialise("demo_gguf", out)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert (out / "model.safetensors").exists() and (out / "chat_template.jinja").exists()
    assert json.loads((out / "safeft_source.json").read_text())["source"] == "demo_gguf"
    # saving again must work (the GGUF quantizer is gone)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.save_pretrained(tmp_path / "again")
    assert AutoConfig.from_pretrained(tmp_path / "again").num_hidden_layers == 30


def test_local_folder_copy_and_missing_folder(tiny_model_dir, tmp_path):
    models.materialise("local", tmp_path / "copy", path=str(tiny_model_dir))
    assert (tmp_path / "copy" / "model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.materialise("local", tmp_path / "nope", path=str(tmp_path))
    assert not (tmp_path / "nope").exists()


def test_hub_download_fails_clearly_offline(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2",
           "HF_HUB_DOWNLOAD_TIMEOUT": "2", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "workflow_scripts.models", "--source", "hub", "--path",
                           "meta-llama/Llama-2-7b-chat-hf", "--output", str(tmp_path / "llama")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "could not download 'meta-llama/Llama-2-7b-chat-hf'" in proc.stderr
    assert "set the model's `path:` to a local folder" in proc.stderr
    assert not (tmp_path / "llama").exists()
