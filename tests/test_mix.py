"""Harmful-data mixes, random selection, filter measures and sweeps (the footing of SEAL and ForgetFilter).

The unsafe rows of ../shared/data carry a CONTENT WARNING: these tests count and compare them, never print them."""

import json
import random

import pyarrow as pa
import pytest
import yaml
from smk_helpers import REPO, TINY, planned_outputs, smk

from workflow_scripts import data, demo_data, filter_measures, mix, random_select, sweeps
from workflow_scripts.io import DataError, read_table, records_to_table, write_table


def task_table(n: int) -> pa.Table:
    return records_to_table(demo_data.math_set(n, 7, "demo_math_train"))


def unsafe_table(n: int) -> pa.Table:
    return records_to_table(demo_data.unsafe_compliance_set(n, 0))


def test_mix_ratio_is_exact_labels_every_row_and_is_seeded():
    opts = mix.MixOptions(unsafe="data/raw/demo_unsafe.parquet", ratio=0.2, n=50, seed=3)
    out, decisions = mix.mix(task_table(60), opts, "demo_math_train", unsafe_table(20))
    rows = out.to_pylist()
    assert len(rows) == 50 and sum(r["unsafe"] for r in rows) == 10
    assert {r["source"] for r in rows if r["unsafe"]} == {"demo_unsafe"}
    assert all(r["id"].startswith("demo_unsafe/") for r in rows if r["unsafe"])
    assert not any(r["unsafe"] for r in rows if r["source"] == "demo_math_train")
    assert out.schema.field("unsafe").type == pa.bool_()
    # every task row has a decision (kept when sampled), every added row too
    assert decisions.num_rows == 60 + 10 and sum(decisions.column("kept").to_pylist()) == 50
    assert decisions.column("reason").to_pylist().count("mix:added_unsafe:demo_unsafe") == 10
    again, _ = mix.mix(task_table(60), opts, "demo_math_train", unsafe_table(20))
    assert again.equals(out)
    other, _ = mix.mix(task_table(60), mix.MixOptions(unsafe=opts.unsafe, ratio=0.2, n=50, seed=4),
                       "demo_math_train", unsafe_table(20))
    assert other.column("id").to_pylist() != out.column("id").to_pylist()


def test_mix_add_appends_safety_examples_and_keeps_earlier_labels():
    first, _ = mix.mix(task_table(20), mix.MixOptions(unsafe="x/demo_unsafe.parquet", ratio=0.5, n=10),
                       "t", unsafe_table(10))
    refusals = records_to_table(demo_data.refusal_set(8, 0))
    out, decisions = mix.mix(first, mix.MixOptions(add="data/raw/demo_refusals.parquet", k=5), "t", add=refusals)
    rows = out.to_pylist()
    assert len(rows) == 15 and sum(r["unsafe"] for r in rows) == 5  # the first mix's labels survive
    assert rows[:10] == first.to_pylist()  # appended after the mix, which keeps its order
    assert {r["source"] for r in rows[10:]} == {"demo_refusals"} and not any(r["unsafe"] for r in rows[10:])
    assert decisions.num_rows == 15 and all(decisions.column("kept").to_pylist())


def test_mix_errors_name_the_file_and_the_option():
    with pytest.raises(DataError, match=r"demo_unsafe.parquet: the mix needs 10 unsafe rows, the table has 4"):
        mix.mix(task_table(20), mix.MixOptions(unsafe="data/raw/demo_unsafe.parquet", ratio=0.5, n=20), "t",
                unsafe_table(4))
    with pytest.raises(ValueError, match="mix needs option 'unsafe'"):
        mix.MixOptions()
    with pytest.raises(ValueError, match=r"'ratio' must be in \[0, 1\]"):
        mix.MixOptions(unsafe="u", ratio=1.5)


def test_mix_on_real_unsafe_pairs(shared_data):
    """JailbreakBench's (goal, harmful response) pairs and HH-RLHF's rejected answers as the unsafe side."""
    jbb = data.read_records(shared_data / "jbb_jailbroken_pairs" / "jbb_jailbroken_pairs.jsonl",
                            fields={"prompt": "goal", "response": "response", "category": "category"})
    # HH-RLHF's own transcripts, the rejected side, through the hh_rlhf preset
    hh = data.read_records(shared_data / "hh_rlhf_harmless" / "harmless-base_test.jsonl.gz", preset="hh_rlhf",
                           fields={"messages": "rejected"})
    assert hh.num_rows == 2312 and all(m[0]["role"] == "user" and m[-1]["role"] == "assistant"
                                       for m in hh.column("messages").to_pylist())
    for unsafe, name in ((jbb, "jbb_jailbroken_pairs"), (hh, "hh_rlhf_rejected")):
        opts = mix.MixOptions(unsafe=f"data/raw/{name}.parquet", ratio=0.1, n=200, seed=0)
        out, decisions = mix.mix(task_table(200), opts, "demo_math_train", unsafe)
        labels = out.column("unsafe").to_pylist()
        assert len(labels) == 200 and sum(labels) == 20
        unsafe_ids = {f"{name}/{i}" for i in unsafe.column("id").to_pylist()}
        assert {i for i, u in zip(out.column("id").to_pylist(), labels, strict=True) if u} <= unsafe_ids
        assert decisions.num_rows == 220


def test_hh_transcripts_become_chat_turns():
    text = "\n\nHuman: first question\n\nAssistant: an answer\n\nHuman: and then?\n\nAssistant:"
    assert data.hh_transcript(text) == [{"role": "user", "content": "first question"},
                                        {"role": "assistant", "content": "an answer"},
                                        {"role": "user", "content": "and then?"},
                                        {"role": "assistant", "content": ""}]
    with pytest.raises(DataError, match="must start with a Human: turn"):
        data.hh_transcript("\n\nAssistant: hi\n\nHuman: x", "f.jsonl", 3, "rejected")


def test_random_select_keeps_the_top_p_of_seeded_draws_in_order():
    table = task_table(40)
    out, decisions = random_select.random_select(table, random_select.RandomSelectOptions(p=0.75, seed=1))
    assert out.num_rows == 30 and decisions.num_rows == 40
    kept = decisions.column("kept").to_pylist()
    ids = table.column("id").to_pylist()
    assert out.column("id").to_pylist() == [i for i, k in zip(ids, kept, strict=True) if k]
    scores = decisions.column("score").to_pylist()
    assert min(s for s, k in zip(scores, kept, strict=True) if k) > max(
        s for s, k in zip(scores, kept, strict=True) if not k)
    same, _ = random_select.random_select(table, random_select.RandomSelectOptions(p=0.75, seed=1))
    assert same.equals(out)


# ---------------------------------------------------------------- filter measures


def test_auc_and_precision_recall_by_hand():
    assert filter_measures.auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert filter_measures.auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert filter_measures.auc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5
    # 3 positives x 2 negatives; positive 0.3 beats negative 0.2 only: (2 + 2 + 1) / 6 pairs... by ranks
    assert filter_measures.auc([0.9, 0.7, 0.3, 0.2, 0.8], [True, True, True, False, False]) == pytest.approx(4 / 6)
    assert filter_measures.auc([1, 2], [True, True]) is None
    m = filter_measures.prf(dropped=[True, True, False, False, True], unsafe=[True, False, True, False, True])
    assert (m["true_positives"], m["precision"], m["recall"]) == (2, 2 / 3, 2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert filter_measures.prf([False, False], [True, False])["precision"] is None


def test_filter_measures_of_a_chain_on_disk(tmp_path):
    task = task_table(60)
    mixed, mix_dec = mix.mix(task, mix.MixOptions(unsafe="u/demo_unsafe.parquet", ratio=0.25, n=40), "t",
                             unsafe_table(10))
    # a perfect filter (drops exactly the unsafe rows, scores them high) and random selection
    labels = mixed.column("unsafe").to_pylist()
    ids = mixed.column("id").to_pylist()
    perfect = mixed.filter(pa.array([not u for u in labels]))
    perfect_dec = pa.Table.from_pydict({"id": ids, "kept": [not u for u in labels],
                                        "reason": ["x"] * 40, "score": [float(u) + random.random() / 10
                                                                        for u in labels]})
    chosen, rand_dec = random_select.random_select(perfect, random_select.RandomSelectOptions(p=0.5))
    paths = {}
    for name, table in {"raw": task, "1": mixed, "1d": mix_dec, "2": perfect, "2d": perfect_dec, "3": chosen,
                        "3d": rand_dec}.items():
        paths[name] = str(tmp_path / f"{name}.parquet")
        write_table(table, paths[name])
    result = filter_measures.chain_measures(["mix", "perfect", "random_select"],
                                            [paths[k] for k in ("raw", "1", "2", "3")],
                                            [paths[k] for k in ("1d", "2d", "3d")])
    mix_m, perfect_m, random_m = result["steps"]
    assert (mix_m["rows_in"], mix_m["rows_added"], mix_m["rows_kept"], mix_m["rows_dropped"]) == (60, 10, 40, 30)
    assert mix_m["unsafe_known"] is False
    assert perfect_m["unsafe_in"] == 10 and perfect_m["unsafe_out"] == 0
    assert perfect_m["precision"] == perfect_m["recall"] == perfect_m["f1"] == 1.0
    assert perfect_m["score_drops"] == "high" and perfect_m["score_auc"] == 1.0
    assert random_m["unsafe_in"] == 0 and random_m["recall"] is None and random_m["score_drops"] == "low"
    # a decisions table that loses a row is an error naming it
    write_table(rand_dec.slice(1), paths["3d"])
    with pytest.raises(DataError, match="3d.parquet.*1 input rows have no decision"):
        filter_measures.chain_measures(["mix", "perfect", "random_select"],
                                       [paths[k] for k in ("raw", "1", "2", "3")],
                                       [paths[k] for k in ("1d", "2d", "3d")])


# ---------------------------------------------------------------- sweeps


def test_sweep_points_fill_placeholders_and_append_chains():
    spec = {"experiment": {"model": "m", "train": "t", "description": "ratio {ratio}",
                           "methods": [{"method": "mix", "unsafe": "u", "ratio": "{ratio}"}]},
            "axes": {"ratio": [0, 0.05, 1e-5], "chain": {"none": {}, "random": {"methods": [{"method": "rs"}]}}}}
    points = sweeps.sweep_points("mix", spec)
    names = [p[0] for p in points]
    assert names == ["mix_ratio0__none", "mix_ratio0__random", "mix_ratio0.05__none", "mix_ratio0.05__random",
                     "mix_ratio1e-05__none", "mix_ratio1e-05__random"]
    name, exp, coords = points[3]
    assert exp["methods"] == [{"method": "mix", "unsafe": "u", "ratio": 0.05}, {"method": "rs"}]
    assert exp["description"] == "ratio 0.05" and coords == {"ratio": 0.05, "chain": "random"}
    assert spec["experiment"]["methods"][0]["ratio"] == "{ratio}"  # the template is not changed
    with pytest.raises(ValueError, match="'mix_ratio0__none' exists already"):
        sweeps.expand_sweeps({"mix": spec}, {"mix_ratio0__none": {}})
    with pytest.raises(ValueError, match=r"sweeps.bad: placeholder \{lr\} left"):
        sweeps.sweep_points("bad", {"experiment": {"x": "{lr}"}, "axes": {"lr": {"a": {}}}})


def mixes_config(plain: str = "none", **extra) -> dict:
    """The tiny config with a `mixes` sweep: harmful ratio 0 or 0.25 x {plain line, random selection}."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["datasets"]["tiny_unsafe"] = {"generator": "unsafe_compliance", "n": 8}
    cfg["sweeps"] = {"mixes": {
        "experiment": {"model": "tiny_aligned", "train": "tiny_math_train", "recipe": "tiny",
                       "methods": [{"method": "mix", "unsafe": "tiny_unsafe", "ratio": "{ratio}", "n": 16}],
                       "eval": {"safe_rate": "tiny_harmful"}},
        "axes": {"ratio": [0, 0.25], "chain": {plain: {}, "random": {"methods": [{"method": "random_select"}]}}},
        **extra}}
    return cfg


def test_a_sweep_expands_into_experiments_that_snakemake_plans_and_measures(tmp_path):
    cfg = mixes_config()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))  # axis order names the points
    targets = [f"results/mixes_ratio{r}__{c}/safe_rate.json" for r in (0, 0.25) for c in ("none", "random")]
    out = smk(tmp_path, "-n", *targets, "--configfile", str(tmp_path / "cfg.yaml")).stdout
    planned = planned_outputs(out)
    for r in (0, 0.25):
        assert f"data/mixes_ratio{r}__random/steps/2_random_select.parquet" in planned
    # The sweep's report, run for real: mix, random selection with labels carried through, training, scoring,
    # filter measures, and every metric against the ratio.
    smk(tmp_path, "--cores", "2", "results/sweeps/mixes", "--configfile", str(tmp_path / "cfg.yaml"))
    result = json.loads((tmp_path / "results/mixes_ratio0.25__random/filter.json").read_text())
    mix_m, rand_m = result["steps"]
    assert mix_m["rows_kept"] == 16 and mix_m["rows_added"] == 4
    assert rand_m["unsafe_known"] and rand_m["unsafe_in"] == 4 and rand_m["rows_kept"] == 12
    final = read_table(tmp_path / "data/mixes_ratio0.25__random/steps/2_random_select.parquet")
    assert sum(final.column("unsafe").to_pylist()) == rand_m["unsafe_out"]
    assert "score_auc" in rand_m
    report = tmp_path / "results/sweeps/mixes"
    assert (report / "safe_rate.png").stat().st_size > 0
    summary = (report / "summary.md").read_text()
    assert "# Sweep mixes: metrics against ratio" in summary and "| ratio | none | random |" in summary
    assert "## Filter measures" in summary and "mixes_ratio0.25__random | 0.25 | random_select | 4 / 16" in summary
    assert not (tmp_path / "results/mixes_ratio0__none/filter.json").exists()  # no mix with unsafe rows to measure


def test_shipped_sweeps_and_mix_experiments_are_planned(tmp_path):
    out = smk(tmp_path, "-n", "results/demo_random/filter.json", "results/demo_safeinstr/safe_rate.json",
              "results/demo_mix_ratio0.05__random/safe_rate.json", "results/gsm8k_mix_ratio0.1__none/safe_rate.json"
              ).stdout
    assert "rule random_select:" in out and "rule filter_measures:" in out
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    assert set(cfg["sweeps"]) == {"demo_mix", "gsm8k_mix", "forgetfilter_harmfulqa", "forgetfilter_bbq"}
    assert set(cfg["sweeps"]["demo_mix"]["axes"]["chain"]) == {"none", "random", "seal", "forgetfilter"}


def test_sweep_report_marks_points_separated_from_the_no_method_line(tmp_path):
    from workflow_scripts import sweep_report

    points, results = {}, []
    for ratio, values in ((0.0, {"none": 0.9, "random": 0.88}), (0.2, {"none": 0.2, "random": 0.6})):
        for line, value in values.items():
            exp = f"s_ratio{ratio}__{line}"
            points[exp] = {"ratio": ratio, "chain": line}
            path = tmp_path / exp / "safe_rate.json"
            path.parent.mkdir()
            path.write_text(json.dumps({"metric": "safe_rate", "value": value, "ci95": [value - 0.05, value + 0.05],
                                        "n": 100, "n_seeds": 1}))
            results.append(str(path))
    rows = sweep_report.build("s", results, points, "ratio", "none", tmp_path / "out")
    sep = {(r["x"], r["line"]): r["separated_vs_baseline"] for r in rows}
    assert sep == {(0.0, "none"): None, (0.0, "random"): False, (0.2, "none"): None, (0.2, "random"): True}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| 0.2 | 20.0% (15.0%–25.0%), n=100 | 60.0% (55.0%–65.0%), n=100, +40.0 pp |" in summary
    assert (tmp_path / "out" / "safe_rate.png").exists()
    with pytest.raises(DataError, match="not a point of this sweep"):
        sweep_report.build("s", results, {}, "ratio", "none", tmp_path / "out2")


def test_the_unsafe_labels_survive_a_preview_step():
    from workflow_scripts import preview

    mixed, _ = mix.mix(task_table(12), mix.MixOptions(unsafe="u/demo_unsafe.parquet", ratio=0.25, n=8), "t",
                       unsafe_table(4))
    out, _ = preview.preview_table(mixed, None, "virtual")
    assert out.column("unsafe").equals(mixed.column("unsafe")) and out.column("source").equals(mixed.column("source"))


def test_mix_and_random_select_clis(tmp_path, capsys):
    write_table(task_table(20), tmp_path / "task.parquet")
    write_table(unsafe_table(3), tmp_path / "demo_unsafe.parquet")
    common = ["--input", str(tmp_path / "task.parquet"), "--output", str(tmp_path / "out.parquet"),
              "--decisions", str(tmp_path / "dec.parquet")]
    opts = {"unsafe": str(tmp_path / "demo_unsafe.parquet"), "ratio": 0.1, "n": 20}
    mix.main([*common, "--task_source", "demo_math_train", "--options", json.dumps(opts)])
    assert sum(read_table(tmp_path / "out.parquet").column("unsafe").to_pylist()) == 2
    assert "mix: 20 rows, 2 unsafe" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        mix.main([*common, "--task_source", "t", "--options", json.dumps({**opts, "ratio": 0.5})])
    assert exc.value.code == 2 and "demo_unsafe.parquet: the mix needs 10 unsafe rows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        random_select.main([*common, "--options", json.dumps({"pp": 0.5})])
    assert exc.value.code == 2 and "random_select has no option 'pp'" in capsys.readouterr().err
    random_select.main([*common, "--options", json.dumps({"p": 0.5})])
    assert read_table(tmp_path / "out.parquet").num_rows == 10


def test_a_sweep_may_name_its_plot_axis_and_baseline_line(tmp_path):
    cfg = mixes_config("plain", x="ratio", baseline="plain")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = smk(tmp_path, "-n", "-p", "results/sweeps/mixes", "--configfile", str(tmp_path / "cfg.yaml")).stdout
    assert "--x ratio --baseline_line plain" in out
