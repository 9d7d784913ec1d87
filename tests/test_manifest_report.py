import json

import pyarrow as pa
import pyarrow.parquet as pq

from workflow_scripts import manifest, report


def write_result(path, value, ci, n=100, metric="safe_rate"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metric": metric, "value": value, "ci95": ci, "n": n, "n_seeds": 1}))
    return str(path)


def test_report_table_with_deltas(tmp_path):
    paths = [write_result(tmp_path / "base/safe_rate.json", 0.9, [0.85, 0.95]),
             write_result(tmp_path / "ft/safe_rate.json", 0.6, [0.5, 0.7]),
             write_result(tmp_path / "ft/utility.json", 0.4, [0.3, 0.5], metric="gsm8k")]
    out_md, out_pq = tmp_path / "r/summary.md", tmp_path / "r/summary.parquet"
    report.main(["--results", *paths, "--experiments", "base", "ft", "--baseline", "base",
                 "--notes_json", '{"ft": "fine-tuned"}', "--parquet", str(out_pq), "--markdown", str(out_md)])
    text = out_md.read_text()
    assert "| base (reference) | 90.0% (85.0%-95.0%), n=100 | - |" in text
    assert "| ft: fine-tuned | 60.0% (50.0%-70.0%), n=100, -30.0 | 40.0% (30.0%-50.0%), n=100 |" in text
    rows = pq.read_table(out_pq).to_pylist()
    ft = next(r for r in rows if r["experiment"] == "ft" and r["metric"] == "safe_rate")
    assert abs(ft["delta_vs_baseline"] + 0.3) < 1e-9


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
    assert m["inputs"][str(data)] == manifest.file_sha256(data)
    assert m["packages"]["torch"] and m["config_sha256"]
    (model / "train_log.json").write_text(json.dumps({"chat_template_sha256": "other"}))
    m = manifest.build_manifest("e", {}, [], [str(model)], [str(gens)], [0])
    assert not m["chat_template_consistent"]
