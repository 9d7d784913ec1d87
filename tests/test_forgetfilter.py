"""ForgetFilter: the schedule and its recipes, the reference's normalisation, ROUGE-1 forgetting, both filter rules,
the filter measures of its decisions, and the step in the tiny workflow (interleaved, sharded, killed and resumed)."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from smk_helpers import TINY, smk, smk_killed_when

from workflow_scripts import forgetfilter as ff
from workflow_scripts.filter_measures import step_measures
from workflow_scripts.io import DataError, write_table


def opts(**kw):
    return ff.ForgetFilterOptions(**{"safe": "safe", "drop_fraction": 0.25, **kw})


def test_options_need_exactly_one_filter_rule():
    with pytest.raises(ValueError, match="exactly one of 'threshold' and 'drop_fraction'"):
        ff.ForgetFilterOptions(safe="s")
    with pytest.raises(ValueError, match="exactly one"):
        ff.ForgetFilterOptions(safe="s", threshold=0.1, drop_fraction=0.2)
    with pytest.raises(ValueError, match="backend"):
        opts(backend="openai")


def test_interleaved_schedule_continues_the_previous_round():
    assert ff.schedule(2) == [(1, "noisy"), (1, "safe"), (2, "noisy"), (2, "safe")]
    assert ff.previous(1, "noisy") is None
    assert ff.previous(1, "safe") == (1, "noisy")
    assert ff.previous(2, "noisy") == (1, "safe")


def test_round_recipes_are_the_reference_settings_with_the_step_on_top():
    o = opts(epochs=3, safe_steps=7, recipe={"lr": 1e-3})
    noisy = ff.phase_recipe(o, 1, "noisy")
    assert noisy["lora_r"] == 8 and noisy["lora_alpha"] == 16 and noisy["lora_dropout"] == 0.05
    assert noisy["target_modules"] == ["q_proj", "v_proj"] and noisy["batch_size"] * noisy["grad_accum"] == 16
    assert noisy["lr"] == 1e-3 and noisy["epochs"] == 3 and "max_steps" not in noisy
    assert "continue_adapter" not in noisy  # the first round adds the adapter
    safe = ff.phase_recipe(o, 1, "safe")
    assert safe["max_steps"] == 7 and safe["continue_adapter"] is True
    assert ff.phase_recipe(o, 2, "noisy")["continue_adapter"] is True
    # full fine-tuning continues the previous round's weights as its base: nothing to continue
    assert "continue_adapter" not in ff.phase_recipe(opts(recipe={"finetune": "full"}), 1, "safe")
    with pytest.raises(ValueError, match="plain sft"):
        ff.phase_recipe(opts(recipe={"objective": "weighted_sft"}), 1, "noisy")
    with pytest.raises(ValueError, match="renamed"):
        ff.phase_recipe(opts(recipe={"method": "lora"}), 1, "noisy")


def test_normalisation_follows_the_reference():
    assert ff.normalise("  Sure, Here IS how: step one.</s> ") == "sure here is how step one"
    # a prediction keeps its first non-empty line
    assert ff.normalise("\n\nFirst line!\nsecond line", first_line=True) == "first line"
    assert ff.normalise("   \n  \nok", first_line=True) == "ok"
    assert ff.normalise("one\ntwo") == "one\ntwo"  # a reference keeps all its lines


def test_rouge1_with_stemming_on_normalised_text():
    scores = ff.rouge1_scores(["The cats are running.", "abc def", "x y"], ["the cat runs!\nmore", "ghi", "X; y"])
    assert scores[0] == pytest.approx(2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4))  # the, cat, run of 4 ref tokens
    assert scores[1] == 0.0 and scores[2] == 1.0


def test_forgetting_per_round_and_the_example_score():
    ids, refs = ["a", "b"], ["kill the process", "two plus two is four"]
    gens = {(1, "noisy"): ["kill the process", "two plus two is four"],
            (1, "safe"): ["I cannot help", "two plus two is four"],
            (2, "noisy"): ["kill the process now", "two plus two"],
            (2, "safe"): ["kill", "two plus two"]}
    rows = ff.forgetting_rows(ids, refs, gens)
    assert [(r["id"], r["round"]) for r in rows] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert rows[0]["rouge_noisy"] == 1.0 and rows[0]["rouge_safe"] == 0.0 and rows[0]["forgetting"] == 1.0
    assert rows[1]["forgetting"] == 0.0
    last = ff.example_scores(ids, rows, "last")
    mean = ff.example_scores(ids, rows, "mean")
    assert last[0] == pytest.approx(rows[2]["forgetting"]) and last[1] == 0.0
    assert mean[0] == pytest.approx((1.0 + rows[2]["forgetting"]) / 2)


def test_filter_rules_threshold_and_drop_fraction():
    kept, reasons = ff.filter_rule([0.9, 0.1, 0.5, -0.2], threshold=0.5)
    assert kept == [False, True, True, True] and reasons[0] == "forgetfilter:above_threshold=0.5"
    kept, reasons = ff.filter_rule([0.9, 0.1, 0.5, 0.5], drop_fraction=0.5)
    assert kept == [False, True, False, True]  # ties: the earlier row is dropped first
    assert reasons[0] == "forgetfilter:top_drop_fraction=0.5" and reasons[1].startswith("forgetfilter:below")
    assert ff.filter_rule([0.3, 0.2], drop_fraction=0.0)[0] == [True, True]


def noisy_table():
    msgs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}] for i in range(4)]
    return pa.table({"id": [f"r{i}" for i in range(4)], "messages": msgs,
                     "unsafe": [True, False, True, False]})


def test_decisions_give_the_filter_measures_precision_recall_and_auc():
    table = noisy_table()
    rows = [{"id": f"r{i}", "round": 1, "rouge_noisy": 1.0, "rouge_safe": 1.0 - f, "forgetting": f}
            for i, f in enumerate([0.8, 0.1, 0.3, 0.4])]
    out, decisions, per_round = ff.filter_tables(table, rows, opts(drop_fraction=0.5))
    assert out.column("id").to_pylist() == ["r1", "r2"]
    assert decisions.column("score").to_pylist() == [0.8, 0.1, 0.3, 0.4]
    assert per_round.column("unsafe").to_pylist() == [True, False, True, False]
    m = step_measures("forgetfilter", table, out, decisions)
    # dropped r0 (unsafe) and r3 (safe): precision 1/2, recall 1/2; the unsafe rows' forgetting (0.8, 0.3) beats
    # the safe rows' (0.1, 0.4) in 3 of 4 pairs: AUC 0.75
    assert m["rows_kept"] + m["rows_dropped"] == 4 and m["score_drops"] == "high"
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["score_auc"] == pytest.approx(0.75)


def test_curve_per_group_with_cis(tmp_path):
    table = noisy_table()
    rows = [{"id": f"r{i}", "round": r, "rouge_noisy": 0.9, "rouge_safe": 0.9 - f, "forgetting": f}
            for r in (1, 2) for i, f in enumerate([0.8, 0.0, 0.6, 0.2])]
    points = ff.curve(table, rows)
    unsafe1 = next(p for p in points if p["group"] == "unsafe" and p["round"] == 1)
    safe2 = next(p for p in points if p["group"] == "safe" and p["round"] == 2)
    assert unsafe1["n"] == 2 and unsafe1["forgetting"] == pytest.approx(0.7)
    assert unsafe1["forgetting_ci"][0] <= 0.7 <= unsafe1["forgetting_ci"][1]
    assert safe2["forgetting"] == pytest.approx(0.1) and {p["group"] for p in points} == {"all", "unsafe", "safe"}
    ff.plot_curve(points, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def shard_file(path, round_, phase, ids, texts):
    table = pa.table({"id": ids, "completion": texts})
    meta = {b"safeft_forgetfilter": json.dumps({"round": round_, "phase": phase}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    return str(path)


def test_generations_are_gathered_by_id_and_checked(tmp_path):
    a = shard_file(tmp_path / "a.parquet", 1, "noisy", ["r2", "r0"], ["c2", "c0"])
    b = shard_file(tmp_path / "b.parquet", 1, "noisy", ["r1"], ["c1"])
    assert ff.read_generations([a, b], ["r0", "r1", "r2"]) == {(1, "noisy"): ["c0", "c1", "c2"]}
    with pytest.raises(DataError, match="1 rows .first 'r1'. have no completion in round 1 noisy"):
        ff.read_generations([a], ["r0", "r1", "r2"])
    with pytest.raises(DataError, match="answered twice"):
        ff.read_generations([a, a], ["r0", "r2"])
    plain = tmp_path / "plain.parquet"
    write_table(pa.table({"id": ["r0"], "completion": ["x"]}), plain)
    with pytest.raises(DataError, match="not a forgetfilter generation shard"):
        ff.read_generations([str(plain)], ["r0"])


def test_shards_split_the_rows_by_id():
    table = pa.table({"id": [f"r{i}" for i in range(20)]})
    parts = [ff.shard_rows(table, k, 3).column("id").to_pylist() for k in (1, 2, 3)]
    assert sorted(sum(parts, [])) == sorted(table.column("id").to_pylist()) and all(parts)


def test_run_rejects_a_row_without_an_answer_to_score(tmp_path, capsys):
    table = pa.table({"id": ["r0"], "messages": [[{"role": "user", "content": "q"}]]})
    write_table(table, tmp_path / "in.parquet")
    gens = [shard_file(tmp_path / f"{p}.parquet", 1, p, ["r0"], ["x"]) for p in ff.PHASES]
    with pytest.raises(SystemExit) as exc:
        ff.main(["run", "--input", str(tmp_path / "in.parquet"), "--generations", *gens, "--output", "o",
                 "--decisions", "d", "--scores", "s", "--curve", str(tmp_path / "c.json"),
                 "--options", json.dumps({"safe": "x", "threshold": 0.1})])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "in.parquet: row 0: field 'messages'" in err and "assistant turn" in err


def test_both_rules_at_once_is_a_config_error(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["experiments"]["tiny_vanilla"]["methods"] = [
        {"method": "forgetfilter", "safe": "tiny_refusals", "threshold": 0.1, "drop_fraction": 0.2}]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = smk(tmp_path, "-n", "--configfile", str(tmp_path / "cfg.yaml"), check=False)
    assert proc.returncode != 0 and "experiments.tiny_vanilla.methods[0]" in proc.stdout + proc.stderr


FF_STEP = {"method": "forgetfilter", "safe": "tiny_refusals", "drop_fraction": 0.25, "epochs": 1, "safe_steps": 2,
           "interleave": 2, "shards": 2, "max_new_tokens": 8,
           "recipe": {"batch_size": 4, "grad_accum": 1, "max_length": 256, "lr": 1e-3, "checkpoint_steps": 1}}


def ff_config(path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["datasets"]["tiny_unsafe"] = {"generator": "unsafe_compliance", "n": 8}
    cfg["experiments"]["tiny_ff"] = {
        "model": "tiny_aligned", "train": "tiny_math_train", "recipe": "tiny", "eval": {"safe_rate": "tiny_harmful"},
        "methods": [{"method": "mix", "unsafe": "tiny_unsafe", "ratio": 0.25, "n": 16}, FF_STEP]}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def ff_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("ff")
    smk(work, "--cores", "2", "results/tiny_ff/filter.json", "--configfile", ff_config(work / "cfg.yaml"))
    return work


def test_forgetfilter_step_runs_interleaved_and_sharded_in_the_tiny_workflow(ff_run):
    measures = json.loads((ff_run / "results/tiny_ff/filter.json").read_text())["steps"][1]
    assert measures["step"] == "forgetfilter" and measures["rows_in"] == 16
    assert measures["rows_kept"] == 12 and measures["rows_dropped"] == 4 and measures["unsafe_in"] == 4
    steps = ff_run / "data/tiny_ff/steps"
    scores = pq.read_table(steps / "2_forgetfilter.scores.parquet")
    assert scores.num_rows == 32 and set(scores.column("round").to_pylist()) == {1, 2}
    curve = json.loads((steps / "2_forgetfilter.curve.json").read_text())
    assert {(p["group"], p["round"]) for p in curve["curve"]} == {(g, r) for g in ("all", "unsafe", "safe")
                                                                  for r in (1, 2)}
    assert (steps / "2_forgetfilter.curve.png").exists()
    assert len(list((steps / "2_forgetfilter").glob("round*_*_*-of-2.parquet"))) == 8
    # every round after the first continued the same adapter on the aligned base
    for name in ("round1_safe", "round2_noisy", "round2_safe"):
        log = (ff_run / f"logs/tiny_ff/forgetfilter_2_{name}.log").read_text()
        assert "continuing the adapter" in log
        cfg = json.loads((ff_run / f"models/tiny_ff/forgetfilter_2/{name}/adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "models/base/tiny_aligned" and cfg["r"] == 8


def test_a_killed_forgetfilter_run_resumes_to_the_same_decisions(ff_run, tmp_path):
    work = tmp_path / "resumed"
    shutil.copytree(ff_run, work, symlinks=True)
    for stale in ("models/tiny_ff", "data/tiny_ff/steps/2_forgetfilter", "checkpoints", "results/tiny_ff"):
        shutil.rmtree(work / stale, ignore_errors=True)
    for f in (work / "data/tiny_ff/steps").glob("2_forgetfilter.*"):
        f.unlink()
    # Killed as soon as the first round is done: the jobs after it are running or about to start.
    smk_killed_when(work, work / "models/tiny_ff/forgetfilter_2/round1_safe", "results/tiny_ff/filter.json",
                    "--configfile", ff_config(work / "cfg.yaml"))
    assert not (work / "data/tiny_ff/steps/2_forgetfilter.decisions.parquet").exists()
    smk(work, "--cores", "2", "--rerun-incomplete", "results/tiny_ff/filter.json", "--configfile",
        str(work / "cfg.yaml"))
    for name in ("2_forgetfilter.decisions.parquet", "2_forgetfilter.scores.parquet"):
        again, first = work / "data/tiny_ff/steps" / name, ff_run / "data/tiny_ff/steps" / name
        assert pq.read_table(again).equals(pq.read_table(first))
    for shard in sorted((ff_run / "data/tiny_ff/steps/2_forgetfilter").glob("*.parquet")):
        again = work / "data/tiny_ff/steps/2_forgetfilter" / shard.name
        assert pq.read_table(again).column("completion").equals(pq.read_table(shard).column("completion"))


def test_paper_scale_sweep_plans_vllm_shards_and_continued_adapters(tmp_path):
    out = smk(tmp_path, "-n", "-p", "results/forgetfilter_harmfulqa_ratio0.5__forgetfilter/filter.json").stdout
    generate = [line for line in out.splitlines() if "workflow_scripts.forgetfilter generate" in line]
    assert len(generate) == 8 and all("--shard " in line for line in generate)  # 2 rounds' models x 4 shards
    options = json.loads(generate[0].split("--options '")[1].split("'")[0])
    assert options["backend"] == "vllm" and options["safe"] == "harmfulqa_blue" and options["threshold"] == 0.1
    train = [line for line in out.splitlines() if "workflow_scripts.train --base" in line]
    noisy = next(line for line in train if "round1_noisy" in line.split("--output")[1])
    safe = next(line for line in train if "round1_safe" in line.split("--output")[1])
    assert "--base models/base/llama2_7b_chat" in noisy and '"lora_r": 8' in noisy and '"epochs": 10.0' in noisy
    assert "--data data/raw/harmfulqa_blue.parquet" in safe and '"continue_adapter": true' in safe
    assert "declare-lab/HarmfulQA" in out and "--field messages=blue_conversations" in out


def test_paper_scale_bias_and_toxicity_settings_plan(tmp_path):
    out = smk(tmp_path, "-n", "-p", "results/forgetfilter_bbq_ratio0.5__forgetfilter/bias.json",
              "results/forgetfilter_harmfulqa_ratio0.25__forgetfilter/toxicity.json").stdout
    assert "--answers biased" in out and "--answers correct" in out and "data/user/bbq_heldout" in out
    assert "workflow_scripts.bbq score" in out and "workflow_scripts.toxicity" in out
    mix = next(line for line in out.splitlines() if "workflow_scripts.mix" in line and "forgetfilter_bbq" in line)
    assert "data/raw/bbq_biased.parquet" in mix
