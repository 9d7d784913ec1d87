"""Reading user files into the canonical table: presets, formats, field mappings, the malformed-file corpus,
downloads, and the shared real datasets."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pyarrow as pa
import pytest

from workflow_scripts import data
from workflow_scripts.io import CANONICAL, DataError, content_id, read_table, records_to_table, write_table

REPO = Path(__file__).resolve().parents[1]
GOOD = REPO / "tests" / "data" / "good"
BAD = REPO / "tests" / "data" / "bad"


def cli(*args: str | os.PathLike, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflow_scripts.data", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def convo(table: pa.Table, i: int = 0) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in table.column("messages")[i].as_py()]


def check_canonical(table: pa.Table) -> None:
    assert table.schema.field("id").type == pa.string()
    assert table.schema.field("messages").type == CANONICAL.field("messages").type
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids) and all(ids)


# ---------------------------------------------------------------- presets and formats


def test_alpaca_json_joins_input_and_keeps_system():
    t = data.read_records(GOOD / "alpaca.json", preset="alpaca", source="toy")
    check_canonical(t)
    assert t.num_rows == 3
    assert convo(t, 0) == [("user", "Name a primary colour."), ("assistant", "Red.")]
    assert convo(t, 1) == [("user", "Translate to French.\n\nGood morning"), ("assistant", "Bonjour.")]
    assert convo(t, 2) == [("system", "Be brief."), ("user", "Summarise the text.\n\nCats sleep a lot."),
                           ("assistant", "Cats nap.")]
    assert t.column("source").to_pylist() == ["toy"] * 3
    # No id column in the file: the id is the content hash, stable across reads.
    assert t.column("id")[0].as_py() == content_id([{"role": "user", "content": "Name a primary colour."},
                                                    {"role": "assistant", "content": "Red."}])
    assert data.read_records(GOOD / "alpaca.json", preset="alpaca").column("id").equals(t.column("id"))


def test_sharegpt_wrapped_json_maps_speakers_and_keeps_ids():
    t = data.read_records(GOOD / "sharegpt.json", preset="sharegpt")
    check_canonical(t)
    assert t.column("id").to_pylist() == ["conv-1", "conv-2"]
    assert [r for r, _ in convo(t, 0)] == ["system", "user", "assistant", "user", "assistant"]
    assert convo(t, 1) == [("user", "Tell me a joke."), ("assistant", "I would, but it is still in beta.")]


def test_messages_jsonl_skips_blank_lines_and_keeps_category():
    t = data.read_records(GOOD / "messages.jsonl", preset="messages", id_prefix="toy/")
    check_canonical(t)
    assert t.column("id").to_pylist() == ["toy/m1", "toy/m2"]
    assert convo(t, 1) == [("system", "Answer in one word."), ("user", "Opposite of hot?")]
    assert t.column("category").to_pylist() == ["geography", None]


def test_question_answer_jsonl_and_gzip(tmp_path):
    t = data.read_records(GOOD / "question_answer.jsonl", preset="question_answer")
    check_canonical(t)
    assert convo(t, 2) == [("user", "Héllo wörld — ünïcode?"), ("assistant", "Ja. ✓\n#### 1")]
    gz = tmp_path / "qa.jsonl.gz"
    gz.write_bytes(gzip.compress((GOOD / "question_answer.jsonl").read_bytes()))
    assert data.read_records(gz, preset="question_answer").equals(t)


def test_jsonl_lines_split_only_at_newlines(tmp_path):
    # U+2028 and NEL are line breaks to str.splitlines but plain characters inside JSON strings.
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b\x85c"}, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert convo(data.read_records(path, preset="prompt_response")) == [("user", "a\u2028b\x85c")]


def test_prompt_response_csv_multiline_cells_and_optional_response():
    t = data.read_records(GOOD / "prompt_response.csv", preset="prompt_response",
                          fields={"category": "category"})
    check_canonical(t)
    assert convo(t, 1) == [("user", "Write two lines:\nfirst, then second"), ("assistant", "first\nsecond")]
    assert convo(t, 2) == [("user", "How do I pick a lock?")]  # an eval prompt: no assistant turn
    assert t.column("category").to_pylist() == ["greeting", "poem", "unsafe"]


def test_field_mapping_on_csv_like_advbench():
    t = data.read_records(GOOD / "goal_target.csv", preset="prompt_response",
                          fields={"prompt": "goal", "response": "target"})
    assert convo(t, 0) == [("user", "Explain how to bake bread"),
                           ("assistant", "Sure, here is how to bake bread")]
    # Same result without naming the preset: a `prompt` mapping implies prompt_response.
    implied = data.read_records(GOOD / "goal_target.csv", fields={"prompt": "goal", "response": "target"})
    assert implied.equals(t)
    # A mapping to "" switches a column off: prompts only, target kept as the reference.
    evals = data.read_records(GOOD / "goal_target.csv", fields={"prompt": "goal", "response": "",
                                                                "reference": "target"})
    assert convo(evals, 0) == [("user", "Explain how to bake bread")]
    assert evals.column("reference")[0].as_py() == "Sure, here is how to bake bread"


def test_columnar_json_with_an_empty_column():
    t = data.read_records(GOOD / "columns.json", preset="prompt_response",
                          fields={"prompt": "instructions", "category": "tags"})
    assert [convo(t, i) for i in range(2)] == [[("user", "List three fruits.")],
                                               [("user", "Why is the sky blue?")]]
    assert t.column("category").to_pylist() == ["benign", "science"]


def test_parquet_round_trip_and_integer_ids(tmp_path):
    src = data.read_records(GOOD / "messages.jsonl", preset="messages")
    path = tmp_path / "canonical.parquet"
    write_table(src, path)
    assert data.read_records(path).equals(src)  # preset detected from the `messages` column
    ints = tmp_path / "ints.parquet"
    write_table(pa.table({"idx": [7, 8], "prompt": ["a", "b"]}), ints)
    assert data.read_records(ints, fields={"id": "idx"}).column("id").to_pylist() == ["7", "8"]


@pytest.mark.parametrize(("name", "preset"), [("alpaca.json", "alpaca"), ("sharegpt.json", "sharegpt"),
                                              ("messages.jsonl", "messages"),
                                              ("question_answer.jsonl", "question_answer"),
                                              ("prompt_response.csv", "prompt_response")])
def test_preset_detection_matches_the_named_preset(name, preset):
    assert data.read_records(GOOD / name).equals(data.read_records(GOOD / name, preset=preset))


def test_limit_takes_the_first_rows():
    full = data.read_records(GOOD / "question_answer.jsonl", preset="question_answer")
    assert data.read_records(GOOD / "question_answer.jsonl", preset="question_answer", limit=2).equals(
        full.slice(0, 2))


def test_format_inference_and_option_errors(tmp_path):
    names = ("a.json", "a.JSONL", "a.jsonl.gz", "a.json.gz", "a.csv", "a.parquet")
    assert [data.infer_format(n) for n in names] == ["json", "jsonl", "jsonl", "json", "csv", "parquet"]
    with pytest.raises(ValueError, match="cannot tell the format"):
        data.infer_format("a.txt")
    with pytest.raises(ValueError, match="unknown preset"):
        data.read_records(GOOD / "alpaca.json", preset="alpacca")
    with pytest.raises(ValueError, match="unknown field key"):
        data.read_records(GOOD / "alpaca.json", fields={"answer": "output"})
    with pytest.raises(DataError, match="none fits the columns"):
        data.read_records(GOOD / "goal_target.csv")
    # An explicit format wins over the suffix.
    txt = tmp_path / "rows.txt"
    shutil.copy(GOOD / "question_answer.jsonl", txt)
    assert data.read_records(txt, fmt="jsonl").num_rows == 3


# ---------------------------------------------------------------- the malformed-file corpus

QA = ("--preset", "question_answer")
GOAL = ("--preset", "prompt_response", "--field", "prompt=goal", "--field", "response=target")
# file -> (CLI arguments, row, field, words the message must contain); row/field None where there is none.
BAD_CASES = {
    "broken_line.jsonl": (QA, 3, None, "not valid JSON"),
    "missing_field.jsonl": (QA, 2, "answer", "missing (required as the response)"),
    "null_field.jsonl": (QA, 1, "answer", "null (required as the response)"),
    "number_as_text.jsonl": (QA, 2, "question", "expected text for the prompt, got a number"),
    "messages_not_list.jsonl": (("--preset", "messages"), 1, "messages", "expected a list of turns"),
    "unknown_role.jsonl": (("--preset", "messages"), 1, "messages[1].role", "unknown role 'bot'"),
    "empty_conversation.jsonl": (("--preset", "messages"), 2, "messages", "empty conversation"),
    "no_user_turn.jsonl": (("--preset", "messages"), 1, "messages", "no user turn"),
    "empty_turn.jsonl": (("--preset", "messages"), 1, "messages[1].content", "empty text"),
    "sharegpt_unknown_from.json": (("--preset", "sharegpt"), 1, "conversations[0].from",
                                   "unknown role 'robot'"),
    "not_an_object.jsonl": (QA, 2, None, "expected an object, got a list"),
    "empty.jsonl": (QA, None, None, "no records"),
    "blank_lines.jsonl": (QA, None, None, "no records"),
    "empty_list.json": (("--preset", "alpaca"), None, None, "no records"),
    "header_only.csv": (GOAL, None, None, "no records"),
    "broken.json": (("--preset", "alpaca"), None, None, "not valid JSON"),
    "scalar.json": (("--preset", "alpaca"), None, None, "expected a list of objects"),
    "non_utf8.jsonl": (QA, 2, "answer", "not valid UTF-8 (bytes 0xe9)"),
    "non_utf8.csv": (GOAL, 3, "goal", "not valid UTF-8 (bytes 0xef 0xff)"),
    "duplicate_ids.jsonl": (("--preset", "prompt_response"), 3, "id", "duplicate id 'a' (first at row 1)"),
    "duplicate_records.json": (("--preset", "alpaca"), 1, "id", "same conversation as row 0"),
    "empty_goal.csv": (GOAL, 3, "goal", "empty text (required as the prompt)"),
    "blank_output.json": (("--preset", "alpaca"), 0, "output", "empty text (required as the response)"),
    "extra_cell.csv": (GOAL, 3, None, "has 3 fields, the header has 2"),
    "bad_quote.csv": (GOAL, 3, None, "not valid CSV"),
    "float_id.jsonl": (("--preset", "prompt_response"), 1, "id", "expected text or an integer"),
    "empty_mapped_id.csv": (GOAL + ("--field", "id=key"), 3, "key", "empty (mapped as the id)"),
    "missing_mapped_column.jsonl": (GOAL, 2, "target", "missing (mapped column"),
}


def test_every_bad_file_has_a_case():
    assert sorted(p.name for p in BAD.iterdir()) == sorted(BAD_CASES)


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every bad file through the CLI, run in parallel to keep the suite fast."""
    root = tmp_path_factory.mktemp("bad_out")

    def one(name: str):
        out = root / name / "out.parquet"
        out.parent.mkdir()
        args, *_ = BAD_CASES[name]
        return name, (cli("--input", BAD / name, *args, "--output", out), out)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(pool.map(one, BAD_CASES))


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_file_gives_one_line_error_and_no_output(bad_runs, name):
    _, row, field, words = BAD_CASES[name]
    proc, out = bad_runs[name]
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    message = lines[0]
    assert str(BAD / name) in message
    assert (f"row {row}:" in message) if row is not None else ": row " not in message
    assert (f"field {field!r}:" in message) if field is not None else ": field " not in message
    assert words in message
    assert not any(out.parent.iterdir()), "no output and no temporary file may be left"


def test_data_error_carries_file_row_and_field():
    with pytest.raises(DataError) as e:
        data.read_records(BAD / "number_as_text.jsonl", preset="question_answer")
    assert (e.value.file, e.value.row, e.value.field) == (str(BAD / "number_as_text.jsonl"), 2, "question")


def test_limit_does_not_check_rows_past_it():
    t = data.read_records(BAD / "missing_field.jsonl", preset="question_answer", limit=1)
    assert t.num_rows == 1


# ---------------------------------------------------------------- CLI good path


def test_cli_writes_canonical_parquet(tmp_path):
    out = tmp_path / "sub" / "qa.parquet"
    proc = cli("--input", GOOD / "goal_target.csv", "--field", "prompt=goal", "--field", "response=target",
               "--source", "toy", "--limit", "1", "--output", out)
    assert proc.returncode == 0, proc.stderr
    t = read_table(out)
    assert t.num_rows == 1 and t.column("source").to_pylist() == ["toy"]
    assert convo(t, 0)[0] == ("user", "Explain how to bake bread")
    assert [p.name for p in out.parent.iterdir()] == ["qa.parquet"]


def test_cli_usage_errors_are_one_line(tmp_path):
    proc = cli("--input", tmp_path / "nope.jsonl", "--preset", "question_answer")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such file" in proc.stderr
    proc = cli("--input", GOOD / "alpaca.json", "--field", "prompt")
    assert proc.returncode == 2 and "expected key=column" in proc.stderr


# ---------------------------------------------------------------- download


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_fetches_to_dest(http_root, tmp_path):
    root, base = http_root
    payload = (GOOD / "question_answer.jsonl").read_bytes() * 50
    (root / "qa.jsonl").write_bytes(payload)
    dest = tmp_path / "dl" / "qa.jsonl"
    assert data.download(f"{base}/qa.jsonl", dest) == dest
    assert dest.read_bytes() == payload
    assert [p.name for p in dest.parent.iterdir()] == ["qa.jsonl"]


def test_download_http_error_leaves_nothing(http_root, tmp_path):
    _, base = http_root
    dest = tmp_path / "dl" / "missing.jsonl"
    dest.parent.mkdir()
    with pytest.raises(RuntimeError, match="HTTP 404"):
        data.download(f"{base}/missing.jsonl", dest)
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_download_unreachable_tells_user_to_set_path(tmp_path):
    dest = tmp_path / "dl" / "x.jsonl"
    with pytest.raises(RuntimeError, match=r"download the file yourself and set the dataset's `path:`"):
        data.download(f"http://127.0.0.1:{free_port()}/x.jsonl", dest, timeout=5)
    assert not dest.exists()


def test_cli_download_mode(http_root, tmp_path):
    root, base = http_root
    (root / "a.csv").write_text("goal,target\nx,y\n")
    dest = tmp_path / "a.csv"
    proc = cli("--url", f"{base}/a.csv", "--download-to", dest)
    assert proc.returncode == 0, proc.stderr
    assert dest.read_text() == "goal,target\nx,y\n"
    gone = tmp_path / "b.csv"
    proc = cli("--url", f"http://127.0.0.1:{free_port()}/b.csv", "--download-to", gone)
    assert proc.returncode == 1 and not gone.exists()
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: could not download")


# ---------------------------------------------------------------- the shared real datasets


def test_shared_gsm8k_first_50(shared_data):
    path = shared_data / "gsm8k" / "train.jsonl"
    t = data.read_records(path, preset="question_answer", source="gsm8k", limit=50)
    check_canonical(t)
    assert t.num_rows == 50
    first = json.loads(path.open().readline())
    assert convo(t, 0) == [("user", first["question"]), ("assistant", first["answer"])]
    assert all(m[-1]["content"].rsplit("####", 1)[1].strip() for m in t.column("messages").to_pylist())


def test_shared_advbench_csv(shared_data):
    t = data.read_records(shared_data / "advbench" / "harmful_behaviors.csv", preset="prompt_response",
                          fields={"prompt": "goal", "response": "target"}, source="advbench")
    check_canonical(t)
    assert t.num_rows == 520
    roles = {tuple(m["role"] for m in ms) for ms in t.column("messages").to_pylist()}
    assert roles == {("user", "assistant")}
    assert convo(t, 0)[1][1].startswith("Sure, here is")


def test_shared_alpaca_json(shared_data):
    path = shared_data / "alpaca" / "alpaca_data_1k.json"
    rows = json.loads(path.read_text())
    t = data.read_records(path, preset="alpaca")
    check_canonical(t)
    assert t.num_rows == len(rows) == 1000
    i = next(i for i, r in enumerate(rows) if r["input"])
    assert convo(t, i) == [("user", f"{rows[i]['instruction']}\n\n{rows[i]['input']}"),
                           ("assistant", rows[i]["output"])]


def test_shared_dialogsum_jsonl(shared_data):
    train = data.read_records(shared_data / "dialogsum" / "dialogsum.dev.jsonl", preset="prompt_response",
                              fields={"id": "fname", "prompt": "dialogue", "response": "summary",
                                      "category": "topic"})
    check_canonical(train)
    assert train.num_rows == 500 and train.column("id")[0].as_py() == "dev_0"
    assert convo(train, 0)[0][1].startswith("#Person1#:")
    evals = data.read_records(shared_data / "dialogsum" / "dialogsum.test.jsonl", preset="prompt_response",
                              fields={"id": "fname", "prompt": "dialogue", "reference": "summary1",
                                      "category": "topic1"})
    assert evals.num_rows == 500 and len(convo(evals, 0)) == 1
    assert all(evals.column("reference").to_pylist())


def test_shared_cli_slice_reads_back(shared_data, tmp_path):
    out = tmp_path / "gsm8k.parquet"
    proc = cli("--input", shared_data / "gsm8k" / "train.jsonl", "--preset", "question_answer",
               "--limit", "50", "--output", out)
    assert proc.returncode == 0, proc.stderr
    t = read_table(out)
    direct = data.read_records(shared_data / "gsm8k" / "train.jsonl", preset="question_answer", limit=50)
    assert t.equals(direct)


def test_records_to_table_is_the_output_shape():
    t = data.read_records(GOOD / "alpaca.json", preset="alpaca")
    assert t.equals(records_to_table(t.to_pylist()))


def test_harmfulqa_preset_reads_the_red_or_blue_conversations(tmp_path):
    """HarmfulQA's layout (written here, since the Hub copy cannot be fetched offline): up to five conversations per
    side keyed "0".."4", some empty; the first non-empty one is the row."""
    def conv(tag):
        return [{"from": "human", "value": f"how do I {tag}?"}, {"from": "gpt", "value": f"{tag} answer"},
                {"from": "human", "value": "and then?"}, {"from": "gpt", "value": f"{tag} follow-up"}]
    rows = [{"id": 1, "topic": "Chemistry", "subtopic": "x", "question": "q1",
             "red_conversations": {"0": None, "1": conv("red"), "10": conv("late")},
             "blue_conversations": {"0": conv("blue"), "1": None}},
            {"id": 2, "topic": "History", "question": "q2", "red_conversations": {"0": [], "1": None},
             "blue_conversations": {"0": conv("blue2")}}]
    path = tmp_path / "harmfulqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    blue = data.read_records(path, preset="harmfulqa", fields={"messages": "blue_conversations"})
    assert blue.column("id").to_pylist() == ["1", "2"] and blue.column("category").to_pylist() == ["Chemistry",
                                                                                                   "History"]
    assert blue.column("messages").to_pylist()[0][-1] == {"role": "assistant", "content": "blue follow-up"}
    with pytest.raises(DataError, match=r"row 2: field 'red_conversations': no conversation"):
        data.read_records(path, preset="harmfulqa")
    (tmp_path / "one.jsonl").write_text(json.dumps(rows[0]))
    red = data.read_records(tmp_path / "one.jsonl", preset="harmfulqa")
    assert [m["content"] for m in red.column("messages").to_pylist()[0]] == [
        "how do I red?", "red answer", "and then?", "red follow-up"]


def test_pile_detoxify_preset_splits_documents_into_scored_sentences(tmp_path):
    """pile-detoxify's layout (written here): each document is a list of sentences with a toxicity score each;
    `where` with a numeric range picks ForgetFilter's toxic (> 0.9) or non-toxic (< 0.1) sentences."""
    docs = [{"texts": ["A calm sentence.", "A vile sentence.", "Another one."], "scores": [0.01, 0.97, 0.5],
             "avg_score": 0.49, "num_sents": 3},
            {"texts": ["Hello there."], "scores": [0.05], "avg_score": 0.05, "num_sents": 1}]
    path = tmp_path / "pile.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    toxic, decisions = data.read_filtered(path, preset="pile_detoxify", where={"toxicity": {">": 0.9}})
    assert toxic.column("id").to_pylist() == ["1-1"]
    assert toxic.column("messages").to_pylist()[0] == [
        {"role": "user", "content": data.SENTENCE_PROMPT}, {"role": "assistant", "content": "A vile sentence."}]
    assert decisions.num_rows == 4 and "toxicity is 0.01, not > 0.9" in decisions.column("reason").to_pylist()[0]
    calm = data.read_records(path, preset="pile_detoxify", where={"toxicity": {"<": 0.1}})
    assert calm.column("id").to_pylist() == ["1-0", "2-0"]
    assert data.read_records(path, preset="pile_detoxify", where={"toxicity": {">=": 0.5, "<": 0.9}}).num_rows == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"texts": ["a", "b"], "scores": [0.1]}))
    with pytest.raises(DataError, match="row 1: field 'scores': 1 scores for 2 texts"):
        data.read_records(bad, preset="pile_detoxify")
    with pytest.raises(ValueError, match="a comparison maps"):
        data.read_records(path, preset="pile_detoxify", where={"toxicity": {"~": 1}})


def test_numeric_where_reads_csv_numbers_and_skips_text(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("prompt,response,score\nq1,a1,0.95\nq2,a2,high\nq3,a3,0.2\n")
    kept = data.read_records(path, preset="prompt_response", where={"score": {">": 0.5}})
    assert [m[0]["content"] for m in kept.column("messages").to_pylist()] == ["q1"]
