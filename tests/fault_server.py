"""Test machinery around `lora_cai.serve`: a server that logs every request and injects faults before serving.

`start_server(model, tokenizer, fault_plan=[...], ...)` takes the product's `start_server` arguments plus a fault
plan; the server it returns keeps `server.requests` (`{method, path, authorization, body}` per request, so tests
can count calls and check headers). Fault-plan entries are consumed one per `POST /v1/chat/completions`, in order:

* an int status (e.g. `429`, `500`): answered with that status and an OpenAI-style error body;
* `"garbled"`: status 200 with a body that is not JSON; `"no_choices"`: 200 with JSON lacking `choices`;
* `"drop"`: the connection is closed without an answer;
* `"slow"`: sleep `server.slow_seconds` (default 2.0) and then serve normally (to trigger client timeouts);
* a dict `{"status": int, "headers": {...}, "body": str, "delay": float}` for anything else (e.g.
  `{"status": 429, "headers": {"Retry-After": "1"}}`). A dict with a `"match": TEXT` key is *sticky*: it is
  not consumed, and applies to every request whose body contains TEXT (a persistently failing prompt).
"""

from __future__ import annotations

import threading
from collections import deque

from lora_cai.serve.server import ChatHandler, ChatServer, run_in_thread
from lora_cai.serve.models import OneModel


class FaultServer(ChatServer):
    """A ChatServer with a request log and a fault plan."""

    def __init__(self, address, models, *, fault_plan=None, **settings):
        super().__init__(address, models, handler=FaultHandler, **settings)
        plan = list(fault_plan or [])
        self.sticky_faults = [f for f in plan if isinstance(f, dict) and "match" in f]
        self.fault_plan: deque = deque(f for f in plan if not (isinstance(f, dict) and "match" in f))
        self.requests: list[dict] = []
        self.slow_seconds = 2.0
        self._log_lock = threading.Lock()

    def record(self, entry: dict) -> None:
        with self._log_lock:
            self.requests.append(entry)

    def next_fault(self, body_text: str):
        with self._log_lock:
            for fault in self.sticky_faults:
                if str(fault["match"]) in body_text:
                    return fault
            return self.fault_plan.popleft() if self.fault_plan else None


class FaultHandler(ChatHandler):
    server: FaultServer

    def do_GET(self):  # noqa: N802
        self.server.record({"method": "GET", "path": self.path, "authorization": self.headers.get("Authorization"),
                            "body": None})
        super().do_GET()

    def read_body(self):
        raw = super().read_body()
        self.server.record({"method": "POST", "path": self.path, "authorization": self.headers.get("Authorization"),
                            "body": None if raw is None else raw.decode("utf-8", "replace")})
        return raw

    def chat_completions(self, raw: bytes) -> None:
        fault = self.server.next_fault(raw.decode("utf-8", "replace"))
        if fault is None or not self._inject(fault):
            super().chat_completions(raw)

    def _inject(self, fault) -> bool:
        """Apply a fault-plan entry; True when the request has been answered (or dropped) by it."""
        if isinstance(fault, int):
            self.send_error_json(fault, f"injected fault: HTTP {fault}")
            return True
        if fault == "garbled":
            self.send_json(200, raw=b'{"id": "chatcmpl-garbled", "choices": [{"message": ')
            return True
        if fault == "no_choices":
            self.send_json(200, {"id": "chatcmpl-nochoices", "object": "chat.completion"})
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
                self.send_error_json(503, "server shutting down")
                return True
            return False
        if isinstance(fault, dict):
            if fault.get("delay") and not self.server.wait(float(fault["delay"])):
                self.send_error_json(503, "server shutting down")
                return True
            status = fault.get("status")
            if status is None:
                return False
            if "body" in fault:
                self.send_json(int(status), raw=str(fault["body"]).encode("utf-8"), headers=fault.get("headers"))
            else:
                self.send_error_json(int(status), f"injected fault: HTTP {status}", headers=fault.get("headers"))
            return True
        raise ValueError(f"unknown fault_plan entry {fault!r}")


def start_server(model, tokenizer, *, host: str = "127.0.0.1", port: int = 0, model_name: str = "local",
                 fault_plan: list | None = None, **settings) -> tuple[FaultServer, str]:
    """Like `lora_cai.serve.server.start_server` for one model, with a request log and `fault_plan`."""
    server = FaultServer((host, port), OneModel(model, tokenizer, model_name), fault_plan=fault_plan, **settings)
    return server, run_in_thread(server)
