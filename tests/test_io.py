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


def shard_rows(n):
    return io.records_to_table([{"id": f"r{i}", "messages": [{"role": "user", "content": str(i)}]}
                                for i in range(n)])


def test_split_by_id_is_stable_and_merge_restores_the_order():
    t = shard_rows(20)
    a = io.split_by_id(t, 4)
    b = io.split_by_id(t.take(list(range(19, -1, -1))), 4)
    assert [sorted(x.column("id").to_pylist()) for x in a] == [sorted(x.column("id").to_pylist()) for x in b]
    assert sum(x.num_rows for x in a) == 20
    # Shards come back in any order (each job may also reorder its rows): the merge follows the input's ids.
    ids = t.column("id").to_pylist()
    merged = io.merge_by_id(ids, [a[2], a[0].take(list(range(a[0].num_rows - 1, -1, -1))), a[3], a[1]])
    assert merged.equals(t)


def test_merge_by_id_names_lost_and_repeated_rows():
    t = shard_rows(6)
    ids = t.column("id").to_pylist()
    shards = io.split_by_id(t, 2)
    with pytest.raises(io.DataError, match=r"out.parquet: .*1 missing"):
        io.merge_by_id(ids, [shards[0], shards[1].slice(1)], "out.parquet")
    with pytest.raises(io.DataError, match="1 repeated"):
        io.merge_by_id(ids, [shards[0], shards[1], shards[1].slice(0, 1)], "out.parquet")
