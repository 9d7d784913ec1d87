import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflow_scripts import io


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "out.parquet"
    with pytest.raises(RuntimeError), io.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists() and list((tmp_path / "sub").iterdir()) == []


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "model"
    with io.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(RuntimeError), io.atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_round_trip_and_contract_checks(tmp_path):
    records = [{"id": "a", "messages": [{"role": "user", "content": "hi"}], "reference": "r"},
               {"id": "b", "messages": [{"role": "user", "content": "yo"}]}]
    table = io.records_to_table(records)
    assert table.schema.field("messages").type == pa.list_(io.MESSAGE)
    path = tmp_path / "t.parquet"
    io.write_table(table, path)
    assert pq.read_metadata(path).row_group(0).column(0).compression == "ZSTD"
    assert io.read_table(path).to_pylist()[1]["reference"] is None
    io.write_table(io.records_to_table(records + [records[0]]), path)
    with pytest.raises(io.DataError, match=r"row 2: field 'id': duplicate id 'a'"):
        io.read_table(path)


def test_content_id_is_stable_and_content_sensitive():
    m = [{"role": "user", "content": "x"}]
    assert io.content_id(m) == io.content_id([dict(m[0])])
    assert io.content_id(m) != io.content_id([{"role": "user", "content": "y"}])
