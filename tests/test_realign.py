"""ReAlign stage: every stage against a loopback OpenAI-compatible server (tests/fake_openai.py) playing both the
classifier and the rewriter, faults included; filter rules; BM25 and Serper retrieval; sharding; ReAlign JSON."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fake_openai import FakeOpenAI

from workflow_scripts import realign
from workflow_scripts.io import DataError, read_table, records_to_table, write_table
from workflow_scripts.llm import Endpoint, GenParams, OpenAIBackend
from workflow_scripts.llm_cache import CachedBackend
from workflow_scripts.realign_retrieve import BM25Retriever, SerperRetriever, clean_snippets

ROOT = Path(__file__).resolve().parents[1]
words = realign.token_counter(None)


# ---------------------------------------------------------------- the fake classifier + rewriter


def section(text, start, end):
    return text.split(start, 1)[1].split(end, 1)[0]


def play(messages, body):
    """Classifier: the task named in the instruction as `task=NAME` (or a non-task answer). Rewriter: a numbered
    restructuring of the original answer, longer for seed 1; instruction flags pick misbehaviours."""
    prompt = messages[-1]["content"]
    instruction = section(prompt, "Instruction:\n", "\n\n")
    if prompt.startswith("You sort user instructions"):
        found = re.search(r"task=(\S+)", instruction)
        return f"  {found.group(1).upper()}.\n" if found else "I think this is a nice question"
    original = section(prompt, "Original answer:\n", "\n\nWrite the revised answer")
    revised = f"1. Answer: {original}\n2. Why: it follows from the question."
    if body.get("seed") == 1:
        revised += "\n3. Summary: the answer above, restated in one line for the reader."
    if "[short]" in instruction:
        revised = "Yes."
    if "[leak]" in instruction:
        revised += "\nOriginal answer: " + original
    if "[nocode]" in instruction:
        revised = "The function adds two numbers together and gives back the sum as the result of the call."
    if "[nomark]" in instruction:
        return revised
    evidence = section(prompt, "Evidence:\n", "\n\nInstruction:")
    if evidence != "(none)":
        revised += "\nSources: " + evidence.replace("\n", " ")
    return f"Here you go.\n{realign.START}\n{revised}\n{realign.END}\n"


def row(i, instruction, answer, **extra):
    return {"id": f"r{i}", "messages": [{"role": "user", "content": instruction},
                                        {"role": "assistant", "content": answer}], **extra}


def table_of(rows):
    return records_to_table(rows)


def backend(server, **kw):
    return OpenAIBackend("fake", base_url=server.url, concurrency=8, timeout=5, **kw)


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI(reply=play) as s:
        yield s


def run(table, server, **kw):
    b = backend(server, max_retries=1)
    return realign.realign_table(table, b, b, count_tokens=words, **kw)


# ---------------------------------------------------------------- classification


def test_parse_task_tolerates_case_whitespace_punctuation_only():
    assert realign.parse_task(" Open_QA.\n") == "open_qa"
    assert realign.parse_task('"math_puzzles"') == "math_puzzles"
    assert realign.parse_task("Task: open_qa") == "default"
    assert realign.parse_task("open qa") == "default"
    assert realign.parse_task(None) == "default"
    assert len(realign.TASKS) == len(set(realign.TASKS)) == 46


def test_classify_given_categories_skip_the_classifier(server):
    rows = [row(0, "Name a planet. task=open_qa", "Mars is one."),
            row(1, "Say something.", "Something here.", category="poem_generation"),
            row(2, "Unknowable text", "whatever it is", category="not_a_task")]
    before = sum(server.counts().values())
    tasks, how, probability = realign.classify(
        [r["messages"][0]["content"] for r in rows], [r.get("category") for r in rows], backend(server),
        realign.load_prompt(realign.CLASSIFY_PROMPT), GenParams())
    assert tasks == ["open_qa", "poem_generation", "default"]
    assert how == ["classified", "given", "classified"] and probability == [None] * 3
    assert sum(server.counts().values()) - before == 2  # the given category sent nothing


def test_classifier_choice_names_a_task_for_every_item(tiny_model_dir):
    """`classifier_answer: choice` (issue 16): a local classifier that never writes a task name (a tiny random
    model) picks one of the task names for every item by log-likelihood, with its probability."""
    from workflow_scripts.llm import Endpoint, make_backend

    hf = make_backend(Endpoint("hf", str(tiny_model_dir)), threads=1)
    rows = [row(0, "Write a poem about rain.", "Rain falls."), row(1, "Sort these numbers.", "1 2 3",
                                                                     category="ordering")]
    template = realign.load_prompt(realign.CLASSIFY_PROMPT)
    instructions, given = [r["messages"][0]["content"] for r in rows], [r.get("category") for r in rows]
    tasks, how, _ = realign.classify(instructions, given, hf, template, GenParams(max_new_tokens=4))
    assert how == ["classified", "given"] and tasks[0] == "default"  # generated text names no task
    tasks, how, probability = realign.classify(instructions, given, hf, template, GenParams(), "choice")
    assert how == ["chosen", "given"] and tasks[0] in realign.TASKS and tasks[1] == "ordering"
    assert 0 < probability[0] <= 1 and probability[1] is None


def test_criteria_cover_every_task_and_some_have_no_format(tmp_path):
    criteria = realign.load_criteria()
    assert set(criteria) == set(realign.TASKS)
    assert criteria["default"]["format"] is None and criteria["open_qa"]["format"]
    bad = tmp_path / "c.yaml"
    bad.write_text("open_qa: {description: x, format: y}\n")
    with pytest.raises(DataError, match="missing tasks"):
        realign.load_criteria(bad)


# ---------------------------------------------------------------- the whole stage


def test_realign_table_rewrites_filters_and_records_every_row(server):
    rows = [
        row(0, "Why is the sky blue? task=explain_answer", "Because air scatters blue light more than red light."),
        row(1, "Write a poem. task=roleplay", "Roses are red."),  # no format: passes through
        row(2, "Which option? task=exam_problem_solving_tutor [short]",
            "The answer is B because the other options contradict the premise given in the problem."),
        row(3, "Pick one letter. task=exam_problem_solving_tutor", "B"),
        row(4, "Is water wet? task=fact_verification", "True"),
        row(5, "Write add. task=text_to_code_translation [nocode]", "def add(a, b):\n    return a + b"),
        row(6, "Explain. task=explain_answer [leak]", "It is so because of physics and chemistry together."),
        row(7, "Unclassifiable thing", "Some answer."),  # classifier answers nonsense -> default
        row(8, "Answer. task=open_qa [nomark]", "Paris is the capital of France."),
    ]
    out, dec, counts = run(table_of(rows), server)
    d = {r["id"]: r for r in dec.to_pylist()}
    assert [r["id"] for r in dec.to_pylist()] == [r["id"] for r in rows]
    assert d["r0"]["tag"] == "rewrite" and d["r0"]["reason"] == "rewritten" and d["r0"]["task"] == "explain_answer"
    final = {r["id"]: r["messages"][-1]["content"] for r in out.to_pylist()}
    # n=2 with distinct seeds: the seed-1 reply is longer and wins.
    assert final["r0"].startswith("1. Answer: Because air") and "3. Summary" in final["r0"]
    assert (d["r1"]["tag"], d["r1"]["reason"], final["r1"]) == ("original", "no_format", "Roses are red.")
    assert (d["r2"]["tag"], d["r2"]["reason"]) == ("original", "too_short")
    assert (d["r3"]["tag"], d["r3"]["reason"]) == ("rewrite", "rewritten")  # "B" stands alone in "B\n2. Why"
    assert (d["r4"]["tag"], d["r4"]["reason"]) == ("rewrite", "rewritten")
    assert (d["r5"]["tag"], d["r5"]["reason"]) == ("original", "code_mismatch")
    assert final["r5"] == "def add(a, b):\n    return a + b"
    assert (d["r6"]["tag"], d["r6"]["reason"]) == ("original", "leaked_scaffolding")
    assert (d["r7"]["task"], d["r7"]["reason"]) == ("default", "no_format")
    assert (d["r8"]["tag"], d["r8"]["reason"]) == ("original", "rewrite_unparsed")
    assert all(dec.column("kept").to_pylist())
    assert counts["rows_in"] == counts["rows_rewrite"] + counts["rows_original"] == len(rows)
    assert d["r0"]["score"] > 1 and d["r1"]["score"] is None
    assert out.schema == table_of(rows).schema  # only message content changes


def test_rewrite_requests_use_distinct_seeds(server):
    b = backend(server)
    prompts = [realign.rewrite_prompt(realign.load_prompt(realign.REWRITE_PROMPT), "q seeds", "x y z", "open_qa",
                                      realign.load_criteria()["open_qa"], [])]
    replies = realign.rewrite(prompts, b, GenParams(), n=3)
    seeds = sorted(e["body"]["seed"] for e in server.log if e["prompt"] == prompts[0][0]["content"])
    assert seeds == [0, 1, 2] and len(replies[0]) == 3


def test_failing_rewriter_keeps_originals_and_reports_failures():
    """Every rewrite request gets a 500 (after bounded retries): items are rewrite_failed, originals kept."""
    rows = [row(i, f"Question {i}? task=open_qa", f"Answer number {i} is long enough.") for i in range(4)]
    with FakeOpenAI(reply=play) as good, FakeOpenAI(reply=play, rate_500=1.0) as bad:
        out, dec, counts = realign.realign_table(table_of(rows), backend(good), backend(bad, max_retries=1,
                                                 backoff=0.01), count_tokens=words)
        assert sum(bad.counts().values()) == 4 * 2 * 2  # items x n x (1 try + 1 retry)
    assert dec.column("reason").to_pylist() == ["rewrite_failed"] * 4
    assert [r["messages"] for r in out.to_pylist()] == [r["messages"] for r in rows]
    assert counts["rows_original"] == 4


def test_flaky_server_gives_the_same_result_as_a_clean_one(server):
    rows = [row(i, f"Question {i}? task=open_qa", f"Answer number {i} is here and complete.") for i in range(12)]
    clean_out, clean_dec, _ = run(table_of(rows), server)
    with FakeOpenAI(reply=play, rate_429=0.1, rate_500=0.1, rate_malformed=0.1, seed=3) as flaky:
        b = backend(flaky, max_retries=8, backoff=0.01)
        out, dec, _ = realign.realign_table(table_of(rows), b, b, count_tokens=words)
        assert any(e["status"] != "ok" for e in flaky.log)  # faults did happen
    assert out.equals(clean_out) and dec.equals(clean_dec)


def test_cached_rerun_sends_nothing_again(tmp_path):
    rows = [row(i, f"Question {i}? task=how_to_generation", f"Do step {i} then stop there.") for i in range(5)]
    with FakeOpenAI(reply=play) as s:
        def cached(role):
            return CachedBackend(backend(s), tmp_path / f"{role}.sqlite", "fake")

        first = realign.realign_table(table_of(rows), cached("c"), cached("r"), count_tokens=words)
        sent = sum(s.counts().values())
        second = realign.realign_table(table_of(rows), cached("c"), cached("r"), count_tokens=words)
        assert sum(s.counts().values()) == sent == 5 + 5 * 2
    assert first[0].equals(second[0]) and first[1].equals(second[1])


def test_an_empty_shard_gives_empty_outputs(server):
    empty = table_of([row(0, "q", "a")]).slice(0, 0)
    out, dec, counts = run(empty, server)
    assert out.num_rows == dec.num_rows == counts["rows_in"] == 0


def test_rows_without_a_final_assistant_turn_are_an_error(server):
    bad = records_to_table([{"id": "x", "messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="row 0: field 'messages'"):
        run(bad, server)


# ---------------------------------------------------------------- filter rules one by one


@pytest.mark.parametrize("original, rewrite, expected", [
    ("A", "The answer is (A), since it fits.", (True, "rewritten")),
    ("A", "Apples are the answer here.", (False, "single_char_missing")),
    ("7", "We get 17 as the result.", (False, "single_char_missing")),
    ("True", "Yes.", (True, "rewritten")),
    ("False", "No, it is not.", (True, "rewritten")),
    ("```py\nx = 1\n```", "Set x to one, step by step, as shown in the text above here.", (False, "code_mismatch")),
    ("Just words here.", "Words:\n```\nprint(1)\n```", (False, "code_mismatch")),
    ("def f():\n    return 1", "```python\ndef f():\n    return 1\n```\nIt returns one.", (True, "rewritten")),
    ("one two three four five six", "one two three", (False, "too_short")),
    ("one two three four five six", "one two three four", (True, "rewritten")),
    ("a long enough original answer", "<<<REVISED>>> a long enough original answer indeed", (False,
                                                                                        "leaked_scaffolding")),
    ("a long enough original answer", "Revised response: a long enough original answer ok",
     (False, "leaked_scaffolding")),
])
def test_filter_rules(original, rewrite, expected):
    assert realign.select(original, rewrite, words) == expected


def test_parse_rewrite_needs_a_complete_section():
    assert realign.parse_rewrite(f"x {realign.START}\n body \n{realign.END} tail") == "body"
    assert realign.parse_rewrite(f"{realign.START} cut off") is None
    assert realign.parse_rewrite(f"{realign.START}\n\n{realign.END}") is None
    assert realign.parse_rewrite(None) is None
    assert realign.longest(["a b", None, "a b c", "x y z"], words) == "a b c"


# ---------------------------------------------------------------- retrieval


def test_clean_snippets_drops_boilerplate_dates_short_and_duplicates():
    raw = ["We use cookies to improve your experience on this site.", "Mar 3, 2021", "3 days ago ·",
           "Too short.", "Paris is the capital and largest city of France.",
           "paris is the capital and largest city of France", "Please enable JavaScript to view this page now.",
           "Subscribe to our newsletter for weekly updates today."] + [f"Fact number {i} about the city here."
                                                                       for i in range(8)]
    out = clean_snippets(raw)
    assert out[0] == "Paris is the capital and largest city of France."
    assert len(out) == 5 and not any("cookie" in s or "JavaScript" in s for s in out)


def test_bm25_retriever_on_a_small_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    docs = ["The Eiffel Tower stands in Paris, the capital of France.", "Bananas are rich in potassium and fibre.",
            "Mount Everest is the highest mountain above sea level.", "Paris hosts the Louvre museum of art works."]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    hits = BM25Retriever(corpus).search("What is the capital of France?")
    assert hits[0] == docs[0] and docs[1] not in hits
    lines = tmp_path / "corpus.txt"
    lines.write_text("\n".join(docs) + "\n\n")
    assert BM25Retriever(lines).search("highest mountain")[0] == docs[2]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": 1}\n')
    with pytest.raises(DataError, match="row 2: field 'text'"):
        BM25Retriever(tmp_path / "bad.jsonl")


def test_evidence_reaches_the_rewriter_only_for_retrieval_tasks(tmp_path, server):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Light from the sun is scattered by molecules of air in the sky.\n"
                      "Unrelated text about cooking pasta for dinner tonight.\n")
    rows = [row(0, "Why is the sky blue? task=explain_answer", "Because of scattering of light in the air."),
            row(1, "Why is the sky blue? task=text_summarization", "Because of scattering of light in the air.")]
    out, dec, counts = run(table_of(rows), server, retriever=BM25Retriever(corpus))
    final = [r["messages"][-1]["content"] for r in out.to_pylist()]
    assert "Sources: [1] Light from the sun" in final[0] and "Sources" not in final[1]
    assert counts["with_evidence"] == 1


@pytest.fixture
def serper():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append({"key": self.headers.get("X-API-KEY"),
                         "body": json.loads(self.rfile.read(int(self.headers["Content-Length"])))})
            if self.headers.get("X-API-KEY") != "serper-secret":
                self.send_response(403)
                self.end_headers()
                return
            data = json.dumps({"organic": [
                {"title": "a", "snippet": "The sky looks blue because air scatters short wavelengths."},
                {"title": "b", "snippet": "Accept cookies to continue browsing this website today."},
                {"title": "c"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/search", seen
    httpd.shutdown()
    httpd.server_close()


def test_serper_retriever_posts_query_with_key_header(serper, monkeypatch, capsys):
    url, seen = serper
    monkeypatch.setenv("MY_SERPER", "serper-secret")
    snippets = clean_snippets(SerperRetriever(url, "MY_SERPER").search("why is the sky blue"))
    assert snippets == ["The sky looks blue because air scatters short wavelengths."]
    assert seen[0] == {"key": "serper-secret", "body": {"q": "why is the sky blue"}}
    monkeypatch.setenv("MY_SERPER", "wrong-secret")
    assert SerperRetriever(url, "MY_SERPER", attempts=1).search("q") == []
    err = capsys.readouterr().err
    assert "HTTP 403" in err and "secret" not in err
    monkeypatch.delenv("MY_SERPER")
    with pytest.raises(ValueError, match="MY_SERPER is not set"):
        SerperRetriever(url, "MY_SERPER")


# ---------------------------------------------------------------- sharding, CLI, ReAlign JSON


def test_split_run_merge_cli_restores_order_and_checks_counts(tmp_path, server):
    rows = [row(i, f"Question {i}? task={'open_qa' if i % 3 else 'roleplay'}", f"Answer {i} is right here.")
            for i in range(10)]
    src = tmp_path / "in.parquet"
    write_table(table_of(rows), src)
    shards = [tmp_path / f"s{k}.parquet" for k in range(3)]
    realign.main(["split", "--input", str(src), "--outputs", *map(str, shards)])
    parts = [read_table(p) for p in shards]
    assert sum(p.num_rows for p in parts) == 10 and all(p.num_rows for p in parts)
    outs = [tmp_path / f"o{k}.parquet" for k in range(3)]
    decs = [tmp_path / f"d{k}.parquet" for k in range(3)]
    for k, shard in enumerate(shards):
        args = ["run", "--input", str(shard), "--output", str(outs[k]), "--decisions", str(decs[k]),
                "--classifier_model", "fake", "--rewriter_model", "fake", "--base_url", server.url,
                "--api_key_env", "FAKE_KEY", "--cache_dir", str(tmp_path / "cache"), "--concurrency", "4"]
        if k == 0:  # one shard as the rule runs it, in its own process, to see what it prints
            proc = subprocess.run([sys.executable, "-m", "workflow_scripts.realign", *args], cwd=ROOT, text=True,
                                  env=dict(os.environ, FAKE_KEY="sk-test-secret-123"), capture_output=True,
                                  timeout=60)
            assert proc.returncode == 0, proc.stderr
            assert "sk-test-secret-123" not in proc.stdout + proc.stderr
            assert "whitespace-separated words" in proc.stderr
        else:
            realign.main(args)
    cache_bytes = b"".join(p.read_bytes() for p in (tmp_path / "cache").glob("*.sqlite*"))
    assert b"sk-test-secret-123" not in cache_bytes
    merged, merged_dec = tmp_path / "m.parquet", tmp_path / "md.parquet"
    realign.main(["merge", "--input", str(src), "--shards", *map(str, outs), "--shard_decisions", *map(str, decs),
                  "--output", str(merged), "--decisions", str(merged_dec)])
    dec = pq.read_table(merged_dec).to_pylist()
    assert [r["id"] for r in read_table(merged).to_pylist()] == [r["id"] for r in rows] == [r["id"] for r in dec]
    assert sum(r["tag"] == "rewrite" for r in dec) == 6 and sum(r["reason"] == "no_format" for r in dec) == 4
    with pytest.raises(DataError, match="1 missing"):
        realign.merge_shards(table_of(rows), [read_table(p) for p in outs[:1]] + [read_table(outs[1]).slice(1)] +
                             [read_table(outs[2])], [pq.read_table(p) for p in decs], "x")


def test_realign_json_round_trip(tmp_path):
    items = [{"id": 0, "items": [{"from": "human", "value": "What is 2+2?", "category": "math_puzzles"},
                                 {"from": "gpt", "value": "4"}]},
             {"id": "abc", "items": [{"from": "system", "value": "Be brief."},
                                     {"from": "human", "value": "Hi", "category": "default"},
                                     {"from": "gpt", "value": "Hello!"}]}]
    src = tmp_path / "in.json"
    src.write_text(json.dumps(items))
    realign.main(["convert", "--input", str(src), "--output", str(tmp_path / "t.parquet")])
    table = read_table(tmp_path / "t.parquet")
    assert table.column("category").to_pylist() == ["math_puzzles", "default"]
    assert table.to_pylist()[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    realign.main(["convert", "--input", str(tmp_path / "t.parquet"), "--output", str(tmp_path / "back.json")])
    assert json.loads((tmp_path / "back.json").read_text()) == items
    (tmp_path / "bad.json").write_text(json.dumps([{"id": 1, "items": [{"from": "bot", "value": "x"}]}]))
    with pytest.raises(SystemExit):
        realign.main(["convert", "--input", str(tmp_path / "bad.json"), "--output", str(tmp_path / "x.parquet")])


def test_killed_run_resumes_from_the_cache_without_repeating_answers(tmp_path):
    rows = [row(i, f"Question {i}? task=open_qa", f"Answer {i} is right here.") for i in range(16)]
    src, out, dec = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "dec.parquet"
    write_table(table_of(rows), src)
    cmd = [sys.executable, "-m", "workflow_scripts.realign", "run", "--input", str(src), "--output", str(out),
           "--decisions", str(dec), "--classifier_model", "fake", "--rewriter_model", "fake",
           "--cache_dir", str(tmp_path / "cache"), "--concurrency", "4"]
    with FakeOpenAI(reply=play, latency=0.05) as s:
        proc = subprocess.Popen([*cmd, "--base_url", s.url], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while s.n_answered < 16 + 8 and time.time() < deadline:  # classified, and some rewrites done
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        assert not out.exists() and not dec.exists()
        first = s.n_answered
        assert 16 + 8 <= first < 16 + 32
        subprocess.run([*cmd, "--base_url", s.url], cwd=ROOT, check=True, capture_output=True, timeout=60)
        answered = [(e["prompt"], e["body"]["seed"]) for e in s.log if e["status"] == "ok"]
    repeats = len(answered) - len(set(answered))
    assert len(set(answered)) == 16 + 32
    assert repeats <= 4  # at most the requests in flight when it was killed
    assert [r["tag"] for r in pq.read_table(dec).to_pylist()] == ["rewrite"] * 16


# ---------------------------------------------------------------- options and the workflow's side


def test_job_paths_name_the_local_files_a_step_reads():
    step = {"method": "realign", "classifier_model": "tiny", "rewriter_model": "gpt-4o-mini", "tokenizer": "base"}
    assert realign.job_paths(step, {"tiny": {}}, "models/base/llama") == {
        "classifier_model": "models/base/tiny", "tokenizer": "models/base/llama"}
    step = {"method": "realign", "classifier_model": "a", "rewriter_model": "b", "retriever": "bm25",
            "corpus": "wiki.jsonl", "tokenizer": "tok"}
    assert realign.job_paths(step, {}, "models/base/llama") == {"corpus": "wiki.jsonl", "tokenizer": "tok"}


def test_run_takes_options_as_json_with_flags_on_top(capsys):
    common = ["run", "--input", "a", "--output", "b", "--decisions", "c"]
    step = {"classifier_model": "m", "rewriter_model": "m", "temperature": 0, "n": 3}
    opts = realign.parse_args([*common, "--options", json.dumps(step), "--n", "4"]).options
    assert opts.n == 4 and opts.temperature == 0.0 and isinstance(opts.temperature, float)
    assert opts.concurrency == 32 and opts.classifier_backend == "openai"  # RealignOptions' defaults
    assert realign.parse_args([*common, "--classifier_model", "x", "--rewriter_model", "y"]).options.n == 2
    for argv, message in [
        ([], "realign needs option 'classifier' (an `llms` entry) or 'classifier_model'"),
        (["--options", json.dumps({**step, "classifier": {"backend": "hf", "model": "m"}})],
         "give 'classifier' or 'classifier_model', not both"),
        (["--options", json.dumps({**step, "nn": 1})], "realign has no option 'nn'"),
        (["--options", json.dumps({**step, "n": 0})], "'n' must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as exc:
            realign.parse_args(common + argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_role_is_an_llms_entry_or_its_own_flat_options():
    common = ["run", "--input", "a", "--output", "b", "--decisions", "c"]
    step = {"classifier": {"backend": "hf", "model": "models/base/tiny", "dtype": "float32"},
            "rewriter_model": "gpt", "base_url": "http://127.0.0.1:9/v1", "timeout": 5}
    opts = realign.parse_args([*common, "--options", json.dumps(step)]).options
    assert realign.role_endpoint(opts, "classifier") == Endpoint("hf", "models/base/tiny", dtype="float32")
    assert realign.role_endpoint(opts, "rewriter") == Endpoint(
        "openai", "gpt", base_url="http://127.0.0.1:9/v1", concurrency=32, timeout=5.0)
    assert realign.runs_local_model(step) and not realign.runs_local_model({"rewriter_model": "x",
                                                                          "classifier_model": "y"})
    assert realign.role_backend({"rewriter": {"model": "m"}}, "rewriter") == "hf"
