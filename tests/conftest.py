"""Shared fixtures: the tiny random Llama, the demo tokenizer, the path to ../shared/data, and one finished tiny
end-to-end workflow run that the workflow, rerun and report tests share."""

import os
import shutil
from pathlib import Path

import pytest
from smk_helpers import TINY, smk

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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The whole tiny experiment set (tests/configs/tiny.yaml) run to the report in a scratch directory."""
    work = tmp_path_factory.mktemp("tiny_run")
    shutil.copy(TINY, work / "tiny.yaml")
    smk(work, "--cores", "2", "--configfile", str(work / "tiny.yaml"))
    return work
