"""The disk request cache: canonical keys, hit/miss/sent counters, answers stored as they arrive, and one SQLite
file shared by threads and by processes."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from workflow_scripts.llm import GenParams
from workflow_scripts.llm_cache import CachedBackend, LLMCache, model_fingerprint, request_json, request_key

REPO = Path(__file__).resolve().parents[1]


def chat(text):
    return [{"role": "user", "content": text}]


class Upper:
    """A local backend: upper-cases the prompt, records what it was asked, can fail on chosen prompts."""

    name = "upper"
    chat_template = "tmpl"

    def __init__(self, fail_on=(), die_after=None):
        self.asked, self.fail_on, self.die_after = [], set(fail_on), die_after

    def generate(self, prompts, params, on_result=None, on_error="raise"):
        out = []
        for i, p in enumerate(prompts):
            if self.die_after is not None and i == self.die_after:
                raise KeyboardInterrupt  # stands for a kill part-way through the call
            self.asked.append(p[-1]["content"])
            answer = None if p[-1]["content"] in self.fail_on else p[-1]["content"].upper()
            out.append(answer)
            if on_result:
                on_result(i, answer)
        return out


class PlainUpper:
    """A backend with only generate(prompts, params), like a third-party one."""

    def __init__(self):
        self.asked = []

    def generate(self, prompts, params):
        self.asked += [p[-1]["content"] for p in prompts]
        return [p[-1]["content"].upper() for p in prompts]


def test_key_covers_what_changes_the_answer_and_nothing_else():
    base = request_key("m", chat("hi"), GenParams())
    assert base == request_key("m", [{"content": "hi", "role": "user"}], GenParams(batch_size=1))
    variants = [request_key("m2", chat("hi"), GenParams()), request_key("m", chat("hi!"), GenParams()),
                request_key("m", [{"role": "system", "content": "s"}, *chat("hi")], GenParams()),
                request_key("m", chat("hi"), GenParams(max_new_tokens=9)),
                request_key("m", chat("hi"), GenParams(temperature=0.7)),
                request_key("m", chat("hi"), GenParams(top_p=0.9)), request_key("m", chat("hi"), GenParams(seed=1)),
                request_key("m", chat("hi"), GenParams(), choice=1)]
    assert len({base, *variants}) == 1 + len(variants)
    assert set(json.loads(request_json("m", chat("hi"), GenParams()))) == {
        "model", "messages", "max_new_tokens", "temperature", "top_p", "seed", "choice"}


def test_hits_misses_sent_and_duplicates(tmp_path):
    backend = Upper()
    cached = CachedBackend(backend, tmp_path / "c.sqlite", "upper")
    params = GenParams()
    assert cached.generate([chat("a"), chat("b"), chat("a")], params) == ["A", "B", "A"]
    assert (cached.hits, cached.misses, cached.sent) == (0, 3, 2) and backend.asked == ["a", "b"]
    seen = {}
    out = cached.generate([chat("c"), chat("b"), chat("a")], params, on_result=seen.__setitem__)
    assert out == ["C", "B", "A"] and seen == {0: "C", 1: "B", 2: "A"}
    assert (cached.hits, cached.misses, cached.sent) == (2, 1, 1) and backend.asked == ["a", "b", "c"]
    assert cached.name == "upper" and cached.chat_template == "tmpl" and len(cached.cache) == 3
    # Other params are other requests.
    cached.generate([chat("a")], GenParams(max_new_tokens=3))
    assert cached.sent == 1 and len(cached.cache) == 4


def test_answers_are_stored_as_they_arrive_so_a_rerun_sends_only_the_rest(tmp_path):
    prompts = [chat(f"p{i}") for i in range(10)]
    with pytest.raises(KeyboardInterrupt):
        CachedBackend(Upper(die_after=6), tmp_path / "c.sqlite", "upper").generate(prompts, GenParams())
    again = Upper()
    cached = CachedBackend(again, tmp_path / "c.sqlite", "upper")
    assert cached.generate(prompts, GenParams()) == [f"P{i}" for i in range(10)]
    assert again.asked == ["p6", "p7", "p8", "p9"] and (cached.hits, cached.sent) == (6, 4)


def test_failures_are_not_cached_and_plain_backends_work(tmp_path):
    cached = CachedBackend(Upper(fail_on={"b"}), tmp_path / "c.sqlite", "upper")
    assert cached.generate([chat("a"), chat("b")], GenParams(), on_error="none") == ["A", None]
    assert cached.failed == 1 and len(cached.cache) == 1
    plain = PlainUpper()
    cached = CachedBackend(plain, tmp_path / "c.sqlite", "upper")
    assert cached.generate([chat("a"), chat("b")], GenParams()) == ["A", "B"]
    assert plain.asked == ["b"] and cached.name == "PlainUpper" and len(cached.cache) == 2


def test_threads_share_one_cache(tmp_path):
    cache = LLMCache(tmp_path / "c.sqlite")
    errors = []

    def work(t):
        try:
            for i in range(60):
                key = f"k{(t * 30 + i) % 200}"  # neighbouring threads overlap
                cache.put(key, f"a{key}", "m", "{}")
                assert cache.get_many([key]) == {key: f"a{key}"}
        except Exception as err:  # collected and reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(cache) == 200


WRITER = """
import sys
from workflow_scripts.llm_cache import LLMCache
cache = LLMCache(sys.argv[1])
start = int(sys.argv[2])
for i in range(start, start + 150):
    cache.put(f"k{i}", f"a{i}", "m", "{}")
    assert cache.get_many([f"k{i}"]) == {f"k{i}": f"a{i}"}
"""


def test_processes_share_one_file(tmp_path):
    path = tmp_path / "shared.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(start)], env=env, cwd=REPO,
                              stderr=subprocess.PIPE) for start in (0, 100, 200)]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    cache = LLMCache(path)
    assert len(cache) == 350 and cache.get_many(["k0", "k349", "k350"]) == {"k0": "a0", "k349": "a349"}


def test_model_fingerprint_follows_local_weights(tmp_path):
    assert model_fingerprint("gpt-4o-mini") == "gpt-4o-mini"
    (tmp_path / "model.safetensors").write_bytes(b"x")
    first = model_fingerprint(str(tmp_path))
    assert first.startswith(f"{tmp_path}@") and model_fingerprint(str(tmp_path)) == first
    (tmp_path / "model.safetensors").write_bytes(b"xy")
    assert model_fingerprint(str(tmp_path)) != first
