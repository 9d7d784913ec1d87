"""Shared fixtures: the tiny random Llama, the demo tokenizer, and the path to ../shared/data."""

import os
from pathlib import Path

import pytest

from workflow_scripts import models

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    models.build_tiny_llama(out)
    return out


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer from the demo GGUF, saved as a plain HF tokenizer folder."""
    from transformers import AutoTokenizer

    gguf = models.demo_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("demo_tok")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: skipped with a reason on a user's clone, required in CI."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs {SHARED_DATA} beside the checkout")
        pytest.skip(f"{SHARED_DATA} not present (only CI and the developers' machines have ../shared)")
    return SHARED_DATA
