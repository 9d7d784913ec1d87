"""The `openai` backend against a small OpenAI-compatible server on 127.0.0.1 (the real openai client)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workflow_scripts import generate


@pytest.fixture
def server():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop", "message": {
                         "role": "assistant", "content": "echo: " + body["messages"][-1]["content"]}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    httpd.shutdown()


def test_openai_backend_keeps_order_and_sends_params(server, monkeypatch):
    url, seen = server
    monkeypatch.setenv("MY_KEY", "secret-token")
    backend = generate.make_backend("openai", "judge-model", base_url=url, api_key_env="MY_KEY")
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    out = backend.generate(prompts, generate.GenParams(max_new_tokens=7, temperature=0.0))
    assert out == [f"echo: q{i}" for i in range(6)]
    assert len(seen) == 6 and all(s["path"] == "/v1/chat/completions" for s in seen)
    assert seen[0]["auth"] == "Bearer secret-token"
    assert seen[0]["body"]["max_tokens"] == 7 and seen[0]["body"]["model"] == "judge-model"
