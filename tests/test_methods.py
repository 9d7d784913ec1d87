"""Methods as plug-ins: step validation against schemas/methods/, the options helpers, and a toy method added to a
copy of the workflow with new files only (the worked example of docs/methods.md)."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from smk_helpers import REPO, TINY, planned_outputs, smk

from workflow_scripts.methods import (
    method_schemas,
    names_in_steps,
    options_from_cli,
    parse_options,
    step_owners,
    step_problem,
)

SCHEMAS = method_schemas(REPO / "schemas" / "methods")
WHERE = "experiments.x.methods[0]"


# ---------------------------------------------------------------- step validation


def test_shipped_methods_have_schemas():
    assert {"preview", "realign"} <= set(SCHEMAS)
    for name, schema in SCHEMAS.items():
        assert schema["properties"]["method"] == {"const": name} and schema["additionalProperties"] is False


def test_valid_steps_pass():
    assert step_problem({"method": "preview", "mode": "real", "m": 6}, WHERE, SCHEMAS) is None
    assert step_problem({"method": "realign", "classifier_model": "a", "rewriter_model": "b"}, WHERE, SCHEMAS) is None


def test_unknown_option_names_the_method_and_the_key():
    problem = step_problem({"method": "preview", "mm": 3}, WHERE, SCHEMAS)
    assert problem.startswith("experiments.x.methods[0]: preview has no option 'mm'")


def test_wrong_type_names_the_option():
    problem = step_problem({"method": "preview", "m": "six"}, WHERE, SCHEMAS)
    assert problem == "experiments.x.methods[0].m: 'six' is not of type 'integer'"


def test_unknown_method_lists_the_available_ones():
    problem = step_problem({"method": "foo"}, WHERE, SCHEMAS)
    assert problem.startswith("experiments.x.methods[0]: unknown method 'foo'; available: ")
    assert "preview" in problem and "realign" in problem


def test_missing_required_option():
    problem = step_problem({"method": "realign", "classifier_model": "a"}, WHERE, SCHEMAS)
    assert problem == "experiments.x.methods[0]: realign needs option 'rewriter_model'"
    problem = step_problem({"method": "realign", "classifier_model": "a", "rewriter_model": "b",
                            "retriever": "bm25"}, WHERE, SCHEMAS)
    assert problem == "experiments.x.methods[0]: realign needs option 'corpus'"


def test_config_error_from_the_workflow(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["experiments"]["tiny_real6"]["methods"] = [{"method": "preview", "mm": 3}]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = smk(tmp_path, "-n", "--configfile", str(tmp_path / "bad.yaml"), check=False)
    assert proc.returncode != 0
    assert "config.yaml: experiments.tiny_real6.methods[0]: preview has no option 'mm'" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class Toy:
    name: str
    k: int = 2
    rate: float = 0.5
    limit: float | None = None


def test_parse_options_fills_defaults_and_names_bad_keys():
    assert parse_options(Toy, {"name": "a"}, "toy") == Toy("a", 2, 0.5, None)
    with pytest.raises(ValueError, match="toy has no option 'kk'; options: name, k, rate, limit"):
        parse_options(Toy, {"name": "a", "kk": 1}, "toy")
    with pytest.raises(ValueError, match="toy needs option 'name'"):
        parse_options(Toy, {}, "toy")


def test_json_integers_become_floats_where_the_option_is_a_float():
    opts = parse_options(Toy, {"name": "a", "k": 3, "rate": 0, "limit": 1}, "toy")
    assert type(opts.k) is int and type(opts.rate) is float and type(opts.limit) is float


def test_options_from_cli_flags_win_over_the_json():
    assert options_from_cli(Toy, "toy", '{"name": "a", "k": 5}', {"k": 7}) == Toy("a", 7)
    assert options_from_cli(Toy, "toy", None, {"name": "b"}) == Toy("b")
    with pytest.raises(ValueError, match="JSON object"):
        options_from_cli(Toy, "toy", "[1]", {})


def test_names_in_steps_finds_models_and_datasets_by_value():
    steps = [{"method": "realign", "classifier_model": "tiny", "rewriter_model": "gpt-4o-mini", "corpus": "wiki"},
             {"method": "contrast", "unsafe": "harmful", "safe": ["benign", "tiny"], "m": 6}]
    assert names_in_steps(steps, {"tiny": {}, "other": {}}) == ["tiny"]
    assert names_in_steps(steps, ["harmful", "benign", "wiki", "unused"]) == ["wiki", "harmful", "benign"]
    assert names_in_steps([{"method": "tiny"}], ["tiny"]) == []


def test_manifest_config_includes_models_named_in_a_step(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["models"]["tiny_rewriter"] = {"source": "tiny"}
    cfg["experiments"]["tiny_realign"]["methods"][0]["rewriter_model"] = "tiny_rewriter"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # --configfile takes several files: the target goes before it.
    out = smk(tmp_path, "-n", "-p", "results/tiny_realign/manifest.json", "--configfile", str(tmp_path / "cfg.yaml"))
    command = next(line for line in out.stdout.splitlines() if "workflow_scripts.manifest" in line)
    subtree = json.loads(re.search(r"--config_json '(.*?)' ", command).group(1))
    assert subtree["models"]["tiny_rewriter"] == {"source": "tiny"}


# ---------------------------------------------------------------- steps shared between experiments

def test_a_step_is_owned_by_the_first_experiment_with_the_same_model_data_and_chain_up_to_it():
    mix = {"method": "mix", "unsafe": "u", "ratio": 0.2}
    seal = {"method": "seal", "safe": "s", "p": 0.8}
    experiments = {
        "plain": {"model": "m", "train": "t", "methods": [mix]},
        "seal": {"model": "m", "train": "t", "methods": [mix, seal]},
        "seal_more": {"model": "m", "train": "t", "methods": [dict(mix), dict(seal), {"method": "mix", "add": "s"}]},
        "seal_p": {"model": "m", "train": "t", "methods": [mix, {**seal, "p": 0.5}]},
        "other_model": {"model": "m2", "train": "t", "methods": [mix, seal]},
        "other_data": {"model": "m", "train": "t2", "methods": [mix]},
        "none": {"model": "m", "train": "t"},
    }
    owners = step_owners(experiments)
    assert owners["seal", 1] == owners["seal_more", 1] == owners["seal_p", 1] == "plain"
    assert owners["seal", 2] == owners["seal_more", 2] == "seal"
    assert owners["seal_more", 3] == "seal_more"
    assert owners["seal_p", 2] == "seal_p"  # another option: another selection
    assert owners["other_model", 1] == owners["other_model", 2] == "other_model"
    assert owners["other_data", 1] == "other_data"
    assert not any(exp == "none" for exp, _ in owners)


def test_shipped_seal_experiments_make_the_selection_once(tmp_path):
    out = smk(tmp_path, "-n", "-p", "results/demo_seal/safe_rate.json", "results/demo_seal_safeinstr/safe_rate.json",
              "results/demo_seal_safeinstr/filter.json").stdout
    planned = planned_outputs(out)
    assert planned.count("data/demo_seal/steps/2_seal.parquet") == 1
    assert not any(p.startswith("data/demo_seal_safeinstr/steps/2_") for p in planned)
    assert planned.count("data/demo_mix_vanilla/steps/1_mix.parquet") == 1  # the mix every demo mix row starts from
    # SafeInstr's step reads SEAL's selection where demo_seal made it.
    add = next(line for line in out.splitlines() if "workflow_scripts.mix" in line and "3_mix.parquet" in line)
    assert "data/demo_seal/steps/2_seal.parquet" in add


# ---------------------------------------------------------------- a new method from new files only

WORKFLOW_PARTS = ["Snakefile", "rules", "schemas", "workflow_scripts", "config.yaml", "prompts", "envs", "report"]


def doc_files() -> dict[str, str]:
    """The three files of docs/methods.md's worked example, by path."""
    text = (REPO / "docs" / "methods.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^`([\w/.]+keep_first[\w.]*)`:\n\n```\w*\n(.*?)^```", text, re.S | re.M)
    return dict(blocks)


def smk_copy(work, run, *args):
    """snakemake on the copied workflow, its own workflow_scripts first on the path."""
    env = {**os.environ, "PYTHONPATH": str(work),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(work / "Snakefile"), "--directory", str(run),
                           *args], capture_output=True, text=True, env=env, timeout=600)


def test_a_method_plugs_in_with_three_new_files(tmp_path):
    files = doc_files()
    assert sorted(files) == ["rules/methods/keep_first.smk", "schemas/methods/keep_first.schema.yaml",
                             "workflow_scripts/keep_first.py"]
    work = tmp_path / "workflow"
    work.mkdir()
    for part in WORKFLOW_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, work / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, work / part)
    for path, text in files.items():
        assert not (work / path).exists()
        (work / path).write_text(text, encoding="utf-8")
    cfg = yaml.safe_load(TINY.read_text())
    cfg["experiments"]["tiny_keep"] = {"model": "tiny", "train": "tiny_math_train", "recipe": "tiny",
                                       "methods": [{"method": "keep_first", "k": 3}],
                                       "eval": {"safe_rate": "tiny_harmful"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    proc = smk_copy(work, run, "data/tiny_keep/train.parquet", "--cores", "1",
                    "--configfile", str(tmp_path / "cfg.yaml"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    raw = pq.read_table(run / "data/raw/tiny_math_train.parquet")
    step = pq.read_table(run / "data/tiny_keep/steps/1_keep_first.parquet")
    assert step.num_rows == 3 and step.column("id").to_pylist() == raw.column("id").to_pylist()[:3]
    assert pq.read_table(run / "data/tiny_keep/train.parquet").num_rows == 3
    decisions = pq.read_table(run / "data/tiny_keep/steps/1_keep_first.decisions.parquet").to_pylist()
    assert [d["kept"] for d in decisions] == [True] * 3 + [False] * (raw.num_rows - 3)
    assert {"id", "kept", "reason"} <= set(decisions[0])
    # The copied workflow's own checks know the new method: a wrong option is named.
    cfg["experiments"]["tiny_keep"]["methods"][0]["k"] = "three"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = smk_copy(work, run, "--configfile", str(tmp_path / "bad.yaml"), "-n")
    assert "experiments.tiny_keep.methods[0].k: 'three' is not of type 'integer'" in proc.stdout + proc.stderr
