"""A disk cache of LLM requests (SQLite, one row per request) and `CachedBackend`, which wraps any generation
backend so that only cache misses reach it and every answer is stored the moment it arrives.

The key is the sha256 of a canonical JSON of (model id, messages, max_new_tokens, temperature, top_p, seed, choice
index); API keys, URLs and timeouts never enter the key or the row. Rows are committed one by one in WAL mode, so a
killed run loses at most its in-flight requests and a rerun sends only the missing ones. Several threads and
several processes on one host may share a file; across cluster nodes on a network filesystem (where SQLite's WAL
does not work) give each shard its own file.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

SCHEMA = """CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, request TEXT NOT NULL, answer TEXT NOT NULL, created REAL NOT NULL)"""


def request_json(model_id: str, messages: list[dict] | str, params, choice: int = 0) -> str:
    """The canonical text of a request: only what changes the answer, keys sorted, no whitespace. A string is a
    raw-text prompt (a base model's completion), keyed apart from any chat."""
    prompt = ({"prompt": messages} if isinstance(messages, str)
              else {"messages": [{k: v for k, v in m.items() if v is not None} for m in messages]})
    req = {"model": model_id, **prompt,
           "max_new_tokens": int(params.max_new_tokens), "temperature": float(params.temperature),
           "top_p": float(params.top_p), "seed": int(params.seed), "choice": int(choice)}
    return json.dumps(req, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def request_key(model_id: str, messages: list[dict], params, choice: int = 0) -> str:
    return hashlib.sha256(request_json(model_id, messages, params, choice).encode("utf-8")).hexdigest()


def model_fingerprint(model: str) -> str:
    """A model id for the cache: the name, plus file names, sizes and mtimes when it is a local folder, so that
    retrained weights under the same path never answer from a stale cache."""
    path = Path(model)
    if not path.is_dir():
        return model
    stats = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in path.rglob("*") if f.is_file())
    return f"{model}@{hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]}"


class LLMCache:
    """key -> answer rows in one SQLite file; every put is its own committed transaction."""

    def __init__(self, path: str | os.PathLike, busy_timeout: float = 120.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by this process's threads, serialised by a lock; other processes wait on
        # SQLite's own busy timeout.
        self._db = sqlite3.connect(self.path, timeout=busy_timeout, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        deadline = time.monotonic() + busy_timeout
        with self._lock:
            while True:
                try:
                    self._db.execute("PRAGMA journal_mode=WAL")
                    # NORMAL in WAL mode survives a killed process (not a power cut) and skips an fsync per row.
                    self._db.execute("PRAGMA synchronous=NORMAL")
                    self._db.execute(SCHEMA)
                    break
                except sqlite3.OperationalError as err:
                    # Switching to WAL while another process creates the same file can fail at once with
                    # "database is locked", without SQLite's busy handler: wait and try again.
                    if "locked" not in str(err) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def get_many(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), 500):
                chunk = unique[start:start + 500]
                rows = self._db.execute(f"SELECT key, answer FROM answers WHERE key IN ({','.join('?' * len(chunk))})",
                                        chunk)
                found.update(rows.fetchall())
        return found

    def put(self, key: str, answer: str, model_id: str, request: str) -> None:
        """Store one answer; the first answer stored for a key wins (another shard may have raced us to it)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO answers (key, model, request, answer, created) VALUES (?,?,?,?,?)",
                             (key, model_id, request, answer, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class CachedBackend:
    """Any backend with `generate(prompts, params) -> list[str]`, answered from the cache where it can.

    After each call `hits` (items answered from the cache), `misses` (items not in it), `sent` (distinct requests
    passed to the backend: identical prompts in one call are sent once) and `failed` (requests that came back
    None under on_error="none") describe that call.
    """

    def __init__(self, backend, cache_path: str | os.PathLike, model_id: str):
        self.backend, self.model_id = backend, model_id
        self.cache = LLMCache(cache_path)
        self.name = getattr(backend, "name", type(backend).__name__)
        self.hits = self.misses = self.sent = self.failed = 0

    @property
    def chat_template(self) -> str:
        return getattr(self.backend, "chat_template", "")

    def generate(self, prompts: list[list[dict]], params, on_error: str = "raise",
                 on_result: Callable[[int, str | None], None] | None = None) -> list[str | None]:
        """Answers in input order. `on_result(index, answer)` is called once per item as its answer is known
        (cache hits first). With on_error="none" a backend that supports it may return None for a failed item;
        failures are not cached, so a rerun retries them."""
        requests = [request_json(self.model_id, p, params) for p in prompts]
        keys = [hashlib.sha256(r.encode("utf-8")).hexdigest() for r in requests]
        found = self.cache.get_many(keys)
        out: list[str | None] = [found.get(k) for k in keys]
        todo = [i for i, k in enumerate(keys) if k not in found]
        first_of: dict[str, int] = {}
        for i in todo:
            first_of.setdefault(keys[i], i)
        send = list(first_of.values())  # indexes into prompts, one per distinct missing request
        self.hits, self.misses, self.sent, self.failed = len(prompts) - len(todo), len(todo), len(send), 0
        if on_result:
            for i, answer in enumerate(out):
                if answer is not None:
                    on_result(i, answer)
        if not send:
            return out
        waiting: dict[str, list[int]] = {}
        for i in todo:
            waiting.setdefault(keys[i], []).append(i)

        def store(j: int, answer: str | None) -> None:
            i = send[j]
            if answer is None:
                self.failed += 1
            else:
                self.cache.put(keys[i], answer, self.model_id, requests[i])
            for k in waiting[keys[i]]:
                out[k] = answer
                if on_result:
                    on_result(k, answer)

        kwargs = {}
        if _accepts(self.backend.generate, "on_error"):
            kwargs["on_error"] = on_error
        sub = [prompts[i] for i in send]
        if _accepts(self.backend.generate, "on_result"):
            self.backend.generate(sub, params, on_result=store, **kwargs)
        else:
            for j, answer in enumerate(self.backend.generate(sub, params, **kwargs)):
                store(j, answer)
        return out
