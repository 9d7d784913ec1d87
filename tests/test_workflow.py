"""Workflow tests: dry-runs of every shipped config, a tiny end-to-end run, the rerun rule, real shared data."""

import json
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest
import yaml
from smk_helpers import REPO, TINY, planned_outputs, smk


@pytest.mark.parametrize("args", [
    [],                                                                   # the demo (default target)
    ["results/gsm8k_real6/safe_rate.json", "results/gsm8k_real6/utility.json"],  # the paper's setting
    ["--configfile", str(TINY)],
])
def test_dry_run_every_shipped_config(tmp_path, args):
    out = smk(tmp_path, "-n", *args).stdout
    assert "Job stats" in out


def test_make_demo_seeds_switch_plans_every_seed(tmp_path):
    # The Makefile's SEED_CONFIG for SEEDS="0 1 2": --config reads the list's items as strings.
    make = subprocess.run(["make", "-n", "demo", "SEEDS=0 1 2"], cwd=REPO, capture_output=True, text=True, check=True)
    assert '--config "seeds=[0,1,2]"' in make.stdout
    targets = ["results/report/summary.md", "results/demo_mix_vanilla/safe_rate.json"]
    planned = planned_outputs(smk(tmp_path, "-n", *targets, "--config", "seeds=[0,1,2]").stdout)
    for seed in (0, 1, 2):
        assert f"models/demo_vanilla/seed{seed}" in planned and f"models/demo_real6/seed{seed}" in planned
    # An experiment's own `seeds` wins over the switch.
    assert "models/demo_mix_vanilla/seed0" in planned and "models/demo_mix_vanilla/seed1" not in planned


def test_paper_setting_plans_full_finetuning_with_deepspeed(tmp_path):
    out = smk(tmp_path, "-n", "-p", "results/gsm8k_real6/safe_rate.json").stdout
    assert """--options '{"m": 6, "mode": "real"}'""" in out
    assert '"finetune": "full"' in out and "deepspeed/zero2.json" in out
    assert "meta-llama/Llama-2-7b-chat-hf" in out
    assert "grade-school-math" in out


@pytest.mark.parametrize("graph", ["--rulegraph", "--dag"])
def test_graphs_are_valid_dot(tmp_path, graph):
    import pydot

    out = smk(tmp_path, graph).stdout
    assert out.startswith("digraph")
    parsed = pydot.graph_from_dot_data(out)
    assert parsed and any("preview" in n.get_label() for n in parsed[0].get_nodes() if n.get_label())
    # With -n, Snakemake 9 also prints "Building DAG of jobs..." on stdout: the graph is everything after it.
    dry = smk(tmp_path, "-n", graph).stdout
    assert sorted(dry[dry.index("digraph"):].splitlines()) == sorted(out.splitlines())
    if shutil.which("dot"):
        svg = subprocess.run(["dot", "-Tsvg"], input=out, capture_output=True, text=True, check=True).stdout
        assert "<svg" in svg


def test_config_errors_name_the_key(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    cfg["experiments"]["demo_vanilla"]["model"] = "nope"
    bad.write_text(yaml.safe_dump(cfg))
    proc = smk(tmp_path, "-n", "--configfile", str(bad), check=False)
    # in a dry run Snakemake prints its errors on stdout
    assert proc.returncode != 0 and "experiments.demo_vanilla.model: unknown model 'nope'" in proc.stdout
    cfg["experiments"]["demo_vanilla"]["model"] = "smollm2"
    cfg["recipes"]["align"]["learning_rate"] = 1
    bad.write_text(yaml.safe_dump(cfg))
    proc = smk(tmp_path, "-n", "--configfile", str(bad), check=False)
    assert proc.returncode != 0 and "learning_rate" in proc.stdout


@pytest.mark.slow
def test_tiny_end_to_end(tiny_run):
    summary = (tiny_run / "results/report/summary.md").read_text()
    for exp in ("tiny_base", "tiny_vanilla", "tiny_real6", "tiny_virtual"):
        assert exp in summary
        for metric in ("safe_rate", "utility"):
            r = json.loads((tiny_run / f"results/{exp}/{metric}.json").read_text())
            assert 0.0 <= r["value"] <= 1.0 and r["n"] > 0 and r["ci95"][0] <= r["value"] <= r["ci95"][1]
        manifest = json.loads((tiny_run / f"results/{exp}/manifest.json").read_text())
        assert manifest["chat_template_consistent"] and manifest["packages"]["torch"]
    real = json.loads((tiny_run / "results/tiny_real6/safe_rate.json").read_text())
    assert real["n_seeds"] == 2 and real["n"] == 16
    train = pq.read_table(tiny_run / "data/tiny_real6/train.parquet").to_pylist()
    raw = pq.read_table(tiny_run / "data/raw/tiny_math_train.parquet").to_pylist()
    decisions = pq.read_table(tiny_run / "data/tiny_real6/steps/1_preview.decisions.parquet")
    assert len(train) == len(raw) == decisions.num_rows
    vanilla = pq.read_table(tiny_run / "data/tiny_vanilla/train.parquet")
    assert vanilla.equals(pq.read_table(tiny_run / "data/raw/tiny_math_train.parquet"))
    assert all(" The answer begins with: " in r["messages"][0]["content"] for r in train)
    assert all(r["messages"][1] == s["messages"][1] for r, s in zip(train, raw, strict=True))
    virtual = pq.read_table(tiny_run / "data/tiny_virtual/train.parquet").to_pylist()
    assert all(r["messages"][1]["content"].startswith("Let's solve this problem. ") for r in virtual)
    for rule in ("train", "generate", "preview", "score", "judge", "realign_shard"):
        assert list((tiny_run / "benchmarks" / rule).rglob("*.tsv")), rule
    # generation.per_model_job names tiny_base: one job for both its eval sets; the others one job per set.
    assert [p.name for p in (tiny_run / "benchmarks/generate_sets/tiny_base").glob("*.tsv")] == ["generate_seed0.tsv"]
    assert len(list((tiny_run / "benchmarks/generate/tiny_vanilla").glob("*.tsv"))) == 3


@pytest.mark.slow
def test_tiny_run_report_extras(tiny_run):
    report = tiny_run / "results/report"
    # time per rule, summed from the benchmark files
    runtime = pq.read_table(report / "runtime.parquet").to_pylist()
    rules = {r["rule"] for r in runtime}
    assert {"train", "generate", "align", "score"} <= rules and abs(sum(r["share"] for r in runtime) - 1) < 1e-6
    assert "Where the time went" in (report / "report.md").read_text()
    # harmful refused + benign answered, where an experiment has both
    summary = pq.read_table(report / "summary.parquet").to_pylist()
    handled = [r for r in summary if r["metric"] == "handled_right"]
    assert [r["experiment"] for r in handled] == ["tiny_vanilla"] and handled[0]["n"] == 16
    assert (report / "safety_vs_over_refusal.png").stat().st_size > 0
    # loss curves, and the tensorboard event files of report_to: tensorboard under the run name
    assert (report / "training_curves.png").stat().st_size > 0
    assert list((tiny_run / "logs/tensorboard/tiny_real6/seed1/train").glob("events.out.tfevents.*"))
    assert list((tiny_run / "logs/tensorboard/tiny_aligned/seed0/align").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_tiny_run_judge_over_refusal_win_rate_and_realign(tiny_run):
    results = tiny_run / "results/tiny_vanilla"
    over = json.loads((results / "over_refusal.json").read_text())
    assert over["metric"] == "over_refusal" and over["n"] == 8 and 0 <= over["value"] <= 1
    judged = json.loads((results / "judge_safe_rate.json").read_text())
    # A 2-layer random model cannot follow the rubric: every reply is unparsed, and counted, not dropped.
    assert judged["n_total"] == 8 and judged["n_unparsed"] + judged["n"] == 8
    assert judged["judge"]["prompt_sha256"] and "agreement_with_keyword" in judged
    win = json.loads((results / "win_rate.json").read_text())
    assert win["metric"] == "win_rate" and win["n_win"] + win["n_tie"] + win["n_loss"] + win["n_unparsed"] == 8
    realigned = pq.read_table(tiny_run / "data/tiny_realign/steps/1_realign.parquet")
    decisions = pq.read_table(tiny_run / "data/tiny_realign/steps/1_realign.decisions.parquet").to_pylist()
    raw = pq.read_table(tiny_run / "data/raw/tiny_math_train.parquet")
    assert realigned.column("id").to_pylist() == raw.column("id").to_pylist() == [d["id"] for d in decisions]
    assert {d["tag"] for d in decisions} <= {"rewrite", "original"} and all(d["reason"] for d in decisions)
    assert json.loads((tiny_run / "results/tiny_realign/safe_rate.json").read_text())["n"] == 8


@pytest.mark.slow
def test_changing_one_preview_parameter_reruns_only_that_experiment(tiny_run):
    assert "Nothing to be done" in smk(tiny_run, "-n", "--configfile", str(tiny_run / "tiny.yaml")).stdout
    cfg = yaml.safe_load((tiny_run / "tiny.yaml").read_text())
    cfg["experiments"]["tiny_real6"]["methods"][0]["m"] = 3
    (tiny_run / "changed.yaml").write_text(yaml.safe_dump(cfg))
    outs = planned_outputs(smk(tiny_run, "-n", "--configfile", str(tiny_run / "changed.yaml")).stdout)
    touched = {o for o in outs if "tiny_real6" in o}
    assert "data/tiny_real6/steps/1_preview.parquet" in touched
    assert "models/tiny_real6/seed0" in touched and "models/tiny_real6/seed1" in touched
    assert "generations/tiny_real6/seed1/tiny_harmful.parquet" in touched
    assert "results/tiny_real6/safe_rate.json" in touched and "results/tiny_real6/utility.json" in touched
    others = set(outs) - touched
    assert all(o.startswith("results/report/") for o in others), others


def dry_run_after(tiny_run, name, change):
    cfg = yaml.safe_load((tiny_run / "tiny.yaml").read_text())
    change(cfg)
    (tiny_run / name).write_text(yaml.safe_dump(cfg))
    return planned_outputs(smk(tiny_run, "-n", "--configfile", str(tiny_run / name)).stdout)


@pytest.mark.slow
def test_adding_a_seed_runs_only_that_seed(tiny_run):
    outs = dry_run_after(tiny_run, "seed_added.yaml",
                         lambda cfg: cfg["experiments"]["tiny_real6"].update(seeds=[0, 1, 2]))
    per_seed = {o for o in outs if "seed" in o}
    assert per_seed == {"models/tiny_real6/seed2", "generations/tiny_real6/seed2/tiny_harmful.parquet",
                        "generations/tiny_real6/seed2/tiny_math.parquet"}, per_seed
    rest = set(outs) - per_seed
    assert all(o.startswith(("results/tiny_real6/", "results/report/")) for o in rest), rest


@pytest.mark.slow
def test_removing_a_seed_reruns_only_the_aggregates(tiny_run):
    outs = dry_run_after(tiny_run, "seed_removed.yaml",
                         lambda cfg: cfg["experiments"]["tiny_real6"].update(seeds=[0]))
    assert outs and all(o.startswith(("results/tiny_real6/", "results/report/")) for o in outs), outs
    assert "results/tiny_real6/safe_rate.json" in outs


@pytest.mark.slow
def test_real_shared_data_on_the_tiny_model(tmp_path, shared_data):
    cfg = {
        "threads": 1,
        "models": {"tiny": {"source": "tiny"}},
        "datasets": {
            "gsm8k_slice": {"path": str(shared_data / "gsm8k/train.jsonl"), "preset": "question_answer",
                            "limit": 24},
            "gsm8k_test_slice": {"path": str(shared_data / "gsm8k/test.jsonl"), "preset": "question_answer",
                                 "limit": 8},
            "advbench_slice": {"path": str(shared_data / "advbench/harmful_behaviors.csv"),
                               "preset": "prompt_response", "fields": {"prompt": "goal", "response": "target"},
                               "limit": 12},
        },
        "recipes": {"tiny": {"finetune": "lora", "epochs": 1, "batch_size": 8, "max_length": 1024, "lora_r": 4}},
        "evalsets": {"adv": {"dataset": "advbench_slice", "metric": "safe_rate", "max_new_tokens": 4},
                     "gsm": {"dataset": "gsm8k_test_slice", "metric": "gsm8k", "max_new_tokens": 4}},
        "experiments": {"shared_real6": {"model": "tiny", "train": "gsm8k_slice", "recipe": "tiny",
                                         "methods": [{"method": "preview", "mode": "real", "m": 6}],
                                         "eval": {"safe_rate": "adv", "utility": "gsm"}}},
        "report": {"experiments": ["shared_real6"]},
    }
    (tmp_path / "shared.yaml").write_text(yaml.safe_dump(cfg))
    smk(tmp_path, "--cores", "2", "--configfile", str(tmp_path / "shared.yaml"))
    r = json.loads((tmp_path / "results/shared_real6/safe_rate.json").read_text())
    assert r["n"] == 12
    train = pq.read_table(tmp_path / "data/shared_real6/train.parquet").to_pylist()
    assert len(train) == 24 and "####" in train[0]["messages"][1]["content"]
    assert "The answer begins with:" in train[0]["messages"][0]["content"]
    assert (tmp_path / "results/report/summary.md").exists()
