"""OpenAI-compatible chat client: concurrency limit, timeouts, retries with back-off, on-disk answer cache.

Generation and judging can go to any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, OpenAI itself,
or `python -m lora_cai.serve`). `ChatClient` talks to `{base_url}/chat/completions` with the standard library
only (`urllib.request`, a thread pool), and is built to survive a long stage against a flaky endpoint:

* **concurrency** — at most `concurrency` HTTP requests are in flight at once, however many threads call
  `chat` (a semaphore); `chat_many` runs a batch on a thread pool of that size and returns the answers in
  input order;
* **timeouts** — every request has a socket timeout of `timeout` seconds;
* **retries** — connection errors, timeouts, HTTP 429 and 5xx are retried up to `max_retries` times with
  exponential back-off and jitter (`backoff * 2**(n-1)`, times a random factor in [0.5, 1), at most
  `max_delay`); a `Retry-After` header (seconds or an HTTP date) is honoured, capped at `max_delay`. Other
  4xx answers are the caller's fault and fail at once. A garbled answer (not JSON, no `choices`) is counted
  in `stats.garbled` and retried once, then fails;
* **cache** — with `cache_dir`, each successful answer is stored as one JSON file named by the sha256 of
  the canonical JSON of (base_url, model, identity, messages, max_tokens, temperature, top_p, seed, stop,
  logprobs), `identity` being what answers behind the model's name where that can change (a policy's trained
  stack): an answer made by one policy is never read for another. Written atomically (temp file + `os.replace`), so a rerun of a stage pays for nothing twice. The API
  key is never part of the key or the file. Unseeded sampling (`temperature > 0` and `seed=None`) is not
  cached: repeating such a request is meant to give a new sample.

The API key is read once, at construction, from the environment variable named by `api_key_env`, and sent
as `Authorization: Bearer ...`; it never appears in the cache, in exception messages or in `repr(client)`.

`chat` raises `APIError` when a request fails for good; `chat_many` never raises for a single bad request:
that answer is `{"text": None, "error": "..."}` and counts in `stats.failures`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_cai.errors import UserError

__all__ = ["APIError", "APIStats", "ChatClient", "check_server"]

_CHAT_KWARGS = frozenset({"messages", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs"})


class APIError(RuntimeError):
    """A chat request that failed for good (after the retries it was allowed)."""


@dataclass
class APIStats:
    """Counters for a client; shared by every thread using it.

    `requests`: chat calls answered or failed (cache hits included); `cached`: of which answered from the
    cache; `retries`: HTTP requests re-sent after an error; `failures`: chat calls that failed for good;
    `garbled`: unparseable answers received; `seconds`: wall-clock time spent in `chat`/`chat_many` calls
    (a `chat_many` batch counts its elapsed time once, not the sum over its threads).
    """

    requests: int = 0
    cached: int = 0
    retries: int = 0
    failures: int = 0
    garbled: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class _Garbled(Exception):
    pass


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@functools.lru_cache(maxsize=1)
def _opener():
    """The urllib opener every request shares (as `urlopen` shares its own), one that follows no redirect.

    urllib's own follows 301/302/303 (a POST turned into a GET) with every header, `Authorization` included, to wherever `Location` points: a redirecting server, or one that an
    attacker controls the redirect of, would receive the API key. An API server has no reason to redirect a client,
    so a redirect is an error that names the address to use instead."""
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            return None  # urllib then raises the 3xx as an HTTPError

    return urllib.request.build_opener(NoRedirect)


def _redirect_message(url: str, e) -> str:
    where = e.headers.get("Location") if e.headers else None
    return (f"{url}: HTTP {e.code} redirect to {where or 'another address'}, not followed (a redirect would carry "
            f"the API key elsewhere); set base_url to the address the server answers at")


def _read_api_key(api_key_env: str | None) -> str | None:
    if api_key_env is None:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        raise UserError(f"the API key environment variable {api_key_env} is not set (or empty); "
                        f"export {api_key_env}=... or name another variable")
    return key


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        when = parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class ChatClient:
    """A thread-safe client for an OpenAI-compatible `/chat/completions` endpoint (see the module doc)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 5, backoff: float = 0.5,
                 cache_dir: str | Path | None = None, max_delay: float = 30.0, identity: str | None = None):
        """`identity`: what answers behind `model` beyond its name (the policy's stack of trained rounds, say), part
        of every cache key, so an answer cached for one policy is never read for another under the same name."""
        if not base_url or not str(base_url).startswith(("http://", "https://")):
            raise UserError(f"API base_url {base_url!r} must start with http:// or https:// "
                            "(e.g. http://127.0.0.1:8000/v1)")
        if concurrency < 1 or timeout <= 0 or max_retries < 0 or backoff < 0 or max_delay < 0:
            raise UserError(f"API client: need concurrency >= 1, timeout > 0, max_retries >= 0, backoff >= 0 and "
                            f"max_delay >= 0 (got {concurrency}, {timeout}, {max_retries}, {backoff}, {max_delay})")
        self.base_url = str(base_url).rstrip("/")
        self.model = model
        self.identity = identity
        self.api_key_env = api_key_env
        self.__key = _read_api_key(api_key_env)  # name-mangled; never printed, cached or logged
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_delay = float(max_delay)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.stats = APIStats()
        self._stats_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._random = random.Random()

    def __repr__(self) -> str:
        key = "***" if self.__key else None
        return (f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, api_key={key}, "
                f"concurrency={self.concurrency}, timeout={self.timeout}, max_retries={self.max_retries}, "
                f"cache_dir={str(self.cache_dir) if self.cache_dir else None!r})")

    def __getstate__(self):  # pickling (e.g. to a worker process) must not carry the key either
        raise TypeError("ChatClient cannot be pickled (it holds an API key); build one in each process")

    # ------------------------------------------------------------------------------------------ helpers

    def _count(self, **deltas: float) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def _scrub(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key else text

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.__key:
            headers["Authorization"] = f"Bearer {self.__key}"
        return headers

    def cache_key(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None, stop: list[str] | None = None, logprobs: int | None = None) -> str:
        """The sha256 naming a request's cache file (the API key is not part of it)."""
        who = [self.base_url, self.model] + ([self.identity] if self.identity is not None else [])
        canonical = json.dumps([*who, messages, max_tokens, temperature, top_p, seed, list(stop) if stop else None,
                                logprobs],
                               sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> dict | None:
        try:
            record = json.loads(self._cache_path(key).read_text(encoding="utf-8"))
            answer = record["answer"]
            if isinstance(answer, dict) and isinstance(answer.get("text"), str):
                return answer
        except (OSError, ValueError, KeyError, TypeError):
            pass  # missing or damaged: ask the server again
        return None

    def _cache_put(self, key: str, request: dict, answer: dict) -> None:
        path = self._cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"request": {"base_url": self.base_url, "model": self.model, **request}, "answer": answer}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _delay(self, retry_number: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.max_delay, retry_after)
        base = self.backoff * (2 ** (retry_number - 1))
        return min(self.max_delay, base * (0.5 + 0.5 * self._random.random()))

    def _post(self, body: bytes) -> dict:
        """One HTTP request; returns the parsed answer or raises _Retryable / _Garbled / APIError."""
        import http.client
        import socket
        import urllib.error
        import urllib.request

        url = f"{self.base_url}/chat/completions"
        request = urllib.request.Request(url, data=body, headers=self._headers(), method="POST")
        with self._slots:
            try:
                with _opener().open(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                status = e.code
                if 300 <= status < 400:
                    e.close()
                    raise APIError(self._scrub(_redirect_message(url, e))) from None
                try:
                    detail = e.read(300).decode("utf-8", "replace")
                except Exception:  # noqa: BLE001 - the body is only a hint
                    detail = ""
                finally:
                    e.close()
                message = self._scrub(f"{url}: HTTP {status} {e.reason}: {' '.join(detail.split())[:200]}")
                if status == 429 or status >= 500:
                    raise _Retryable(message, _parse_retry_after(e.headers.get("Retry-After") if e.headers
                                                                 else None)) from None
                raise APIError(message) from None
            except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError,
                    ConnectionError, OSError) as e:
                reason = getattr(e, "reason", None) or e
                raise _Retryable(self._scrub(f"{url}: {type(e).__name__}: {reason}")) from None
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            message = choice["message"]
            text = message.get("content")
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            snippet = raw[:120].decode("utf-8", "replace") if isinstance(raw, bytes) else ""
            raise _Garbled(self._scrub(f"{url}: garbled answer ({type(e).__name__}: {e}): "
                                       f"{' '.join(snippet.split())!r}")) from None
        lp = choice.get("logprobs")
        content = lp.get("content") if isinstance(lp, dict) else None
        return {"text": text, "logprobs": content if isinstance(content, list) else None,
                "finish_reason": choice.get("finish_reason") or "stop"}

    # ------------------------------------------------------------------------------------------ public

    def _chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
              seed: int | None = None, stop: list[str] | None = None, logprobs: int | None = None) -> dict:
        if isinstance(stop, str):
            stop = [stop]
        request = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                   "seed": seed, "stop": list(stop) if stop else None, "logprobs": logprobs}
        cacheable = self.cache_dir is not None and not (temperature > 0 and seed is None)
        key = self.cache_key(**request) if cacheable else None
        if key is not None:
            hit = self._cache_get(key)
            if hit is not None:
                self._count(requests=1, cached=1)
                return hit

        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature, "top_p": top_p}
        if seed is not None:
            body["seed"] = seed
        if stop:
            body["stop"] = list(stop)
        if logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = int(logprobs)
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")

        retries = 0
        garbled = 0
        while True:
            try:
                answer = self._post(payload)
                break
            except APIError as e:
                self._count(requests=1, failures=1)
                raise APIError(str(e)) from None
            except _Garbled as e:
                garbled += 1
                self._count(garbled=1)
                if garbled > 1 or retries >= self.max_retries:
                    self._count(requests=1, failures=1)
                    raise APIError(f"{e} (after {retries} retries)") from None
                retry_after = None
            except _Retryable as e:
                if retries >= self.max_retries:
                    self._count(requests=1, failures=1)
                    raise APIError(f"{e} (after {retries} retries)") from None
                retry_after = e.retry_after
            retries += 1
            self._count(retries=1)
            time.sleep(self._delay(retries, retry_after))

        self._count(requests=1)
        if key is not None:
            self._cache_put(key, request, answer)
        return answer

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, stop: list[str] | None = None, logprobs: int | None = None) -> dict:
        """One chat completion: `{"text", "logprobs", "finish_reason"}`.

        `logprobs=k` asks for per-token log-probs with the top `k` alternatives (OpenAI `logprobs: true,
        top_logprobs: k`); the answer's `logprobs` is then the OpenAI `choices[0].logprobs.content` list.
        Raises `APIError` when the request fails for good.
        """
        started = time.perf_counter()
        try:
            return self._chat(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              stop=stop, logprobs=logprobs)
        finally:
            self._count(seconds=time.perf_counter() - started)

    def chat_many(self, requests: list[dict], *, progress=None, description: str = "api") -> list[dict]:
        """Run many `chat` calls (each request a dict of `chat` keyword arguments) with the concurrency limit.

        Answers come back in input order. A request that fails for good gives `{"text": None, "logprobs":
        None, "finish_reason": None, "error": "..."}` (counted in `stats.failures`); the batch goes on.
        `progress` is an optional `rich.progress.Progress` (e.g. `generation.make_progress()`).
        """
        from concurrent.futures import ThreadPoolExecutor, as_completed

        for i, req in enumerate(requests):
            unknown = set(req) - _CHAT_KWARGS
            missing = {"messages", "max_tokens"} - set(req)
            if unknown or missing:
                raise TypeError(f"chat_many: request {i} has unknown keys {sorted(unknown)} or lacks "
                                f"{sorted(missing)}; allowed: {sorted(_CHAT_KWARGS)}")
        started = time.perf_counter()
        results: list[dict | None] = [None] * len(requests)
        task = progress.add_task(description, total=len(requests), tokens_per_s=0.0) if progress is not None \
            else None

        def one(i: int) -> dict:
            try:
                return self._chat(**requests[i])
            except APIError as e:
                return {"text": None, "logprobs": None, "finish_reason": None, "error": str(e)}
            except Exception as e:  # noqa: BLE001 - one bad request never sinks the batch
                self._count(requests=1, failures=1)
                return {"text": None, "logprobs": None, "finish_reason": None,
                        "error": self._scrub(f"{type(e).__name__}: {e}")}

        try:
            if requests:
                with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)),
                                        thread_name_prefix="lora_cai-api") as pool:
                    futures = {pool.submit(one, i): i for i in range(len(requests))}
                    for future in as_completed(futures):
                        results[futures[future]] = future.result()
                        if task is not None:
                            progress.update(task, advance=1)
        finally:
            self._count(seconds=time.perf_counter() - started)
        return results  # type: ignore[return-value]


def check_server(base_url: str, api_key_env: str | None = None, timeout: float = 5) -> None:
    """GET `{base_url}/models`; raise a one-line `UserError` naming the URL when the server cannot be reached
    (or rejects the key). Call it before a stage starts, so a typo'd URL fails in a second, not after retries.
    """
    import http.client
    import socket
    import urllib.error
    import urllib.request

    key = _read_api_key(api_key_env)
    url = f"{str(base_url).rstrip('/')}/models"
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with _opener().open(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as e:
        e.close()
        if 300 <= e.code < 400:
            raise UserError(_redirect_message(url, e)) from None
        if e.code in (401, 403):
            hint = f"check ${api_key_env}" if api_key_env else "set api_key_env to the variable holding the key"
            raise UserError(f"the server at {url} rejected the request (HTTP {e.code}); {hint}") from None
        if e.code >= 500:
            raise UserError(f"the server at {url} answered HTTP {e.code}; is it still starting or broken?") from None
        # 404 and other 4xx: the server is there, it just does not list models
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        if key:
            reason = str(reason).replace(key, "***")
        raise UserError(f"cannot reach the OpenAI-compatible server at {url} ({reason}); is it running, and is "
                        "the base URL right (e.g. http://127.0.0.1:8000/v1)?") from None
