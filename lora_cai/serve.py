"""A small OpenAI-compatible server for a local model or a finished run's policy (tests, and trying a run over HTTP).

    python -m lora_cai.serve MODEL_OR_RUN_DIR [--host 127.0.0.1] [--port 8000] [--model-name NAME]

MODEL_OR_RUN_DIR is a run directory (it has `manifest.json`: the policy is loaded with `lora_cai.load_policy`,
base plus the adapter stack) or a transformers model directory (loaded in fp32 on the CPU). Endpoints:

* `GET /v1/models` — the one model served;
* `POST /v1/chat/completions` — messages rendered with the tokenizer's chat template (`render_chat`),
  generated with the engine's `generate` (greedy when `temperature` is 0, seeded sampling otherwise; `seed`,
  `top_p`, `stop`, `max_tokens`/`max_completion_tokens`); the standard response shape with `usage`. With
  `logprobs: true` (and `top_logprobs: k`, 0..20) the answer carries OpenAI-style per-token log-probs in
  `choices[0].logprobs.content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}, ...]}]`,
  computed as `log_softmax` of the raw logits `model.generate` returns for each generated token.

This is not a production server: one model, one generation at a time (a lock), no batching across requests,
`n = 1`, no streaming. For real throughput use vLLM/SGLang/TGI; `lora_cai.api.ChatClient` speaks to all of them.

Testing aid: `start_server(..., fault_plan=[...])` injects faults into `POST /v1/chat/completions` before
normal service. Entries are consumed one per request, in order:

* an int status (e.g. `429`, `500`): answered with that status and an OpenAI-style error body;
* `"garbled"`: status 200 with a body that is not JSON; `"no_choices"`: 200 with JSON lacking `choices`;
* `"drop"`: the connection is closed without an answer;
* `"slow"`: sleep `server.slow_seconds` (default 2.0) and then serve normally (to trigger client timeouts);
* a dict `{"status": int, "headers": {...}, "body": str, "delay": float}` for anything else (e.g.
  `{"status": 429, "headers": {"Retry-After": "1"}}`). A dict with a `"match": TEXT` key is *sticky*: it is
  not consumed, and applies to every request whose messages contain TEXT (a persistently failing prompt).

The server records each request it receives in `server.requests` (`{method, path, authorization, body}`), so
tests can count calls and check headers. Pass `api_key=...` to `start_server` to require
`Authorization: Bearer <key>` (401 otherwise).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["ChatServer", "load_model", "main", "start_server"]

_MAX_TOP_LOGPROBS = 20


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ChatServer(ThreadingHTTPServer):
    """The HTTP server object: holds the model, the generation lock, the fault plan and the request log."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, model, tokenizer, *, model_name: str = "local", fault_plan=None,
                 api_key: str | None = None, max_tokens_default: int = 256,
                 max_top_logprobs: int = _MAX_TOP_LOGPROBS):
        super().__init__(address, _Handler)
        self.max_top_logprobs = max_top_logprobs
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.max_tokens_default = max_tokens_default
        self.slow_seconds = 2.0
        self.created = int(time.time())
        self.generate_lock = threading.Lock()
        self._state_lock = threading.Lock()
        plan = list(fault_plan or [])
        self.sticky_faults = [f for f in plan if isinstance(f, dict) and "match" in f]
        self.fault_plan: deque = deque(f for f in plan if not (isinstance(f, dict) and "match" in f))
        self.requests: list[dict] = []
        self._closed = False

    def record(self, entry: dict) -> None:
        with self._state_lock:
            self.requests.append(entry)

    def next_fault(self, body_text: str):
        with self._state_lock:
            for fault in self.sticky_faults:
                if str(fault["match"]) in body_text:
                    return fault
            return self.fault_plan.popleft() if self.fault_plan else None

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
        """Close the socket and wait for a generation still running in a handler thread (up to a minute)."""
        self._closed = True
        self.server_close()
        if self.generate_lock.acquire(timeout=60):
            self.generate_lock.release()


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"
    server_version = "lora_cai-serve"

    def log_message(self, format, *args):  # noqa: A002 - quiet: no per-request lines on stderr
        pass

    # -------------------------------------------------------------------------------------- replies

    def _send(self, status: int, payload: Any = None, *, raw: bytes | None = None, headers: dict | None = None):
        body = raw if raw is not None else json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. its timeout)
            self.close_connection = True

    def _error(self, status: int, message: str, *, headers: dict | None = None, kind: str | None = None):
        kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self._send(status, {"error": {"message": message, "type": kind, "code": status}}, headers=headers)

    def _authorized(self) -> bool:
        if self.server.api_key is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {self.server.api_key}":
            return True
        self._error(401, "missing or wrong API key", kind="authentication_error")
        return False

    # -------------------------------------------------------------------------------------- routes

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.record({"method": "GET", "path": self.path, "authorization": self.headers.get("Authorization"),
                            "body": None})
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "created": self.server.created, "owned_by": "lora_cai"}]})
        elif path in ("/health", "/v1/health"):
            self._send(200, {"status": "ok"})
        else:
            self._error(404, f"no route GET {path}")

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        body_text = raw.decode("utf-8", "replace")
        self.server.record({"method": "POST", "path": self.path,
                            "authorization": self.headers.get("Authorization"), "body": body_text})
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route POST {path}")
            return
        fault = self.server.next_fault(body_text)
        if fault is not None and self._inject(fault):
            return
        try:
            request = json.loads(raw or b"null")
            if not isinstance(request, dict):
                raise _BadRequest("the body must be a JSON object")
            answer = _complete(self.server, request)
        except _BadRequest as e:
            self._error(e.status, str(e))
            return
        except json.JSONDecodeError as e:
            self._error(400, f"the body is not JSON: {e}")
            return
        except UserError as e:
            self._error(400, str(e))
            return
        except Exception as e:  # noqa: BLE001 - a server answers 500 rather than dying
            self._error(500, f"generation failed: {type(e).__name__}: {e}")
            return
        self._send(200, answer)

    def _inject(self, fault) -> bool:
        """Apply a fault-plan entry; True when the request has been answered (or dropped) by it."""
        if isinstance(fault, int):
            self._error(fault, f"injected fault: HTTP {fault}")
            return True
        if fault == "garbled":
            self._send(200, raw=b'{"id": "chatcmpl-garbled", "choices": [{"message": ')
            return True
        if fault == "no_choices":
            self._send(200, {"id": "chatcmpl-nochoices", "object": "chat.completion"})
            return True
        if fault == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return True
        if fault == "slow":
            if not self.server.wait(self.server.slow_seconds):
                self._error(503, "server shutting down")
                return True
            return False
        if isinstance(fault, dict):
            if fault.get("delay") and not self.server.wait(float(fault["delay"])):
                self._error(503, "server shutting down")
                return True
            status = fault.get("status")
            if status is None:
                return False
            if "body" in fault:
                self._send(int(status), raw=str(fault["body"]).encode("utf-8"), headers=fault.get("headers"))
            else:
                self._error(int(status), f"injected fault: HTTP {status}", headers=fault.get("headers"))
            return True
        raise ValueError(f"unknown fault_plan entry {fault!r}")


# ------------------------------------------------------------------------------------------ generation

def _validate(server: ChatServer, request: dict) -> dict:
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadRequest("each message must be an object with string 'role' and 'content'")
    if request.get("stream"):
        raise _BadRequest("streaming is not supported by lora_cai.serve")
    if int(request.get("n") or 1) != 1:
        raise _BadRequest("only n=1 is supported by lora_cai.serve")
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    max_tokens = server.max_tokens_default if max_tokens is None else max_tokens
    temperature = 1.0 if request.get("temperature") is None else request["temperature"]
    top_p = 1.0 if request.get("top_p") is None else request["top_p"]
    stop = request.get("stop")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    seed = request.get("seed")
    try:
        max_tokens, temperature, top_p = int(max_tokens), float(temperature), float(top_p)
        seed = int(seed) if seed is not None else int.from_bytes(uuid.uuid4().bytes[:6], "little")
    except (TypeError, ValueError):
        raise _BadRequest("max_tokens and seed must be integers, temperature and top_p numbers") from None
    if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise _BadRequest("need max_tokens >= 1, temperature >= 0 and 0 < top_p <= 1")
    if not all(isinstance(s, str) for s in stop):
        raise _BadRequest("'stop' must be a string or a list of strings")
    want_logprobs = bool(request.get("logprobs"))
    top = request.get("top_logprobs")
    top = 0 if top is None else int(top)
    if not 0 <= top <= server.max_top_logprobs:
        raise _BadRequest(f"top_logprobs must be between 0 and {server.max_top_logprobs}")
    if top and not want_logprobs:
        raise _BadRequest("top_logprobs needs logprobs: true")
    return dict(messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                seed=seed, logprobs=want_logprobs, top_logprobs=top)


def _token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _generate_with_logprobs(model, tokenizer, prompt: str, *, max_tokens: int, temperature: float, top_p: float,
                            seed: int, stop: list[str], top_logprobs: int) -> tuple[str, list[dict], int, str]:
    """One prompt through `model.generate` with its logits kept; mirrors the engine for a batch of one
    (same generation arguments, same per-batch seed), so the text equals what `generate` would give."""
    import torch

    from .generation import batch_seed, cut_at_stop, eos_token_ids, model_device

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos_ids = eos_token_ids(model, tokenizer)
    device = model_device(model)
    ids = tokenizer([prompt], add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    gen_args: dict[str, Any] = dict(max_new_tokens=max_tokens, do_sample=temperature > 0,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids or None, use_cache=True,
                                    output_logits=True, return_dict_in_generate=True)
    if temperature > 0:
        gen_args.update(temperature=temperature, top_p=top_p, top_k=0)
    if stop:
        gen_args.update(stop_strings=list(stop), tokenizer=tokenizer)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            attention = torch.ones_like(ids)
            if temperature > 0:
                devices = [device] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(batch_seed(seed, 0, [0]))
                    out = model.generate(input_ids=ids, attention_mask=attention, **gen_args)
            else:
                out = model.generate(input_ids=ids, attention_mask=attention, **gen_args)
    finally:
        if was_training:
            model.train()
    new = out.sequences[0, ids.shape[1]:].tolist()
    logps = torch.log_softmax(torch.stack(out.logits, dim=0)[:, 0, :].float(), dim=-1).cpu()

    # tokens up to the first eos (counted in usage, not shown, as OpenAI does)
    n_used = len(new)
    hit_eos = False
    for j, t in enumerate(new):
        if t in eos_ids:
            n_used, hit_eos = j + 1, True
            break
    shown = new[:n_used - 1] if hit_eos else new[:n_used]
    full = tokenizer.decode(shown, skip_special_tokens=True)
    cut = cut_at_stop(full, stop) if stop else full
    stopped_by_string = len(cut) < len(full)
    if stopped_by_string:  # keep the tokens that start before the stop string
        keep = 0
        while keep < len(shown) and len(tokenizer.decode(shown[:keep], skip_special_tokens=True)) < len(cut):
            keep += 1
        shown = shown[:keep]
    content = []
    for j, t in enumerate(shown):
        entry = _token_entry(tokenizer, t, float(logps[j, t]))
        if top_logprobs:
            values, indices = torch.topk(logps[j], top_logprobs)
            entry["top_logprobs"] = [_token_entry(tokenizer, int(i), float(v)) for v, i in zip(values, indices)]
        else:
            entry["top_logprobs"] = []
        content.append(entry)
    finish = "stop" if hit_eos or stopped_by_string or len(new) < max_tokens else "length"
    return cut.strip(), content, n_used, finish


def _complete(server: ChatServer, request: dict) -> dict:
    from .generation import GenerationStats, generate, render_chat

    args = _validate(server, request)
    model, tokenizer = server.model, server.tokenizer
    with server.generate_lock:
        if server._closed:
            raise _BadRequest("server shutting down", status=503)
        prompt = render_chat(tokenizer, args["messages"])
        prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if args["logprobs"]:
            text, content, completion_tokens, finish = _generate_with_logprobs(
                model, tokenizer, prompt, max_tokens=args["max_tokens"], temperature=args["temperature"],
                top_p=args["top_p"], seed=args["seed"], stop=args["stop"], top_logprobs=args["top_logprobs"])
            logprobs = {"content": content}
        else:
            stats = GenerationStats()
            text = generate(model, tokenizer, [prompt], max_new_tokens=args["max_tokens"],
                            temperature=args["temperature"], top_p=args["top_p"], seed=args["seed"],
                            stop=args["stop"] or None, stats=stats)[0]
            if text is None:
                raise _BadRequest(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({args['max_tokens']}) "
                                  "does not fit the model's context")
            completion_tokens = stats.new_tokens
            finish = "length" if completion_tokens >= args["max_tokens"] else "stop"
            logprobs = None
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": server.model_name,
        "system_fingerprint": "lora_cai-serve",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                     "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


# ------------------------------------------------------------------------------------------ entry points

def start_server(model, tokenizer, *, host: str = "127.0.0.1", port: int = 0, model_name: str = "local",
                 fault_plan: list | None = None, api_key: str | None = None,
                 max_top_logprobs: int = _MAX_TOP_LOGPROBS) -> tuple[ChatServer, str]:
    """Serve `model` in a daemon thread; returns `(server, base_url)` with base_url like
    `http://127.0.0.1:PORT/v1`. Port 0 picks a free port. Stop it with `server.shutdown()`.

    `max_top_logprobs` defaults to OpenAI's limit (20); tests raise it to the vocabulary size so that an
    API judge sees every option token, as a local judge does.

    `fault_plan` is a testing aid (see the module doc): faults injected before normal service.
    """
    try:
        server = ChatServer((host, port), model, tokenizer, model_name=model_name, fault_plan=fault_plan,
                            api_key=api_key, max_top_logprobs=max_top_logprobs)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"lora_cai-serve-{server.server_address[1]}", daemon=True)
    thread.start()
    server.thread = thread  # type: ignore[attr-defined]
    return server, _base_url(host, server.server_address[1])


def _base_url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: loopback reaches it
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def load_model(path: str | Path):
    """`(model, tokenizer)` from a run directory (its policy) or a transformers model directory (fp32, CPU)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model or run directory")
    if (path / "manifest.json").is_file():
        from . import load_policy

        model, tokenizer = load_policy(path)
        return model, tokenizer
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: neither a run directory (manifest.json) nor a model directory (config.json)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lora_cai.serve", description=__doc__.splitlines()[0])
    parser.add_argument("path", metavar="MODEL_OR_RUN_DIR", help="a lora_cai run directory or a model directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: the directory name)")
    parser.add_argument("--api-key-env", default=None,
                        help="require 'Authorization: Bearer $VAR' with the key in this environment variable")
    return parser


def _main(args) -> int:
    import os
    import signal
    import sys

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"the API key environment variable {args.api_key_env} is not set (or empty)")
    name = args.model_name or Path(args.path).resolve().name
    model, tokenizer = load_model(args.path)
    try:
        server = ChatServer((args.host, args.port), model, tokenizer, model_name=name, api_key=api_key)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); pick another --port") from None

    def _stop(signum, frame):  # SIGTERM stops the server like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a shell
        signal.signal(signal.SIGINT, _stop)
    base_url = _base_url(args.host, server.server_address[1])
    print(f"serving {name!r} at {base_url} (POST {base_url}/chat/completions); Ctrl-C to stop", file=sys.stderr,
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
    from .cli import main as cli_main

    return cli_main(build_parser(), _main, argv)


if __name__ == "__main__":
    import os
    import sys

    code = main()
    # The server has closed its socket and no generation is running (ChatServer.close); what is left is the
    # interpreter's teardown of torch and the tokenizer libraries under idle daemon handler threads, which once
    # ended in SIGABRT on a CI host after a clean stop. Nothing of ours is left to finalize: flush and leave.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
