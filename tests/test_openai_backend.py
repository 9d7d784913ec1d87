"""The `openai` backend with the real openai client against a real local server (tests/fake_openai.py): order,
params, secrets, retries under faults, timeouts, per-item failures, an unreachable server, and a killed CLI run
resumed from its request cache."""

import logging
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI

from workflow_scripts import generate, io, llm
from workflow_scripts.llm_cache import CachedBackend

KEY = "sk-test-5f1e9c0d7a"
REPO = Path(__file__).resolve().parents[1]


def chat(text):
    return [{"role": "user", "content": text}]


def backend_for(server, **opts):
    opts = {"concurrency": 8, "timeout": 2.0, "max_retries": 10, "backoff": 0.01, **opts}
    return llm.OpenAIBackend("judge-model", base_url=server.url, api_key_env="SAFEFT_TEST_KEY", **opts)


def file_bytes(path):
    """The cache file and its WAL side files, where a leaked secret could hide."""
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("SAFEFT_TEST_KEY", KEY)


def test_keeps_order_sends_params_and_never_leaks_the_key(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # the openai client and httpx log at debug level: they must not leak it either
    with FakeOpenAI(latency=(0.0, 0.01)) as server:
        endpoint = llm.Endpoint("openai", "judge-model", base_url=server.url, api_key_env="SAFEFT_TEST_KEY")
        backend = llm.make_backend(endpoint)
        cached = CachedBackend(backend, tmp_path / "cache.sqlite", "openai:judge-model")
        out = cached.generate([chat(f"q{i}") for i in range(12)], llm.GenParams(max_new_tokens=7, seed=3))
        first = server.log[0]
    assert out == [f"echo: q{i}" for i in range(12)]
    assert len(server.log) == 12 and first["auth"] == f"Bearer {KEY}"
    assert first["body"]["model"] == "judge-model" and first["body"]["max_tokens"] == 7
    assert first["body"]["seed"] == 3 and first["body"]["temperature"] == 0 and first["body"]["top_p"] == 1
    assert len(cached.cache) == 12
    assert KEY.encode() not in file_bytes(tmp_path / "cache.sqlite")
    assert server.url.encode() not in file_bytes(tmp_path / "cache.sqlite")

    with FakeOpenAI(rate_500=1.0) as server:
        with pytest.raises(llm.LLMRequestError) as err:
            backend_for(server, max_retries=1).generate([chat("q")], llm.GenParams())
        assert str(err.value).startswith(f"request to {server.url}/chat/completions failed after 2 attempts: HTTP 500")
    assert KEY not in str(err.value) and KEY not in repr(err.value)
    assert KEY not in caplog.text


def test_faults_latency_and_500_items_through_the_cache(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cache = tmp_path / "cache.sqlite"
    prompts = [chat(f"question {i}") for i in range(500)]
    with FakeOpenAI(latency=(0.005, 0.02), rate_429=0.1, rate_500=0.1, rate_malformed=0.1) as server:
        cached = CachedBackend(backend_for(server, concurrency=16), cache, "openai:judge-model")
        out = cached.generate(prompts, llm.GenParams(max_new_tokens=16))
        statuses = [r["status"] for r in server.log]
        answered = server.answered()
    assert out == [f"echo: question {i}" for i in range(500)]
    assert {"429", "500", "malformed"} <= set(statuses) and statuses.count("ok") == 500
    assert 0.2 < 1 - 500 / len(statuses) < 0.4  # about 30% of the attempts failed and were retried
    assert sorted(answered) == sorted(p[0]["content"] for p in prompts) and set(answered.values()) == {1}
    assert (cached.hits, cached.misses, cached.sent, cached.failed) == (0, 500, 500, 0)
    db = sqlite3.connect(cache)
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM answers").fetchone() == (500, 500)
    assert sorted(a for (a,) in db.execute("SELECT answer FROM answers")) == sorted(out)
    db.close()
    assert KEY.encode() not in file_bytes(cache) and KEY not in caplog.text


def test_hanging_requests_time_out_and_are_retried():
    with FakeOpenAI(rate_hang=0.3, hang_s=10.0, seed=1) as server:
        start = time.perf_counter()
        out = backend_for(server, timeout=0.3).generate([chat(f"h{i}") for i in range(16)], llm.GenParams())
        seconds = time.perf_counter() - start
        hung = sum(r["status"] == "hang" for r in server.log)
    assert out == [f"echo: h{i}" for i in range(16)]
    assert hung >= 1 and seconds < 6  # each hang costs a 0.3 s timeout, not the server's 10 s


def test_per_item_failures_raise_or_become_none(tmp_path):
    def picky(messages, body):
        if "bad" in messages[-1]["content"]:
            raise ValueError("unsupported prompt")
        return "fine"

    prompts = [chat("good 1"), chat("bad 2"), chat("good 3")]
    with FakeOpenAI(reply=picky) as server:
        with pytest.raises(llm.LLMRequestError, match="HTTP 400: unsupported prompt"):
            backend_for(server).generate(prompts, llm.GenParams())
        assert server.counts()["bad 2"] == 1  # a 400 is the request's fault: not retried
        seen = []
        cached = CachedBackend(backend_for(server), tmp_path / "c.sqlite", "m")
        out = cached.generate(prompts, llm.GenParams(), on_error="none", on_result=lambda i, a: seen.append(i))
        assert out == ["fine", None, "fine"] and sorted(seen) == [0, 1, 2] and cached.failed == 1
        assert len(cached.cache) == 2  # a failure is not cached: a rerun asks again
        cached.generate(prompts, llm.GenParams(), on_error="none")
        assert (cached.hits, cached.sent) == (2, 1) and server.counts()["bad 2"] == 3


def test_an_answer_is_handed_over_before_its_worker_sends_another_request():
    # A slow callback (a busy disk cache) must hold its worker back: otherwise answers pile up unstored and a
    # killed run repeats more than the requests it had in flight.
    unstored = []
    with FakeOpenAI(latency=0.005) as server:
        def slow_store(i, answer):
            unstored.append(server.n_answered - len(unstored))
            time.sleep(0.03)

        backend_for(server, concurrency=3).generate([chat(f"q{i}") for i in range(24)], llm.GenParams(),
                                                    on_result=slow_store)
    assert len(unstored) == 24 and max(unstored) <= 3


def test_unreachable_server_fails_fast_naming_the_url_without_credentials(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = llm.OpenAIBackend("m", base_url=f"http://user:hunter2@127.0.0.1:{port}/v1",
                                     api_key_env="SAFEFT_TEST_KEY", timeout=0.5, max_retries=2, backoff=0.01)
    start = time.perf_counter()
    with pytest.raises(llm.ServerUnreachable) as err:
        backend.generate([chat(f"q{i}") for i in range(20)], llm.GenParams(), on_error="none")
    message = str(err.value)
    assert time.perf_counter() - start < 5
    assert message.startswith(f"cannot reach http://127.0.0.1:{port}/v1/chat/completions (connection failed")
    assert "hunter2" not in message and "user" not in message and KEY not in message and "\n" not in message

    evals = tmp_path / "evals.parquet"
    io.write_table(io.records_to_table([{"id": "a", "messages": chat("q")}]), evals)
    with pytest.raises(SystemExit) as exit_:
        generate.main(["--backend", "openai", "--model", "m", "--base_url", f"http://127.0.0.1:{port}/v1",
                       "--api_key_env", "SAFEFT_TEST_KEY", "--input", str(evals), "--timeout", "0.5",
                       "--output", str(tmp_path / "o.parquet"), "--max_retries", "1", "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith(f"error: cannot reach http://127.0.0.1:{port}/v1/chat/completions")
    assert err.count("\n") == 1 and not (tmp_path / "o.parquet").exists()


def count_rows(path):
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    finally:
        db.close()


def test_killed_cli_run_resumes_from_the_cache(tmp_path, capsys):
    evals = tmp_path / "evals.parquet"
    io.write_table(io.records_to_table(
        {"id": f"p{i:03d}", "messages": chat(f"prompt {i}"), "category": "demo"} for i in range(500)), evals)
    out, cache = tmp_path / "out.parquet", tmp_path / "cache.sqlite"
    with FakeOpenAI(latency=0.02) as server:
        argv = ["--backend", "openai", "--model", "judge-model", "--base_url", server.url,
                "--api_key_env", "SAFEFT_TEST_KEY", "--input", str(evals), "--output", str(out), "--cache", str(cache),
                "--concurrency", "8", "--timeout", "5", "--max_retries", "2", "--max_new_tokens", "8"]
        proc = subprocess.Popen([sys.executable, "-m", "workflow_scripts.generate", *argv], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while server.n_answered < 250 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        logs = proc.communicate()[0].decode()
        assert proc.returncode == -signal.SIGKILL, logs
        server.wait_idle()  # requests the dead client left in flight are answered into the void
        before = server.answered()
        stored = count_rows(cache)
        assert 200 <= stored < 500 and stored <= sum(before.values())
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if "out" in p.name) == []

        generate.main(argv)  # the rerun, in this process
        resent = server.answered() - before
    printed = capsys.readouterr().out
    assert f"{stored} hits, {500 - stored} misses, {500 - stored} sent" in printed
    assert sum(resent.values()) == 500 - stored and set(resent.values()) == {1}
    assert sum((before + resent).values()) - 500 <= 8  # only answers in flight at the kill were asked twice
    table = io.read_table(out).to_pylist()
    assert [r["id"] for r in table] == [f"p{i:03d}" for i in range(500)]
    assert [r["completion"] for r in table] == [f"echo: prompt {i}" for i in range(500)]
    assert count_rows(cache) == 500
    assert KEY not in logs and KEY not in printed and KEY.encode() not in file_bytes(cache) + out.read_bytes()
