"""The answer cache is keyed by what answers: a round retrained on other settings never reads the answers its
old policy gave through the same server under the same model name (a real server process on loopback)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import run_cli, write_recipe

ANSWERS = ["I cannot help with that.", "Sure, mix the flour and the water, then bake it.",
           "Please ask a professional about this.", "Here are three steps: first, second, third."]


@pytest.fixture
def policy_server():
    """An OpenAI-compatible server whose answer depends on the request alone; it counts the completions asked."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._json({"object": "list", "data": [{"id": "policy", "object": "model"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            with self.server.lock:
                self.server.posts += 1
            digest = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).digest()
            text = ANSWERS[digest[0] % len(ANSWERS)]
            self._json({"id": "x", "object": "chat.completion", "model": body["model"], "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})

        def _json(self, data):
            raw = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.posts, server.lock = 0, threading.Lock()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_a_retrained_round_never_reads_answers_cached_for_the_old_policy(tiny_model, policy_server, tmp_path):
    server, url = policy_server
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "run", eval="{early_stop_drop: null, "
                          "capability_limit: 4}")
    on_server = ["--set", f"generation.base_url={url}", "--set", "generation.model=policy",
                 "--set", "generation.concurrency=2", "--set", "data.eval_limit=1"]

    def run(*extra) -> int:
        before = server.posts
        proc = run_cli(str(recipe), *on_server, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return server.posts - before

    round_1 = run("--set", "rounds=1")
    round_2 = run("--set", "rounds=2")  # round 1 is done: only round 2 asks the server
    assert round_1 > 0 and round_2 > 0
    assert run("--set", "rounds=2") == 0  # nothing redone, nothing asked
    # dpo.beta retrains round 1, so round 2 starts from another policy: its requests are the same strings, but
    # every one must reach the server again (with the cache keyed by model name alone, none did)
    assert run("--set", "rounds=2", "--set", "dpo.beta=0.3") == round_2
    caches = [p for p in (tmp_path / "run" / "cache" / "api").rglob("*.json")]
    assert len(caches) == round_1 + 2 * round_2  # round 2's answers kept per policy, never overwritten
