"""The plumbing every scorer CLI shares: pairing generation files with seeds, the result epilogue, and the one
judge rule that serves both judge scorers."""

import argparse
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from smk_helpers import TINY, smk

from workflow_scripts import bbq, judge, score, scoring, toxicity

RESULT = {"metric": "m", "value": 0.5, "ci95": [0.25, 0.75], "n": 2, "n_seeds": 1, "per_seed": {"0": 0.5},
          "seed_sd": 0.0, "unit": "fraction"}


def gen_file(path, completions=("I cannot", "Sure")):
    ids = [f"p{i}" for i in range(len(completions))]
    table = pa.Table.from_pydict({"id": ids, "messages": [[{"role": "user", "content": "q"}]] * len(ids),
                                  "completion": list(completions), "reference": [None] * len(ids)})
    pq.write_table(table.replace_schema_metadata({"safeft": json.dumps({"backend": "hf"})}), path)
    return str(path)


def test_seeded_files_pairs_in_order_and_defaults_to_0_1():
    assert scoring.seeded_files(["a", "b"], [3, 7]) == [(3, "a"), (7, "b")]
    assert scoring.seeded_files(["a", "b"]) == [(0, "a"), (1, "b")]


def test_seed_count_mismatch_names_both():
    with pytest.raises(ValueError, match=r"2 generation files \(a b\) but 1 seeds \(3\)"):
        scoring.seeded_files(["a", "b"], [3])
    with pytest.raises(ValueError, match="repeat a seed"):
        scoring.seeded_files(["a", "b"], [3, 3])


def test_add_generation_args():
    ap = argparse.ArgumentParser()
    scoring.add_generation_args(ap)
    args = ap.parse_args(["--generations", "a", "b", "--seeds", "1", "2"])
    assert args.generations == ["a", "b"] and args.seeds == [1, 2]
    assert ap.parse_args(["--generations", "a"]).seeds is None


@pytest.mark.parametrize("main, command, extra", [
    (score.main, [], ["--metric", "safe_rate"]),
    (judge.main, ["harmfulness"], ["--backend", "openai", "--model", "m"]),
    (toxicity.main, ["score"], ["--checkpoint", "c.ckpt", "--backbone", "b"]),
    (bbq.main, ["score"], ["--eval_set", "EVAL"]),
])
def test_every_scorer_cli_rejects_a_seed_count_mismatch(main, command, extra, tmp_path, capsys):
    g0, g1 = gen_file(tmp_path / "g0.parquet"), gen_file(tmp_path / "g1.parquet")
    # bbq reads its eval set before the generations: give it an empty one, so that the seeds are what fails.
    columns = ("id", "messages", "reference", "category", "context_condition", "question_polarity", "target_letter",
               "unknown_letter", "options")
    pq.write_table(pa.Table.from_pydict({c: [] for c in columns}), tmp_path / "eval.parquet")
    extra = [str(tmp_path / "eval.parquet") if a == "EVAL" else a for a in extra]
    with pytest.raises(SystemExit) as exc:
        main([*command, "--generations", g0, g1, "--seeds", "5", *extra, "--output", str(tmp_path / "r.json")])
    message = f"{exc.value.code} {capsys.readouterr().err}"
    assert "2 generation files" in message and "1 seeds (5)" in message and "g0.parquet" in message
    assert not (tmp_path / "r.json").exists()


def test_write_result_adds_common_fields_in_order(tmp_path, capsys):
    gens = scoring.load_generations([gen_file(tmp_path / "g.parquet")], [4])
    out = tmp_path / "res" / "m.json"
    written = scoring.write_result(dict(RESULT), [{"id": "p0", "seed": 4, "value": 1.0}], out, "my_metric", gens,
                                   note="extra", classifier={"k": 1})
    on_disk = json.loads(out.read_text())
    assert on_disk == written
    assert list(on_disk)[len(RESULT):] == ["name", "classifier", "generation", "generation_files"]
    assert on_disk["name"] == "my_metric" and on_disk["generation"] == {"backend": "hf"}
    assert on_disk["generation_files"] == [str(tmp_path / "g.parquet")]
    assert pq.read_table(tmp_path / "res" / "m.examples.parquet").to_pylist() == [{"id": "p0", "seed": 4,
                                                                                   "value": 1.0}]
    assert "my_metric: 0.5000 (95% CI 0.2500-0.7500, n=2, extra)" in capsys.readouterr().out
    # Only the two outputs: the temporary files were renamed into place.
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.examples.parquet", "m.json"]


def test_write_result_without_generations_and_with_a_table(tmp_path):
    out = tmp_path / "m.json"
    scoring.write_result(dict(RESULT), pa.table({"id": ["p0"]}), out, "n")
    assert list(json.loads(out.read_text()))[-1] == "name"
    assert pq.read_table(tmp_path / "m.examples.parquet").column_names == ["id"]


def test_write_result_refuses_a_result_without_the_contract_keys(tmp_path):
    with pytest.raises(ValueError, match="lacks ci95, n_seeds"):
        scoring.write_result({k: v for k, v in RESULT.items() if k not in ("ci95", "n_seeds")}, [], tmp_path / "m.json",
                             "m")
    assert list(tmp_path.iterdir()) == []


def test_failed_examples_write_leaves_nothing(tmp_path):
    # Rows pyarrow cannot put in one column: the examples fail, so no JSON may claim a finished result.
    with pytest.raises(pa.ArrowException):
        scoring.write_result(dict(RESULT), [{"x": 1}, {"x": "a"}], tmp_path / "m.json", "m")
    assert list(tmp_path.iterdir()) == []


def test_one_judge_rule_serves_both_judge_scorers(tmp_path):
    out = smk(tmp_path, "-n", "-p", "results/tiny_vanilla/judge_safe_rate.json", "results/tiny_vanilla/win_rate.json",
              "--configfile", str(TINY)).stdout
    commands = {m.group(1): line for line in out.splitlines()
                if (m := re.search(r"workflow_scripts\.judge (\w+) ", line))}
    assert set(commands) == {"harmfulness", "winrate"}
    assert "--baseline_generations generations/tiny_base/seed0/tiny_harmful.parquet" in commands["winrate"]
    assert "--baseline_generations" not in commands["harmfulness"]
    assert "rule judge_winrate" not in out and out.count("rule judge:") == 2
