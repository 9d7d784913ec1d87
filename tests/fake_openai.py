"""A small real OpenAI-compatible chat server on 127.0.0.1 for tests and benchmarks, with injectable faults.

    from fake_openai import FakeOpenAI   # tests/ is on sys.path under pytest; bench scripts add it

    with FakeOpenAI(latency=(0.005, 0.02), rate_429=0.1, rate_500=0.1, rate_malformed=0.1) as server:
        backend = OpenAIBackend("m", base_url=server.url, ...)   # server.url = "http://127.0.0.1:PORT/v1"
        ...
        server.counts()      # Counter: prompt -> POSTs received (every attempt, faults included)
        server.answered()    # Counter: prompt -> well-formed 200 answers sent
        server.n_answered    # total well-formed 200 answers so far (poll it to kill a client half-way)
        server.wait_idle()   # until no request is being served (after killing a client mid-run)
        server.log           # one dict per POST: prompt, status (ok 400 429 500 malformed hang), auth, body

Only POST /v1/chat/completions is served. The "prompt" of a request is its last message's content.
`reply(messages, body) -> str` makes the answer (default: "echo: " + prompt); a reply function that raises
ValueError gets the request a 400 with that message, like a server rejecting a bad request. `latency` is seconds:
a number, a (low, high) range drawn uniformly, or a function of the request body. Each fault rate is the share of
requests that get it: `rate_429` (429 with Retry-After of `retry_after` seconds), `rate_500`, `rate_malformed` (a
200 whose body is truncated JSON or JSON without choices) and `rate_hang` (no answer for `hang_s` seconds, then the
connection is closed). Faults and random latencies are drawn from (seed, prompt, attempt number), so a run is
reproducible whatever the thread interleaving. The server stops on `stop()` / leaving the `with` block, and its
threads are daemons, so a forgotten server never keeps the interpreter alive.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def echo_reply(messages: list[dict], body: dict) -> str:
    return "echo: " + messages[-1]["content"]


class FakeOpenAI:
    def __init__(self, reply: Callable[[list[dict], dict], str] = echo_reply,
                 latency: float | tuple[float, float] | Callable[[dict], float] = 0.0,
                 rate_429: float = 0.0, rate_500: float = 0.0, rate_malformed: float = 0.0, rate_hang: float = 0.0,
                 retry_after: float = 0.01, hang_s: float = 5.0, seed: int = 0):
        self.reply, self.latency, self.seed = reply, latency, seed
        self.rates = [("429", rate_429), ("500", rate_500), ("malformed", rate_malformed), ("hang", rate_hang)]
        self.retry_after, self.hang_s = retry_after, hang_s
        self.log: list[dict] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self.url = ""  # set by start(), kept after stop() for messages that name it

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real server
            # One buffered write per answer and no Nagle delay: otherwise headers and body go out as two small
            # segments and delayed ACKs add ~40 ms to every request.
            wbufsize = 1 << 16
            disable_nagle_algorithm = True

            def do_POST(self):
                fake._serve(self)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # hanging handlers must not hold up stop()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request log ---------------------------------------------------------------------------------------------
    def counts(self) -> Counter:
        with self._lock:
            return Counter(r["prompt"] for r in self.log)

    def answered(self) -> Counter:
        with self._lock:
            return Counter(r["prompt"] for r in self.log if r["status"] == "ok")

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no request is still being served (e.g. those of a client that was just killed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if all(r["status"] != "pending" for r in self.log):
                    return
            time.sleep(0.005)
        raise TimeoutError(f"{self.url}: requests still pending after {timeout} s")

    @property
    def n_answered(self) -> int:
        with self._lock:
            return sum(r["status"] == "ok" for r in self.log)

    # -- serving ------------------------------------------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))) or b"{}")
        if h.path.rstrip("/") != "/v1/chat/completions":
            return self._send(h, 404, {"error": {"message": f"no route {h.path}", "type": "not_found"}})
        prompt = body["messages"][-1]["content"]
        entry = {"prompt": prompt, "status": "pending", "auth": h.headers.get("Authorization"), "body": body}
        with self._lock:
            attempt = sum(r["prompt"] == prompt for r in self.log)
            self.log.append(entry)
        rng = random.Random(f"{self.seed}|{prompt}|{attempt}")
        fault, draw = None, rng.random()
        for name, rate in self.rates:
            if draw < rate:
                fault = name
                break
            draw -= rate
        delay = self.latency(body) if callable(self.latency) else (
            rng.uniform(*self.latency) if isinstance(self.latency, tuple) else self.latency)
        if self._stopping.wait(delay):
            return
        entry["status"] = fault or "ok"
        try:
            if fault == "hang":
                self._stopping.wait(self.hang_s)
                h.close_connection = True
            elif fault == "429":
                self._send(h, 429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                           {"Retry-After": f"{self.retry_after:g}"})
            elif fault == "500":
                self._send(h, 500, {"error": {"message": "boom", "type": "server_error"}})
            elif fault == "malformed":
                data = b'{"id": "x", "choices": [{"index": 0, "mess' if rng.random() < 0.5 else b'{"id": "x"}'
                self._send(h, 200, data)
            else:
                try:
                    content = self.reply(body["messages"], body)
                except ValueError as err:
                    entry["status"] = "400"
                    return self._send(h, 400, {"error": {"message": str(err), "type": "invalid_request_error"}})
                # A reply function may return (text, tokens): tokens as [(token, logprob, {alternative: logprob})],
                # sent as the reply's logprobs when the request asks for them.
                content, tokens = content if isinstance(content, tuple) else (content, None)
                choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
                if body.get("logprobs") and tokens is not None:
                    choice["logprobs"] = {"content": [
                        {"token": t, "logprob": lp, "bytes": None,
                         "top_logprobs": [{"token": a, "logprob": alp, "bytes": None} for a, alp in top.items()]}
                        for t, lp, top in tokens]}
                self._send(h, 200, {
                    "id": f"chatcmpl-{attempt}", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        except OSError:
            pass  # the client gave up (timeout) and closed its end

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()
