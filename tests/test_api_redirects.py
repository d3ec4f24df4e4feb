"""The API client never carries its key through a redirect: a redirecting server gets one clear error, and the
address it points to receives nothing. Real servers on loopback: one that redirects, one that records who calls."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lora_cai.engine.api import ChatClient, check_server
from lora_cai.errors import UserError

KEY = "sk-redirect-test-0b7e-never-forward-me"


def _server(handler_cls):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def servers():
    """(redirecting base url, target server): every request to the first is sent on to the second with `code`."""
    started = []

    class Target(BaseHTTPRequestHandler):
        def _answer(self):
            self.server.seen.append({"path": self.path, "authorization": self.headers.get("Authorization")})
            body = json.dumps({"object": "list", "data": [{"id": "m"}]} if self.path.endswith("/models") else
                              {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                            "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    target, target_url = _server(Target)
    started.append(target)

    def redirecting(code: int):
        class Redirect(BaseHTTPRequestHandler):
            def _redirect(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self.server.seen.append({"path": self.path, "authorization": self.headers.get("Authorization")})
                self.send_response(code)
                self.send_header("Location", target_url + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _redirect

            def log_message(self, *args):
                pass

        server, url = _server(Redirect)
        started.append(server)
        return server, url + "/v1"

    yield redirecting, target
    for s in started:
        s.shutdown()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_and_the_key_goes_nowhere(servers, code, monkeypatch):
    redirecting, target = servers
    monkeypatch.setenv("LORA_CAI_TEST_REDIRECT_KEY", KEY)
    source, url = redirecting(code)
    client = ChatClient(url, "m", api_key_env="LORA_CAI_TEST_REDIRECT_KEY", max_retries=2, backoff=0.001, timeout=5)
    answer, = client.chat_many([{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}])
    assert answer["text"] is None
    assert f"HTTP {code} redirect to http://127.0.0.1:{target.server_address[1]}/v1/chat/completions" in answer["error"]
    assert "not followed" in answer["error"] and KEY not in answer["error"]
    assert client.stats.retries == 0 and len(source.seen) == 1  # an error, not a retry
    assert source.seen[0]["authorization"] == f"Bearer {KEY}"  # the server it was given did get the key
    with pytest.raises(UserError, match=f"HTTP {code} redirect to .*not followed") as e:
        check_server(url, "LORA_CAI_TEST_REDIRECT_KEY")
    assert "\n" not in str(e.value)
    assert target.seen == []  # the address redirected to received nothing, key or not


def test_the_same_client_reaches_a_server_that_does_not_redirect(servers, monkeypatch):
    """What the refusal must not break: a plain server gets the request and the key."""
    _, target = servers
    monkeypatch.setenv("LORA_CAI_TEST_REDIRECT_KEY", KEY)
    url = f"http://127.0.0.1:{target.server_address[1]}/v1"
    client = ChatClient(url, "m", api_key_env="LORA_CAI_TEST_REDIRECT_KEY", backoff=0.001, timeout=5)
    assert client.chat([{"role": "user", "content": "hi"}], max_tokens=4)["text"] == "hello"
    check_server(url, "LORA_CAI_TEST_REDIRECT_KEY")
    assert [s["authorization"] for s in target.seen] == [f"Bearer {KEY}"] * 2
