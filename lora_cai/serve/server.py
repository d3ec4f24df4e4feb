"""An OpenAI-compatible HTTP server for a run's base and rounds, or for one model directory.

    python -m lora_cai.serve RUN_OR_MODEL_DIR [--host 127.0.0.1] [--port 8000] [--model-name NAME]
                             [--api-key-env VAR] [--max-body-bytes N]

A run directory (it has `manifest.json`) is served as the base model and every round of the run, under the names
`lora_cai.serve.models` defines: `base`, and `round-k` for the policy after round k's training (what
`lora_cai.load_policy(RUN, upto=k)` computes). The base is loaded once; the request's `model` field picks which
round's adapter is switched in. Rounds finished or retrained while the server runs are picked up at the next
request. A transformers model directory is served alone (fp32, CPU) under `--model-name` (default: its name).

* `GET /v1/models` — the served names;
* `POST /v1/chat/completions` — messages rendered with the tokenizer's chat template, generated as the engine
  generates (greedy when `temperature` is 0, seeded sampling otherwise; `seed`, `top_p`, `stop`,
  `max_tokens`/`max_completion_tokens`), in OpenAI's response shape with `usage`. `logprobs: true` (and
  `top_logprobs`, 0..20) adds OpenAI-style per-token log-probs. `stream: true` answers with server-sent events,
  one `chat.completion.chunk` per piece of text as it is generated, ending with `data: [DONE]`.

Refusals are OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`) with one line of message:
404 for a model not served, 413 for a body over `--max-body-bytes` (1 MiB; refused from its Content-Length before
it is read, before the key is checked), 401 for a missing or wrong key (`--api-key-env`), 400 for any malformed
field. Nothing of a request is kept after it is answered.

Not a production server: one generation at a time (a lock), no batching across requests, `n = 1`. For throughput
use vLLM/SGLang/TGI; `lora_cai.engine.api.ChatClient` speaks to all of them.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lora_cai.errors import UserError
from lora_cai.serve.requests import MAX_TOP_LOGPROBS, BadRequest

__all__ = ["ChatHandler", "ChatServer", "load_model", "main", "run_in_thread", "start_server"]

MAX_BODY_BYTES = 1 << 20


class ChatServer(ThreadingHTTPServer):
    """The HTTP server object: the served models (`serve_models.OneModel` or `RunModels`), the settings, and the
    lock that lets one generation run at a time."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, models, *, handler=None, api_key: str | None = None, max_tokens_default: int = 256,
                 max_top_logprobs: int = MAX_TOP_LOGPROBS, max_body_bytes: int = MAX_BODY_BYTES):
        super().__init__(address, handler or ChatHandler)
        self.models = models
        self.api_key = api_key
        self.max_tokens_default = max_tokens_default
        self.max_top_logprobs = max_top_logprobs
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.generate_lock = threading.Lock()
        self._closed = False
        self._connections: set = set()  # open client sockets, shut at close so no handler thread outlives it
        self._connections_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def refresh(self) -> list[str]:
        """The served names, after looking at the run again (call under `generate_lock`); 503 while a round's
        adapter is missing (a run being restarted)."""
        try:
            self.models.refresh()
        except UserError as e:
            raise BadRequest(f"the run directory changed under the server: {e}", status=503) from None
        return self.models.names()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early when the server shuts down; True when it is still serving."""
        deadline = time.monotonic() + seconds
        while not self._closed and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return not self._closed

    def shutdown(self) -> None:
        """Stop serving (when `serve_forever` runs in another thread), close the socket, and wait for a
        generation in progress to end, so the model is free for the caller when this returns."""
        if self._closed:
            return
        super().shutdown()
        self.close()

    def close(self) -> None:
        """Close the socket, wait for a generation still running in a handler thread (up to a minute), then end
        the clients' idle keep-alive connections: a handler thread left waiting on one would wake during the
        interpreter's shutdown, and that aborted the process (SIGABRT) once a client closed it then."""
        self._closed = True
        self.server_close()
        if self.generate_lock.acquire(timeout=60):
            self.generate_lock.release()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ChatHandler(BaseHTTPRequestHandler):
    """One connection's requests: routing, the body limit, the key, and the replies (JSON or server-sent events)."""

    server: ChatServer
    protocol_version = "HTTP/1.1"
    server_version = "lora_cai-serve"

    def log_message(self, format, *args):  # noqa: A002 - quiet: no per-request lines on stderr
        pass

    # -------------------------------------------------------------------------------------- replies

    def send_json(self, status: int, payload: Any = None, *, raw: bytes | None = None, headers: dict | None = None):
        body = raw if raw is not None else json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. its timeout)
            self.close_connection = True

    def send_error_json(self, status: int, message: str, *, param: str | None = None, code: Any = None,
                        kind: str | None = None, headers: dict | None = None):
        """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`."""
        kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.send_json(status, {"error": {"message": message, "type": kind, "param": param,
                                          "code": status if code is None else code}}, headers=headers)

    def _authorized(self) -> bool:
        if self.server.api_key is None or self.headers.get("Authorization") == f"Bearer {self.server.api_key}":
            return True
        self.send_error_json(401, "missing or wrong API key", kind="authentication_error")
        return False

    def read_body(self) -> bytes | None:
        """The request body, or None when it has been refused: 413 over the limit, judged by Content-Length
        before a byte of it is read (the connection is then closed, the body never drained)."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True
            self.send_error_json(411, "send the body with a Content-Length (no chunked uploads)")
            return None
        try:
            length = int(length or 0)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self.send_error_json(400, f"bad Content-Length {length!r:.40}")
            return None
        if length > self.server.max_body_bytes:
            self.close_connection = True
            self.send_error_json(413, f"the body is {length} bytes, over this server's limit of "
                                      f"{self.server.max_body_bytes} (--max-body-bytes)")
            return None
        return self.rfile.read(length) if length else b""

    # -------------------------------------------------------------------------------------- routes

    def do_GET(self):  # noqa: N802 - http.server's naming
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            try:
                with self.server.generate_lock:  # the names may change with the run: look again
                    names = self.server.refresh()
            except BadRequest as e:
                self.send_error_json(e.status, str(e))
                return
            self.send_json(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": self.server.created, "owned_by": "lora_cai"}
                for name in names]})
        elif path in ("/health", "/v1/health"):
            self.send_json(200, {"status": "ok"})
        else:
            self.send_error_json(404, f"no route GET {path}")

    def do_POST(self):  # noqa: N802
        raw = self.read_body()
        if raw is None or not self._authorized():
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self.send_error_json(404, f"no route POST {path}")
            return
        self.chat_completions(raw)

    def chat_completions(self, raw: bytes) -> None:
        """Answer one chat request: checked, then generated under the lock with its model switched in."""
        from lora_cai.serve import requests as R

        server = self.server
        try:
            try:
                request = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"the body is not JSON: {e}") from None
            args = R.parse(request, default_model=server.models.names()[0],
                           max_tokens_default=server.max_tokens_default, max_top_logprobs=server.max_top_logprobs)
            with server.generate_lock:
                if server._closed:
                    raise BadRequest("server shutting down", status=503)
                names = server.refresh()
                if args["model"] not in names:
                    raise BadRequest(f"The model '{args['model']}' does not exist; this server has "
                                     f"{', '.join(names)}", status=404, param="model",
                                     code="model_not_found")
                with server.models.use(args["model"]) as (model, tokenizer):
                    if args["stream"]:
                        self._send_events(R.stream(model, tokenizer, args))
                    else:
                        self.send_json(200, R.complete(model, tokenizer, args))
        except BadRequest as e:
            self.send_error_json(e.status, str(e), param=e.param, code=e.code)
        except UserError as e:
            self.send_error_json(400, str(e))
        except Exception as e:  # noqa: BLE001 - a server answers 500 rather than dying
            self.send_error_json(500, f"generation failed: {_first_line(e)}")

    def _send_events(self, chunks) -> None:
        """Server-sent events: `data: {chunk}` per chunk, then `data: [DONE]`, in HTTP/1.1 chunks (an HTTP/1.0
        client gets the stream up to a closed connection). The first chunk is computed before the headers go
        out, so a refusal (a prompt too long) is still a JSON error; a failure after that is an `error` event."""
        first = next(chunks)
        chunked = self.request_version != "HTTP/1.0"
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            try:
                for chunk in _prepend(first, chunks):
                    self._write_event(json.dumps(chunk), chunked)
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception as e:  # noqa: BLE001 - the headers are out: the failure goes in the stream
                error = {"message": f"generation failed: {_first_line(e)}", "type": "server_error", "param": None,
                         "code": 500}
                self._write_event(json.dumps({"error": error}), chunked)
            self._write_event("[DONE]", chunked)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client left: closing `chunks` stops the generation
            self.close_connection = True
        finally:
            chunks.close()

    def _write_event(self, data: str, chunked: bool) -> None:
        event = f"data: {data}\n\n".encode("utf-8")
        self.wfile.write(f"{len(event):x}\r\n".encode("ascii") + event + b"\r\n" if chunked else event)
        self.wfile.flush()


def _first_line(e: BaseException) -> str:
    """`Type: first line of the message` (at most 300 characters): what a 500 says of an unexpected failure."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _prepend(first, rest):
    yield first
    yield from rest


# ------------------------------------------------------------------------------------------ entry points

def run_in_thread(server: ChatServer) -> str:
    """Serve in a daemon thread; returns the base URL (like `http://127.0.0.1:PORT/v1`)."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"lora_cai-serve-{server.server_address[1]}", daemon=True)
    thread.start()
    server.thread = thread  # type: ignore[attr-defined]
    return _base_url(server.server_address[0], server.server_address[1])


def start_server(model_or_models, tokenizer=None, *, host: str = "127.0.0.1", port: int = 0,
                 model_name: str = "local", **settings) -> tuple[ChatServer, str]:
    """Serve in a daemon thread; returns `(server, base_url)`. Port 0 picks a free port; stop with
    `server.shutdown()`.

    Serves `(model, tokenizer)` under `model_name`, or a `serve_models.RunModels` (pass it alone). `settings` are
    `ChatServer`'s: `api_key`, `max_top_logprobs` (tests raise it to the vocabulary size so that an API judge
    sees every option token, as a local judge does), `max_body_bytes`, `max_tokens_default`, `handler`.
    """
    from lora_cai.serve.models import OneModel

    models = model_or_models if tokenizer is None else OneModel(model_or_models, tokenizer, model_name)
    try:
        server = ChatServer((host, port), models, **settings)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None
    return server, run_in_thread(server)


def _base_url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: loopback reaches it
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def load_model(path: str | Path):
    """`(model, tokenizer)` as a server for `path` holds them: a run's base with its rounds' adapters, or a
    transformers model directory (fp32, CPU)."""
    from lora_cai.serve.models import load_models

    models = load_models(path)
    return models.model, models.tokenizer


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lora_cai.serve", description=__doc__.splitlines()[0])
    parser.add_argument("path", metavar="RUN_OR_MODEL_DIR", help="a lora_cai run directory or a model directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--model-name", default=None,
                        help="a model directory's served name (default: the directory name); a run's names are "
                             "base and round-k")
    parser.add_argument("--api-key-env", default=None,
                        help="require 'Authorization: Bearer $VAR' with the key in this environment variable")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help=f"refuse larger request bodies with 413 (default {MAX_BODY_BYTES}, 1 MiB)")
    return parser


def _main(args) -> int:
    import os
    import signal
    import sys

    from lora_cai.serve.models import load_models

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"the API key environment variable {args.api_key_env} is not set (or empty)")
    if args.max_body_bytes < 1:
        raise UserError(f"--max-body-bytes must be positive, got {args.max_body_bytes}")
    models = load_models(args.path, model_name=args.model_name)
    try:
        server = ChatServer((args.host, args.port), models, api_key=api_key, max_body_bytes=args.max_body_bytes)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); pick another --port") from None

    def _stop(signum, frame):  # SIGTERM stops the server like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a shell
        signal.signal(signal.SIGINT, _stop)
    base_url = _base_url(args.host, server.server_address[1])
    names = ", ".join(models.names())
    print(f"serving {names} at {base_url} (POST {base_url}/chat/completions); Ctrl-C to stop", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()  # the process must not begin to exit (and tear torch down) under a thread inside the model
    print("stopped", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from lora_cai.cli import main as cli_main

    return cli_main(build_parser(), _main, argv)
