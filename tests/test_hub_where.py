"""Hub datasets (`hub:`) and row filters (`where:`): local Hub-format datasets through the download rule's code
path, the one-line offline error, token hygiene, the filter's semantics and decisions table, and the rule plan.

Nothing here reaches the network: Hub datasets are local folders (Dataset.save_to_disk, a data folder), the
library's loader is monkeypatched, or the library runs in offline mode / against a closed local port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml
from smk_helpers import planned_outputs, smk

from workflow_scripts import data, manifest
from workflow_scripts.io import DECISIONS, DataError, read_table, sha256_file

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_TESTtokenNOTreal0123456789"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """In-process tests must never probe the real Hub; progress bars off (main() would set it for the process)."""
    def refuse():
        raise AssertionError("a test tried to reach the Hub")

    monkeypatch.setattr(data, "_hub_reachable", refuse)
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflow_scripts.data", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def gsm8k_like() -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "question": ["What is 2 + 3?", "What is 10 - 4?", "What is 3 * 3?"],
        "answer": ["2 + 3 = 5\n#### 5", "10 - 4 = 6\n#### 6", "3 * 3 = 9\n#### 9"],
    })


def offline_env(tmp_path: Path) -> dict:
    """An empty Hugging Face cache, so nothing the developer has cached can make the test pass."""
    return {"HF_HOME": str(tmp_path / "hf_home"), "HF_DATASETS_CACHE": str(tmp_path / "hf_home" / "datasets")}


# ---------------------------------------------------------------- hub: local Hub-format datasets


def test_saved_dataset_downloads_like_the_rule_and_normalises_with_a_preset(tmp_path):
    gsm8k_like().save_to_disk(str(tmp_path / "gsm8k_saved"))
    dl, info = tmp_path / "data/download/gsm/hub.parquet", tmp_path / "data/download/gsm/hub.json"
    # the download_hub rule's command line (common.smk hub_args), then the normalise rule's
    assert data.main(["--hub", str(tmp_path / "gsm8k_saved"), "--split", "train", "--download-to", str(dl),
                      "--info", str(info)]) == 0
    raw = tmp_path / "data/raw/gsm.parquet"
    assert data.main(["--source", "gsm", "--input", str(dl), "--preset", "question_answer",
                      "--output", str(raw)]) == 0
    t = read_table(raw)
    assert t.num_rows == 3
    assert t.column("messages")[1].as_py() == [{"role": "user", "content": "What is 10 - 4?"},
                                               {"role": "assistant", "content": "10 - 4 = 6\n#### 6"}]
    assert t.column("source").to_pylist() == ["gsm"] * 3
    prov = json.loads(info.read_text())
    assert prov["hub"] == str(tmp_path / "gsm8k_saved") and prov["split"] == "train" and prov["rows"] == 3
    assert prov["columns"] == ["question", "answer"] and prov["sha"] is None  # a local folder has no commit
    assert prov["sha256"] == sha256_file(dl)
    # nothing half-written is left beside the outputs
    assert sorted(p.name for p in dl.parent.iterdir()) == ["hub.json", "hub.parquet"]


def test_saved_dataset_dict_picks_the_split(tmp_path):
    ds = gsm8k_like()
    datasets.DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(str(tmp_path / "dd"))
    loaded, info = data.load_hub(str(tmp_path / "dd"), split="test")
    assert loaded["question"] == ["What is 3 * 3?"] and info["split"] == "test"
    with pytest.raises(RuntimeError, match=r"no split 'validation'.*\['test', 'train'\]"):
        data.load_hub(str(tmp_path / "dd"), split="validation")


def test_local_data_folder_loads_through_load_dataset(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompt": "Say hi.", "response": "Hi."}\n'
                                        '{"prompt": "Say bye.", "response": "Bye."}\n')
    data.download_hub(str(folder), tmp_path / "dl/hub.parquet", cache_dir=str(tmp_path / "cache"))
    t = data.read_records(tmp_path / "dl/hub.parquet", preset="prompt_response")
    assert [m[0]["content"] for m in t.column("messages").to_pylist()] == ["Say hi.", "Say bye."]


def test_revision_and_commit_sha_are_recorded_for_the_manifest(tmp_path, monkeypatch):
    calls = fake_hub(monkeypatch, sha="0123456789abcdef0123456789abcdef01234567")
    info = data.download_hub("org/set", tmp_path / "dl/hub.parquet", tmp_path / "dl/hub.json", config="main",
                             revision="v1.0")
    assert calls[0]["path"] == "org/set" and calls[0]["name"] == "main" and calls[0]["revision"] == "v1.0"
    assert info["revision"] == "v1.0" and info["sha"] == "0123456789abcdef0123456789abcdef01234567"
    m = manifest.build_manifest("exp", {}, [], [], [], [0], downloads=[str(tmp_path / "dl/hub.json")])
    assert m["downloads"][str(tmp_path / "dl/hub.json")]["sha"] == info["sha"]


# ---------------------------------------------------------------- offline


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_offline_and_not_cached_fails_at_once_with_one_line(tmp_path):
    env = {**offline_env(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.monotonic()
    proc = cli("--hub", "openai/gsm8k", "--hub-config", "main", "--download-to", tmp_path / "dl/hub.parquet", env=env)
    line = one_line_error(proc)
    assert time.monotonic() - start < 60
    assert "'openai/gsm8k' is not cached" in line and "HF_HUB_OFFLINE" in line and "`path:`" in line
    assert not (tmp_path / "dl").exists()


def test_unreachable_hub_fails_at_once_with_one_line(tmp_path):
    with socket.socket() as s:  # a local port nobody listens on: the probe is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**offline_env(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    for var in data.OFFLINE_VARS:
        env[var] = ""
    start = time.monotonic()
    proc = cli("--hub", "openai/gsm8k", "--download-to", tmp_path / "dl/hub.parquet", env=env)
    line = one_line_error(proc)
    assert time.monotonic() - start < 30  # not the library's half-minute of retries
    assert "not cached and the Hub cannot be reached" in line and "`path:`" in line


def test_a_connection_error_from_the_loader_is_the_not_cached_line(monkeypatch):
    monkeypatch.setattr(data, "_hub_reachable", lambda: True)

    def unreachable(*args, **kwargs):
        try:
            raise OSError("[Errno 101] Network is unreachable")
        except OSError as e:
            raise ConnectionError("Couldn't reach 'org/set' on the Hub (LocalEntryNotFoundError)") from e

    monkeypatch.setattr(datasets, "load_dataset_builder", unreachable)
    with pytest.raises(RuntimeError) as err:
        data.load_hub("org/set")
    assert "\n" not in str(err.value) and "'org/set' is not cached" in str(err.value)


# ---------------------------------------------------------------- token


class FakeBuilder:
    def __init__(self, sha):
        self.hash = sha

    def download_and_prepare(self):
        pass

    def as_dataset(self, split):
        return gsm8k_like()


def fake_hub(monkeypatch, sha=None, error=None) -> list[dict]:
    """datasets.load_dataset_builder replaced: records its arguments, returns a builder of gsm8k_like()."""
    calls = []
    monkeypatch.setattr(data, "_hub_reachable", lambda: True)

    def builder(path, name=None, **kwargs):
        calls.append({"path": path, "name": name, **kwargs})
        if error:
            raise error
        return FakeBuilder(sha)

    monkeypatch.setattr(datasets, "load_dataset_builder", builder)
    return calls


def test_token_comes_from_the_named_variable_and_is_never_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAFEFT_TEST_HF_TOKEN", SECRET)
    calls = fake_hub(monkeypatch)
    dl, info = tmp_path / "dl/hub.parquet", tmp_path / "dl/hub.json"
    assert data.main(["--hub", "org/gated", "--token-env", "SAFEFT_TEST_HF_TOKEN", "--download-to", str(dl),
                      "--info", str(info)]) == 0
    assert calls[0]["token"] == SECRET
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    for f in (dl, info):
        assert SECRET.encode() not in f.read_bytes()


def test_an_error_never_shows_the_token(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAFEFT_TEST_HF_TOKEN", SECRET)
    fake_hub(monkeypatch, error=PermissionError(f"401 Unauthorized (Authorization: Bearer {SECRET})\ngated"))
    assert data.main(["--hub", "org/gated", "--token-env", "SAFEFT_TEST_HF_TOKEN",
                      "--download-to", str(tmp_path / "dl/hub.parquet")]) != 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert out.err.count("\n") == 1 and "401 Unauthorized" in out.err and "***" in out.err


def test_unset_token_variable_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SAFEFT_TEST_HF_TOKEN", raising=False)
    fake_hub(monkeypatch)
    assert data.main(["--hub", "org/gated", "--token-env", "SAFEFT_TEST_HF_TOKEN",
                      "--download-to", str(tmp_path / "dl/hub.parquet")]) != 0
    assert "token_env SAFEFT_TEST_HF_TOKEN: that environment variable is not set" in capsys.readouterr().err


# ---------------------------------------------------------------- where


ROWS = [
    {"id": "a", "prompt": "p1", "response": "r1", "label": "safe", "lang": "en"},
    {"id": "b", "prompt": "p2", "response": "r2", "label": "unsafe", "lang": "en"},
    {"id": "c", "prompt": "p3", "response": "r3", "label": "borderline", "lang": "de"},
    {"id": "d", "prompt": "p4", "response": "r4", "lang": "en"},  # no label
    {"id": "e", "prompt": "p5", "response": "r5", "label": "safe", "lang": "de"},
]


@pytest.fixture
def labelled(tmp_path) -> Path:
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.mark.parametrize("where, kept", [
    ({"label": "safe"}, ["a", "e"]),                                   # equality; d has no label: not matching
    ({"label": ["safe", "borderline"]}, ["a", "c", "e"]),              # a list means `in`
    ({"not": {"label": "unsafe"}}, ["a", "c", "d", "e"]),              # not: d has no label, so it is kept
    ({"label": ["safe", "borderline"], "lang": "en"}, ["a"]),          # several keys are ANDed
    ({"label": "safe", "not": {"lang": "de"}}, ["a"]),
    ({"not": {"label": "safe", "lang": "de"}}, ["a", "b", "c", "d"]),  # not of an AND
])
def test_where_keeps_exactly_the_matching_rows(labelled, where, kept):
    table, decisions = data.read_filtered(labelled, preset="prompt_response", where=where)
    assert table.column("id").to_pylist() == kept
    assert decisions.schema == DECISIONS
    assert decisions.column("id").to_pylist() == ["a", "b", "c", "d", "e"]  # every source row, in order
    assert [i for i, k in zip(decisions.column("id").to_pylist(), decisions.column("kept").to_pylist(),
                              strict=True) if k] == kept
    assert decisions.num_rows == table.num_rows + decisions.column("kept").to_pylist().count(False)


def test_where_reasons(labelled):
    _, decisions = data.read_filtered(labelled, preset="prompt_response",
                                      where={"label": ["safe", "borderline"], "not": {"lang": "de"}})
    reasons = dict(zip(decisions.column("id").to_pylist(), decisions.column("reason").to_pylist(), strict=True))
    assert reasons == {"a": "where: matches",
                       "b": "where: label is 'unsafe', not in ['safe', 'borderline']",
                       "c": 'where: matches not {"lang": "de"}',
                       "d": "where: no field 'label'",
                       "e": 'where: matches not {"lang": "de"}'}


def test_where_on_the_command_line_writes_decisions_and_logs_counts(labelled, tmp_path):
    out, dec = tmp_path / "data/raw/x.parquet", tmp_path / "data/raw/x.where.parquet"
    proc = cli("--input", labelled, "--preset", "prompt_response", "--where", json.dumps({"label": "safe"}),
               "--decisions", dec, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert 'where {"label": "safe"}: kept 2 of 5 rows read, dropped 3' in proc.stdout
    assert read_table(out).column("id").to_pylist() == ["a", "e"]
    d = pq.read_table(dec)
    assert d.column("kept").to_pylist() == [True, False, False, False, True]
    assert d.column("score").to_pylist() == [None] * 5


def test_where_on_raw_columns_before_mapping_and_csv_numbers(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("goal,target,split\nq1,t1,1\nq2,t2,2\nq3,t3,1\n")
    t, d = data.read_filtered(path, fields={"prompt": "goal", "response": "target"}, where={"split": 1})
    assert [m[0]["content"] for m in t.column("messages").to_pylist()] == ["q1", "q3"]
    assert "split" not in t.column_names and d.num_rows == 3


def test_where_then_limit(labelled):
    t, d = data.read_filtered(labelled, preset="prompt_response", where={"lang": "en"}, limit=2)
    assert t.column("id").to_pylist() == ["a", "b"] and d.column("id").to_pylist() == ["a", "b"]


def test_dropped_rows_are_not_checked(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "label": "keep"}) + "\n"
                    + json.dumps({"prompt": 7, "label": "drop"}) + "\n")  # malformed, but filtered out
    t, d = data.read_filtered(path, preset="prompt_response", where={"label": "keep"})
    assert t.num_rows == 1 and d.column("kept").to_pylist() == [True, False]
    assert len(set(d.column("id").to_pylist())) == 2


def test_where_naming_a_field_no_row_has_is_an_error(labelled):
    with pytest.raises(DataError) as err:
        data.read_filtered(labelled, preset="prompt_response", where={"lable": "safe"})
    assert err.value.file == str(labelled) and err.value.field == "lable"
    assert "no row has this field" in str(err.value)
    with pytest.raises(DataError, match="field 'tone'"):  # also inside `not`, and past a limit
        data.read_filtered(labelled, preset="prompt_response", where={"not": {"tone": "rude"}}, limit=1)
    proc = cli("--input", labelled, "--preset", "prompt_response", "--where", '{"lable": "safe"}')
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"error: {labelled}: field 'lable': named in `where`, but no row has this field"


def test_where_keeping_nothing_is_an_error(labelled):
    with pytest.raises(DataError, match=r"no row matches where .*5 rows read, all dropped"):
        data.read_filtered(labelled, preset="prompt_response", where={"label": "nope"})


@pytest.mark.parametrize("where", [{}, {"label": {"x": 1}}, {"label": []}, {"not": "safe"}])
def test_malformed_where_is_refused(labelled, where):
    with pytest.raises(ValueError, match="where"):
        data.read_filtered(labelled, where=where)


# ---------------------------------------------------------------- the rules


HUB_CONFIG = {
    "datasets": {
        "hub_train": {"hub": "openai/gsm8k", "config": "main", "revision": "main", "preset": "question_answer",
                      "limit": 16},
        "hub_eval": {"hub": "org/gated-prompts", "split": "test", "token_env": "SAFEFT_TEST_HF_TOKEN",
                     "preset": "prompt_response", "where": {"label": ["harmful"], "not": {"lang": "de"}}},
    },
    "models": {"tiny": {"source": "tiny"}},
    "recipes": {"tiny": {"finetune": "lora", "epochs": 1, "lr": 1.0e-3, "batch_size": 8, "max_length": 64}},
    "evalsets": {"hub_harmful": {"dataset": "hub_eval", "metric": "safe_rate", "max_new_tokens": 4}},
    "experiments": {"hub_exp": {"model": "tiny", "train": "hub_train", "recipe": "tiny",
                                "eval": {"safe_rate": "hub_harmful"}}},
    "report": {"experiments": ["hub_exp"]},
}


def test_dry_run_plans_hub_download_normalise_and_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEFT_TEST_HF_TOKEN", SECRET)
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(yaml.safe_dump(HUB_CONFIG))
    out = smk(tmp_path, "-n", "-p", "results/hub_exp/manifest.json", "--configfile", str(cfg)).stdout
    planned = planned_outputs(out)
    for f in ("data/download/hub_train/hub.parquet", "data/download/hub_train/hub.json", "data/raw/hub_train.parquet",
              "data/download/hub_eval/hub.parquet", "data/raw/hub_eval.parquet", "data/raw/hub_eval.where.parquet"):
        assert f in planned, f
    assert "data/raw/hub_train.where.parquet" not in planned  # only a dataset with `where` has decisions
    assert "--hub openai/gsm8k --hub-config main --revision main --download-to" in out
    assert "--hub org/gated-prompts --split test --token-env SAFEFT_TEST_HF_TOKEN" in out
    assert "--where '{\"label\": [\"harmful\"], \"not\": {\"lang\": \"de\"}}' --decisions" in out
    assert "--downloads data/download/hub_train/hub.json data/download/hub_eval/hub.json" in out
    assert SECRET not in out


def test_hub_only_keys_and_where_on_other_datasets_are_config_errors(tmp_path):
    cfg = json.loads(json.dumps(HUB_CONFIG))
    cfg["datasets"]["gen"] = {"generator": "refusals", "n": 4, "split": "test", "where": {"label": "x"}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = smk(tmp_path, "-n", "--configfile", str(path), check=False)
    assert proc.returncode != 0
    assert "datasets.gen.split: only applies to a `hub:` dataset" in proc.stdout
    assert "datasets.gen.where: only applies to `url:`, `path:` and `hub:` datasets" in proc.stdout
