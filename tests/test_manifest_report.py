"""Tests for the run manifest and the report layer: summary rows, CI separation, Markdown/HTML text, plots, the
terminal table, and a real `snakemake --report` HTML file from a tiny finished run."""

import json
import math
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from smk_helpers import smk

from workflow_scripts import manifest, report
from workflow_scripts.io import DataError

REPO = Path(__file__).resolve().parents[1]


def write_result(path, value, ci, n=100, metric="safe_rate", per_seed=None, unit=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    per_seed = per_seed or {"0": value}
    vals = list(per_seed.values())
    sd = (sum((v - sum(vals) / len(vals)) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    path.write_text(json.dumps({"metric": metric, "name": path.stem, "value": value, "ci95": ci, "n": n,
                                "n_seeds": len(per_seed), "per_seed": per_seed, "seed_sd": sd,
                                "unit": unit or ("percent" if metric == "rouge1" else "fraction")}))
    return str(path)


@pytest.fixture
def results(tmp_path):
    """A baseline, a one-seed fine-tune far below it, and two 2-seed methods whose CIs overlap each other."""
    r = tmp_path / "results"
    return [
        write_result(r / "base/safe_rate.json", 0.90, [0.85, 0.95]),
        write_result(r / "base/utility.json", 0.50, [0.40, 0.60], metric="gsm8k"),
        write_result(r / "vanilla/safe_rate.json", 0.40, [0.30, 0.50]),
        write_result(r / "vanilla/utility.json", 0.55, [0.45, 0.65], metric="gsm8k"),
        write_result(r / "real6/safe_rate.json", 0.60, [0.52, 0.68], n=200, per_seed={"0": 0.55, "1": 0.65}),
        write_result(r / "real6/utility.json", 0.52, [0.44, 0.60], n=200, metric="gsm8k",
                     per_seed={"0": 0.50, "1": 0.54}),
        write_result(r / "virtual/safe_rate.json", 0.66, [0.58, 0.74], n=200, per_seed={"0": 0.64, "1": 0.68}),
        write_result(r / "virtual/utility.json", 0.53, [0.45, 0.61], n=200, metric="gsm8k",
                     per_seed={"0": 0.52, "1": 0.54}),
    ]


EXPS = ["base", "vanilla", "real6", "virtual"]


def by_key(rows):
    return {(r["experiment"], r["metric"]): r for r in rows}


def test_summary_rows_fields_order_and_deltas(results):
    rows = report.summary_rows(results[::-1], EXPS, "base")
    assert [(r["experiment"], r["metric"]) for r in rows][:4] == [
        ("base", "utility"), ("base", "safe_rate"), ("vanilla", "utility"), ("vanilla", "safe_rate")]
    got = by_key(rows)
    real = got[("real6", "safe_rate")]
    assert real["n_seeds"] == 2 and real["n"] == 200 and real["scorer"] == "safe_rate"
    assert real["per_seed"] == [{"seed": "0", "value": 0.55}, {"seed": "1", "value": 0.65}]
    assert math.isclose(real["delta_vs_baseline"], -0.30) and real["separated_vs_baseline"] is True
    assert real["note"] is None and "one seed" in got[("vanilla", "safe_rate")]["note"]
    assert got[("base", "safe_rate")]["is_baseline"] and got[("base", "safe_rate")]["delta_vs_baseline"] is None
    # utility: every CI overlaps the baseline's
    assert got[("vanilla", "utility")]["separated_vs_baseline"] is False
    table = report.to_table(rows)
    assert table.num_rows == 8 and table.schema == report.ROW_SCHEMA


def test_separation_edge_cases():
    def row(lo, hi):
        return {"ci_low": lo, "ci_high": hi}

    assert report.separated(row(0.1, 0.2), row(0.3, 0.4)) and report.separated(row(0.3, 0.4), row(0.1, 0.2))
    assert not report.separated(row(0.1, 0.3), row(0.3, 0.4))  # touching intervals overlap
    assert not report.separated(row(0.1, 0.35), row(0.3, 0.4))
    assert not report.separated(row(0.2, 0.2), row(0.2, 0.2))  # identical zero-width CIs (e.g. 100% vs 100%)
    assert not report.separated(row(float("nan"), 0.2), row(0.5, 0.6))
    assert not report.separated(row(None, None), row(0.5, 0.6))


def test_missing_baseline_and_no_baseline(results):
    no_base_metric = [p for p in results if not p.endswith("base/utility.json")]
    rows = report.summary_rows(no_base_metric, EXPS, "base")
    got = by_key(rows)
    assert got[("vanilla", "utility")]["delta_vs_baseline"] is None
    assert got[("vanilla", "utility")]["separated_vs_baseline"] is None
    assert got[("vanilla", "safe_rate")]["separated_vs_baseline"] is True
    text = report.markdown(rows, EXPS, "base")
    assert "The baseline `base` has no result for utility: no deltas there." in text
    rows = report.summary_rows(results, EXPS, None)
    assert all(r["delta_vs_baseline"] is None and not r["is_baseline"] for r in rows)
    text = report.markdown(rows, EXPS, None)
    assert "No baseline is set" in text and "base vs vanilla" in text  # with no baseline every pair is compared


def test_markdown_marks_not_separated_single_runs_and_pairs(results):
    rows = report.summary_rows(results, EXPS, "base")
    text = report.markdown(rows, EXPS, "base", {"real6": "LookAhead real, m=6"})
    assert "| base (reference) | 1 (single run) | 90.0% (85.0%–95.0%), n=100 | 50.0% (40.0%–60.0%), n=100 |" in text
    assert ("| vanilla | 1 (single run) | 40.0% (30.0%–50.0%), n=100, −50.0 pp | "
            "55.0% (45.0%–65.0%), n=100, +5.0 pp † |") in text
    assert "| real6: LookAhead real, m=6 | 2 | 60.0% (52.0%–68.0%), n=200, −30.0 pp | " in text
    assert "† = **not separated**" in text
    assert "Single run (one seed): base, vanilla." in text
    # pairwise: vanilla vs real6 and vanilla vs virtual separate on safe_rate; real6 vs virtual do not
    assert "| vanilla vs real6 | +20.0 pp | yes |" in text
    assert "| real6 vs virtual | +6.0 pp | no † (CIs overlap) |" in text
    assert "Separated pairs: vanilla vs real6, vanilla vs virtual." in text
    assert "No pair is separated on utility" in text
    assert "| real6 | safe_rate | seed 0: 55.0%, seed 1: 65.0% | 7.1 pp |" in text
    short = report.markdown(rows, EXPS, "base", full=False)
    assert "Pairwise" not in short and "† = **not separated**" in short
    page = report.to_html(report.blocks(rows, EXPS, "base"))
    assert page.startswith("<!DOCTYPE html>") and "<strong>not separated</strong>" in page
    assert "<td>vanilla vs real6</td>" in page and "<link" not in page and "<script" not in page


def test_rouge_percent_unit_and_missing_cell(tmp_path):
    r = tmp_path / "results"
    paths = [write_result(r / "a/rouge.json", 41.5, [39.0, 44.0], metric="rouge1"),
             write_result(r / "b/rouge.json", 44.5, [43.9, 46.0], metric="rouge1"),
             write_result(r / "b/safe_rate.json", 0.5, [0.4, 0.6])]
    rows = report.summary_rows(paths, ["a", "b"], "a")
    text = report.markdown(rows, ["a", "b"], "a")
    assert "44.5% (43.9%–46.0%), n=100, +3.0 pp †" in text
    assert "| a (reference) | 1 (single run) | 41.5% (39.0%–44.0%), n=100 | - |" in text


def test_bad_input_names_file_and_field(tmp_path):
    p = tmp_path / "results/x/safe_rate.json"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"value": 0.5, "n": 3, "n_seeds": 1}))
    with pytest.raises(DataError, match=r"x/safe_rate.json: field 'ci95': missing"):
        report.collect([str(p)])
    good = write_result(tmp_path / "results/y/safe_rate.json", 0.5, [0.4, 0.6])
    with pytest.raises(DataError, match="not in the report's experiments"):
        report.summary_rows([good], ["other"], None)
    with pytest.raises(SystemExit, match="field 'ci95'"):
        report.main(["--results", str(p), "--experiments", "x", "--parquet", str(tmp_path / "s.parquet"),
                     "--markdown", str(tmp_path / "s.md")])
    assert not (tmp_path / "s.parquet").exists()


def test_cli_writes_everything_and_prints(results, tmp_path, capsys):
    out = tmp_path / "report"
    report.main(["--results", *results, str(Path(results[0]).parent / "manifest.json"), "--experiments", *EXPS,
                 "--baseline", "base", "--notes_json", '{"vanilla": "plain fine-tune"}',
                 "--parquet", str(out / "summary.parquet"), "--markdown", str(out / "summary.md"),
                 "--report_md", str(out / "report.md"), "--html", str(out / "summary.html"),
                 "--scatter", str(out / "safety_vs_utility.png"), "--bars_dir", str(out / "bars")])
    assert "| vanilla: plain fine-tune | 1 (single run) |" in (out / "summary.md").read_text()
    assert "## Pairwise separation" in (out / "report.md").read_text()
    for png in ("safety_vs_utility.png", "bars/safe_rate.png", "bars/utility.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    assert not list(out.rglob(".*"))  # no temporary files left behind
    rows = pq.read_table(out / "summary.parquet").to_pylist()
    assert len(rows) == 8 and {r["experiment"] for r in rows} == set(EXPS)
    capsys.readouterr()
    report.main(["print", str(out / "summary.parquet")])
    printed = capsys.readouterr().out
    assert "SafeFT summary" in printed and "base (ref)" in printed and "Δ+5.0 pp †" in printed
    assert "Δ−30.0 pp" in printed and "not separated" in printed
    # a result newer than the summary: a warning instead of a stale table
    later = os.path.getmtime(out / "summary.parquet") + 10
    os.utime(results[2], (later, later))
    assert not report.print_summary(out / "summary.parquet", inputs=results)
    assert "is older than" in capsys.readouterr().out


def test_scatter_needs_both_metrics(tmp_path):
    paths = [write_result(tmp_path / "results/a/safe_rate.json", 0.5, [0.4, 0.6])]
    rows = report.summary_rows(paths, ["a"], None)
    with pytest.raises(ValueError, match="no experiment has both 'safe_rate' and 'utility'"):
        report.plot_scatter(rows, ["a"], "safe_rate", "utility", tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_report_table_with_deltas_old_cli(tmp_path):
    """The original flags alone (no plots, no HTML) still work."""
    paths = [write_result(tmp_path / "base/safe_rate.json", 0.9, [0.85, 0.95]),
             write_result(tmp_path / "ft/safe_rate.json", 0.6, [0.5, 0.7]),
             write_result(tmp_path / "ft/utility.json", 0.4, [0.3, 0.5], metric="gsm8k")]
    out_md, out_pq = tmp_path / "r/summary.md", tmp_path / "r/summary.parquet"
    report.main(["--results", *paths, "--experiments", "base", "ft", "--baseline", "base",
                 "--notes_json", '{"ft": "fine-tuned"}', "--parquet", str(out_pq), "--markdown", str(out_md)])
    text = out_md.read_text()
    assert "| base (reference) | 1 (single run) | 90.0% (85.0%–95.0%), n=100 | - |" in text
    assert "| ft: fine-tuned | 1 (single run) | 60.0% (50.0%–70.0%), n=100, −30.0 pp | 40.0% (30.0%–50.0%), n=100 |" \
        in text
    rows = pq.read_table(out_pq).to_pylist()
    ft = next(r for r in rows if r["experiment"] == "ft" and r["metric"] == "safe_rate")
    assert abs(ft["delta_vs_baseline"] + 0.3) < 1e-9 and ft["separated_vs_baseline"] is True
    assert sorted(p.name for p in out_md.parent.iterdir()) == ["summary.md", "summary.parquet"]


def test_manifest_hashes_and_template_check(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "train_log.json").write_text(json.dumps({"chat_template_sha256": "abc"}))
    gens = tmp_path / "g.parquet"
    table = pa.table({"id": ["a"]}).replace_schema_metadata({"safeft": json.dumps({"chat_template_sha256": "abc"})})
    pq.write_table(table, gens)
    data = tmp_path / "d.parquet"
    data.write_bytes(b"x")
    m = manifest.build_manifest("e", {"k": 1}, [str(data)], [str(model)], [str(gens)], [0])
    assert m["chat_template_consistent"] and m["seeds"] == [0]
    assert m["inputs"][str(data)] == manifest.sha256_file(data)
    assert m["packages"]["torch"] and m["config_sha256"]
    (model / "train_log.json").write_text(json.dumps({"chat_template_sha256": "other"}))
    m = manifest.build_manifest("e", {}, [], [str(model)], [str(gens)], [0])
    assert not m["chat_template_consistent"]


@pytest.mark.slow
def test_html_report_from_a_tiny_run(tiny_run, tmp_path):
    cfg = ["--configfile", str(tiny_run / "tiny.yaml")]
    out = tiny_run / "results/report"
    for name in ("summary.parquet", "summary.md", "report.md", "summary.html", "safety_vs_utility.png",
                 "bars/safe_rate.png", "bars/utility.png"):
        assert (out / name).stat().st_size > 0, name
    assert "tiny_real6 | safe_rate | seed 0:" in (out / "report.md").read_text()
    smk(tiny_run, "--report", str(tmp_path / "report.html"), *cfg)
    page = (tmp_path / "report.html").read_text()
    assert len(page) > 100_000
    assert page.count("data:image/png") >= 3 and "data:text/html" in page  # plots and the summary table, inline
    assert not re.search(r"""(src|href)=["']https?://""", page)  # nothing fetched from the network
    assert "Safety vs utility" in page and "Per metric" in page and "not separated" in page


def write_examples(json_path, values_by_seed):
    rows = [{"id": f"p{i}", "seed": seed, "value": float(v)} for seed, vals in values_by_seed.items()
            for i, v in enumerate(vals)]
    pq.write_table(pa.Table.from_pylist(rows), Path(json_path).with_suffix(".examples.parquet"))


def test_handled_right_pools_harmful_refused_and_benign_answered(tmp_path):
    r = tmp_path / "results"
    paths = []
    # refuses everything: all 4 harmful right, all 4 benign wrong
    for exp, harmful, benign in (("refuse_all", [1, 1, 1, 1], [1, 1, 1, 1]),
                                 ("discerning", [1, 1, 1, 0], [0, 0, 0, 1]),
                                 ("no_benign", [1, 1, 1, 1], None)):
        paths.append(write_result(r / f"{exp}/safe_rate.json", sum(harmful) / 4, [0, 1]))
        write_examples(paths[-1], {0: harmful})
        if benign is not None:
            paths.append(write_result(r / f"{exp}/over_refusal.json", sum(benign) / 4, [0, 1], metric="over_refusal"))
            write_examples(paths[-1], {0: benign})
    rows = {x["experiment"]: x for x in report.handled_rows(paths, "safe_rate", ["over_refusal"])}
    assert set(rows) == {"refuse_all", "discerning"}  # the third lacks the benign metric
    assert rows["refuse_all"]["value"] == 0.5 and rows["refuse_all"]["n"] == 8
    assert rows["discerning"]["value"] == 0.75
    assert rows["discerning"]["ci_low"] <= 0.75 <= rows["discerning"]["ci_high"]
    assert report.handled_rows(paths, "safe_rate", []) == []


def test_handled_right_joins_the_summary_and_the_cli_writes_runtime(results, tmp_path):
    benign = []
    for exp in EXPS:
        safe = tmp_path / f"results/{exp}/safe_rate.json"
        write_examples(safe, {0: [1, 1, 0, 1], 1: [1, 0, 0, 1]})
        benign.append(write_result(tmp_path / f"results/{exp}/over_refusal.json", 0.25, [0.0, 0.5],
                                   metric="over_refusal"))
        write_examples(benign[-1], {0: [0, 0, 1, 0], 1: [0, 0, 0, 1]})
    bench = tmp_path / "benchmarks"
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for rel, s, rss in (("train/a/train_seed0.tsv", 120.0, 900.0), ("train/a/train_seed1.tsv", 60.0, 1200.0),
                        ("generate/a/x.tsv", 20.0, 700.0), ("report/report.tsv", 4.0, "-")):
        (bench / rel).parent.mkdir(parents=True, exist_ok=True)
        (bench / rel).write_text(header + f"{s}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t0\t1\n")
    out = tmp_path / "out"
    report.main(["--results", *results, *benign, "--experiments", *EXPS, "--baseline", "base",
                 "--parquet", str(out / "s.parquet"), "--markdown", str(out / "s.md"), "--report_md",
                 str(out / "r.md"), "--benign", "over_refusal", "--benchmarks", str(bench),
                 "--runtime", str(out / "runtime.parquet"), "--refusal_scatter", str(out / "refusal.png")])
    rows = pq.read_table(out / "s.parquet").to_pylist()
    handled = [x for x in rows if x["metric"] == report.HANDLED]
    assert len(handled) == 4 and all(x["n"] == 16 and x["n_seeds"] == 2 for x in handled)
    runtime = pq.read_table(out / "runtime.parquet").to_pylist()
    assert [x["rule"] for x in runtime] == ["train", "generate", "report"]
    assert runtime[0]["jobs"] == 2 and runtime[0]["seconds"] == 180.0 and runtime[0]["peak_rss_mb"] == 1200.0
    assert abs(runtime[0]["share"] - 180 / 204) < 1e-9 and math.isnan(runtime[2]["peak_rss_mb"])
    text = (out / "r.md").read_text()
    assert "Where the time went" in text and "| train | 2 | 3.0 min | 88% |" in text
    assert report.HANDLED in (out / "s.md").read_text()
    assert (out / "refusal.png").stat().st_size > 0


def test_training_curves_one_panel_per_chain(tmp_path):
    logs = {}
    for exp, seeds in (("vanilla", 2), ("real6", 1), ("real3", 1)):
        for s in range(seeds):
            path = tmp_path / f"models/{exp}/seed{s}/train_log.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"log_history": [{"step": k, "loss": 2.0 - 0.1 * k - 0.05 * s}
                                                        for k in range(1, 6)] + [{"step": 5, "train_loss": 1.7}]}))
            logs.setdefault(exp, []).append(str(path))
    chains = {"vanilla": "no method", "real6": "preview(mode=real)", "real3": "preview(mode=real)"}
    panels = report.plot_training_curves(logs, chains, tmp_path / "curves.png")
    assert panels == ["no method", "preview(mode=real)"]
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert report.read_curve(logs["vanilla"][1])[0] == (1, pytest.approx(1.85))
    with pytest.raises(DataError, match="cannot read training log"):
        report.read_curve(tmp_path / "missing.json")


def test_judges_section_names_the_mode_unparsed_and_kappa(tmp_path):
    from workflow_scripts.report import blocks, judge_rows, to_markdown

    r = tmp_path / "results"
    plain = write_result(r / "vanilla/safe_rate.json", 0.4, [0.3, 0.5])
    judged = r / "vanilla/judge_safe_rate.json"
    judged.write_text(json.dumps({"metric": "judge_safe_rate", "value": 0.5, "ci95": [0.3, 0.7], "n": 32,
                                  "n_seeds": 1, "n_total": 32, "n_unparsed": 0, "answer_mode": "choice",
                                  "judge": {"backend": "hf", "model": "models/base/smollm2"},
                                  "agreement_with_keyword": {"cohen_kappa": 0.125}}))
    rows = judge_rows([str(plain), str(judged)])
    assert rows == [{"experiment": "vanilla", "metric": "judge_safe_rate", "judge": "models/base/smollm2",
                     "answer": "choice", "unparsed": "0 of 32", "kappa": "0.12"}]
    md = to_markdown(blocks([], ["vanilla"], None, judges=rows))
    assert "## Judges" in md and "weak judge" in md and "| choice | 0 of 32 | 0.12 |" in md
