"""Tests for lora_cai.engine.api (the OpenAI-compatible client) against lora_cai.serve on loopback, serving the tiny model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from lora_cai.engine.api import APIError, ChatClient, check_server
from lora_cai.errors import UserError
from lora_cai.engine.generation import generate, render_chat
from fault_server import start_server

QUESTIONS = [
    "How do I bake bread at home?",
    "Write a poem about the sea.",
    "What is the capital of France?",
    "Explain Python lists.",
    "Which response is more helpful, honest and harmless?",
    "Tell me about water.",
    "Hi",
    "Why is the sky blue?",
]
MAX_TOKENS = 10
KEY = "sk-test-7f3a9c1e5b-never-store-me"


def _messages(q: str) -> list[dict]:
    return [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": q}]


def _requests(questions=QUESTIONS, **kw) -> list[dict]:
    return [dict(messages=_messages(q), max_tokens=MAX_TOKENS, **kw) for q in questions]


def _posts(server) -> list[dict]:
    return [r for r in server.requests if r["method"] == "POST"]


@pytest.fixture(scope="module")
def expected(tiny) -> list[str]:
    """Greedy answers from the engine, run locally on the same model for the same rendered prompts."""
    model, tokenizer = tiny
    prompts = [render_chat(tokenizer, _messages(q)) for q in QUESTIONS]
    return generate(model, tokenizer, prompts, max_new_tokens=MAX_TOKENS)


@pytest.fixture
def serve(tiny):
    """serve(fault_plan=..., **kw) -> (server, base_url); every server started is shut down afterwards."""
    started = []

    def _serve(fault_plan=None, **kw):
        server, url = start_server(*tiny, fault_plan=fault_plan, model_name="tiny", **kw)
        started.append(server)
        return server, url

    yield _serve
    for server in started:
        server.shutdown()


def _client(url, **kw) -> ChatClient:
    kw.setdefault("backoff", 0.001)
    kw.setdefault("timeout", 20)
    return ChatClient(url, "tiny", **kw)


# ---------------------------------------------------------------------------------------------- serving

def test_greedy_answers_equal_local_generate(serve, expected):
    server, url = serve()
    client = _client(url, concurrency=2)
    answers = client.chat_many(_requests())
    assert [a["text"] for a in answers] == expected
    assert any(expected)  # the random model says something
    assert all(a["finish_reason"] in ("stop", "length") and a["logprobs"] is None for a in answers)
    assert client.chat(_messages(QUESTIONS[0]), max_tokens=MAX_TOKENS)["text"] == expected[0]
    assert client.stats.requests == len(QUESTIONS) + 1 and client.stats.failures == client.stats.retries == 0
    assert [r["path"] for r in _posts(server)] == ["/v1/chat/completions"] * (len(QUESTIONS) + 1)
    body = json.loads(_posts(server)[0]["body"])
    assert body["model"] == "tiny" and body["max_tokens"] == MAX_TOKENS and body["temperature"] == 0.0


def test_response_shape_and_models_endpoint(serve, expected):
    server, url = serve()
    with urllib.request.urlopen(f"{url}/models", timeout=10) as r:
        models = json.loads(r.read())
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    req = urllib.request.Request(f"{url}/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "tiny", "messages": _messages(QUESTIONS[0]),
                                                  "max_tokens": MAX_TOKENS, "temperature": 0}).encode())
    with urllib.request.urlopen(req, timeout=20) as r:
        answer = json.loads(r.read())
    assert answer["object"] == "chat.completion" and answer["model"] == "tiny"
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected[0]}
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    usage = answer["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= MAX_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    bad = urllib.request.Request(f"{url}/chat/completions", method="POST", data=b'{"messages": "hi"}')
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=10)
    assert err.value.code == 400 and "messages" in json.loads(err.value.read())["error"]["message"]


def test_seeded_sampling_and_stop_match_the_engine(serve, tiny, expected):
    model, tokenizer = tiny
    _, url = serve()
    client = _client(url)
    prompt = render_chat(tokenizer, _messages(QUESTIONS[1]))
    sampled = client.chat(_messages(QUESTIONS[1]), max_tokens=MAX_TOKENS, temperature=0.9, seed=11)["text"]
    assert sampled == generate(model, tokenizer, [prompt], max_new_tokens=MAX_TOKENS, temperature=0.9, seed=11)[0]
    assert client.chat(_messages(QUESTIONS[1]), max_tokens=MAX_TOKENS, temperature=0.9, seed=11)["text"] == sampled
    i, text = next((i, t) for i, t in enumerate(expected) if len(t) >= 6)
    stop = [text[3:5]]
    got = client.chat(_messages(QUESTIONS[i]), max_tokens=MAX_TOKENS, stop=stop)
    local = generate(model, tokenizer, [render_chat(tokenizer, _messages(QUESTIONS[i]))], max_new_tokens=MAX_TOKENS,
                     stop=stop)[0]
    assert got["text"] == local and stop[0] not in got["text"] and got["finish_reason"] == "stop"


def test_chat_many_keeps_input_order_under_concurrency(serve, expected):
    assert len(set(expected)) > 1
    # every request is held 0.5 s by the server before it is served, so answers finish out of order
    server, url = serve(fault_plan=[{"delay": 0.5}] * len(QUESTIONS))
    client = _client(url, concurrency=4)
    t0 = time.perf_counter()
    answers = client.chat_many(_requests())
    elapsed = time.perf_counter() - t0
    assert [a["text"] for a in answers] == expected
    assert elapsed >= 0.95  # 8 requests, 4 at a time, 0.5 s each: at least two waves
    assert elapsed < 3.5  # one at a time would take 4 s
    assert len(_posts(server)) == len(QUESTIONS)


# ---------------------------------------------------------------------------------------------- failures

def test_429_and_5xx_are_retried(serve, expected):
    server, url = serve(fault_plan=[429, 500, 503])
    client = _client(url)
    assert client.chat(_messages(QUESTIONS[0]), max_tokens=MAX_TOKENS)["text"] == expected[0]
    assert client.stats.retries == 3 and client.stats.failures == 0 and client.stats.requests == 1
    assert len(_posts(server)) == 4


def test_timeouts_and_dropped_connections_are_retried(serve, expected):
    server, url = serve(fault_plan=["slow", "drop"])
    server.slow_seconds = 1.0
    client = _client(url, timeout=0.3)
    assert client.chat(_messages(QUESTIONS[2]), max_tokens=MAX_TOKENS)["text"] == expected[2]
    assert client.stats.retries == 2 and client.stats.failures == 0


def test_other_4xx_fail_without_retry(serve):
    server, url = serve(fault_plan=[400])
    client = _client(url)
    with pytest.raises(APIError, match="HTTP 400"):
        client.chat(_messages("x"), max_tokens=4)
    assert client.stats.retries == 0 and client.stats.failures == 1 and len(_posts(server)) == 1


def test_garbled_answers_are_counted_and_do_not_crash_the_batch(serve, expected):
    server, url = serve(fault_plan=["garbled", {"delay": 0}, "no_choices"])  # {"delay": 0}: served normally
    client = _client(url, concurrency=1)
    answers = client.chat_many(_requests(QUESTIONS[:3]))
    assert [a["text"] for a in answers] == expected[:3]  # each garbled answer retried once, then fine
    assert client.stats.garbled == 2 and client.stats.retries == 2 and client.stats.failures == 0

    # an answer that stays garbled: retried once only, then a failure; the rest of the batch is served
    server, url = serve(fault_plan=[{"match": "GARBLE-ME", "status": 200, "body": "<html>oops</html>"}])
    client = _client(url, concurrency=2, max_retries=5)
    answers = client.chat_many(_requests([QUESTIONS[0], "GARBLE-ME", QUESTIONS[1]]))
    assert answers[1]["text"] is None and "garbled" in answers[1]["error"]
    assert [answers[0]["text"], answers[2]["text"]] == expected[:2]
    assert client.stats.garbled == 2 and client.stats.failures == 1
    assert sum("GARBLE-ME" in r["body"] for r in _posts(server)) == 2


def test_persistent_500_fails_one_request_only(serve, expected):
    server, url = serve(fault_plan=[{"match": "BOOM", "status": 500}])
    client = _client(url, concurrency=4, max_retries=2)
    questions = [QUESTIONS[0], QUESTIONS[1], "BOOM", QUESTIONS[2], QUESTIONS[3]]
    answers = client.chat_many(_requests(questions))
    assert answers[2]["text"] is None and "HTTP 500" in answers[2]["error"]
    assert [a["text"] for k, a in enumerate(answers) if k != 2] == expected[:4]
    assert client.stats.failures == 1 and client.stats.retries == 2 and client.stats.requests == 5
    assert sum("BOOM" in r["body"] for r in _posts(server)) == 3  # first try + max_retries
    with pytest.raises(APIError, match="HTTP 500"):
        client.chat(_messages("BOOM"), max_tokens=4)


def test_retry_after_is_honoured_and_capped(serve, expected):
    _, url = serve(fault_plan=[{"status": 429, "headers": {"Retry-After": "1"}}])
    client = _client(url)
    t0 = time.perf_counter()
    assert client.chat(_messages(QUESTIONS[0]), max_tokens=MAX_TOKENS)["text"] == expected[0]
    assert time.perf_counter() - t0 >= 0.95  # backoff alone would wait ~1 ms
    assert client.stats.retries == 1

    _, url = serve(fault_plan=[{"status": 503, "headers": {"Retry-After": "3600"}}])
    client = _client(url, max_delay=0.2)
    t0 = time.perf_counter()
    assert client.chat(_messages(QUESTIONS[0]), max_tokens=MAX_TOKENS)["text"] == expected[0]
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------------------------- cache, key

def test_cache_answers_a_repeat_without_the_server(serve, expected, tmp_path):
    server, url = serve(fault_plan=[{"match": "NOT-CACHED", "status": 500}])
    cache = tmp_path / "cache"
    client = _client(url, cache_dir=cache, max_retries=0)
    first = client.chat_many(_requests(QUESTIONS[:3]))
    assert [a["text"] for a in first] == expected[:3]
    n = len(_posts(server))
    assert n == 3
    again = client.chat_many(_requests(QUESTIONS[:3]))
    assert again == first and len(_posts(server)) == n and client.stats.cached == 3
    rerun = _client(url, cache_dir=cache)  # a rerun of the stage: a new client, same cache
    assert rerun.chat(_messages(QUESTIONS[1]), max_tokens=MAX_TOKENS) == first[1]
    assert len(_posts(server)) == n and rerun.stats.cached == 1
    # a different setting is a different answer
    rerun.chat(_messages(QUESTIONS[1]), max_tokens=MAX_TOKENS - 1)
    assert len(_posts(server)) == n + 1
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert len(files) == 4 and all(p.suffix == ".json" and not p.name.startswith(".") for p in files)
    # failures are not cached: the same request goes to the server again
    assert client.chat_many(_requests(["NOT-CACHED"]))[0]["text"] is None
    assert client.chat_many(_requests(["NOT-CACHED"]))[0]["text"] is None
    assert sum("NOT-CACHED" in r["body"] for r in _posts(server)) == 2
    assert len([p for p in cache.rglob("*") if p.is_file()]) == 4


def test_api_key_is_sent_but_never_stored_or_shown(serve, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CAI_TEST_KEY", KEY)
    server, url = serve(api_key=KEY, fault_plan=[{"status": 400, "body": f"bad request from key {KEY}"}])
    cache = tmp_path / "cache"
    client = _client(url, api_key_env="LORA_CAI_TEST_KEY", cache_dir=cache)
    assert "api_key=***" in repr(client) and KEY not in repr(client) and KEY not in str(client)
    with pytest.raises(APIError) as err:  # the server echoes the key in its error body
        client.chat(_messages("x"), max_tokens=4)
    assert KEY not in str(err.value)
    answers = client.chat_many(_requests(QUESTIONS[:2], logprobs=2))
    assert [a["text"] for a in answers] == expected[:2]
    assert {r["authorization"] for r in server.requests} == {f"Bearer {KEY}"}
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files and all(KEY.encode() not in p.read_bytes() for p in files)
    check_server(url, api_key_env="LORA_CAI_TEST_KEY")
    # without the key this server refuses, and check_server says so in one line
    with pytest.raises(UserError) as err:
        check_server(url)
    assert "401" in str(err.value) and "\n" not in str(err.value)


def test_missing_key_variable_is_a_user_error(monkeypatch):
    monkeypatch.delenv("LORA_CAI_NO_SUCH_KEY", raising=False)
    with pytest.raises(UserError, match="LORA_CAI_NO_SUCH_KEY"):
        ChatClient("http://127.0.0.1:9/v1", "m", api_key_env="LORA_CAI_NO_SUCH_KEY")
    with pytest.raises(UserError, match="LORA_CAI_NO_SUCH_KEY"):
        check_server("http://127.0.0.1:9/v1", api_key_env="LORA_CAI_NO_SUCH_KEY")


def test_check_server_on_a_closed_port(serve):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(UserError) as err:
        check_server(url, timeout=2)
    message = str(err.value)
    assert f"{url}/models" in message and "\n" not in message
    _, live = serve()
    check_server(live)  # a running server passes


def test_unreachable_server_fails_each_request_not_the_batch():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = _client(f"http://127.0.0.1:{port}/v1", max_retries=1, timeout=2)
    answers = client.chat_many(_requests(QUESTIONS[:2]))
    assert all(a["text"] is None and "127.0.0.1" in a["error"] for a in answers)
    assert client.stats.failures == 2 and client.stats.retries == 2


# ---------------------------------------------------------------------------------------------- logprobs

def test_logprobs_in_openai_shape_equal_the_models_log_softmax(tiny64):
    """The served log-probs (decoded step by step with a cache) equal one forward over prompt + answer.

    The model runs in float64 so that the two orders of computation differ by about 1e-15 on any CPU; the server
    rounds each step's logits to float32 once before its log-softmax, which moves a log-prob by a few float32
    epsilons (measured 3.3e-7, and 3.0e-7 under ATEN_CPU_CAPABILITY=default, whose log-softmax sums in another
    order). The bound, 1e-5, is thirty times that; reading the log-probs one position off, the bug it guards, is
    off by 8.9."""
    import torch

    model, tokenizer = tiny64
    server, url = start_server(model, tokenizer, model_name="tiny")
    try:
        k = 3
        answer = _client(url).chat(_messages(QUESTIONS[0]), max_tokens=MAX_TOKENS, logprobs=k)
    finally:
        server.shutdown()
    content = answer["logprobs"]
    assert isinstance(content, list) and content
    for entry in content:
        assert set(entry) >= {"token", "logprob", "top_logprobs"} and isinstance(entry["token"], str)
        assert len(entry["top_logprobs"]) == k
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True) and entry["logprob"] <= values[0] + 1e-6

    # independent check: one forward pass over prompt + the greedy continuation
    prompt_ids = tokenizer(render_chat(tokenizer, _messages(QUESTIONS[0])), add_special_tokens=False,
                           return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                             max_new_tokens=MAX_TOKENS, pad_token_id=tokenizer.pad_token_id)
        new = out[0, prompt_ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id)]
        full = torch.cat([prompt_ids[0], torch.tensor(new, dtype=torch.long)])[None]
        logps = torch.log_softmax(model(full).logits[0], dim=-1)[prompt_ids.shape[1] - 1:]
    assert answer["text"] == tokenizer.decode(new, skip_special_tokens=True)
    assert len(content) == len(new) >= 3
    bound, gaps, shifted = 1e-5, [], []
    for j, (entry, token_id) in enumerate(zip(content, new)):
        assert entry["token"] == tokenizer.decode([token_id])
        gaps.append(abs(entry["logprob"] - float(logps[j, token_id])))
        top = torch.topk(logps[j], k).values.tolist()
        gaps += [abs(a["logprob"] - b) for a, b in zip(entry["top_logprobs"], top)]
        if j + 1 < len(new):
            shifted.append(abs(entry["logprob"] - float(logps[j + 1, token_id])))
    assert max(gaps) <= bound
    assert max(shifted) > 1e4 * bound


# ---------------------------------------------------------------------------------------------- CLI

def test_serve_cli_errors_are_one_line(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "lora_cai.serve", str(tmp_path / "missing")], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing" in lines[0] and lines[0].startswith("error:")


def test_serve_cli_serves_a_model_directory(tiny_model, expected):
    import queue
    import signal
    import threading

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lora_cai.serve", str(tiny_model), "--port", "0",
                             "--model-name", "cli-tiny"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env)
    lines: queue.Queue = queue.Queue()
    seen: list[str] = []  # everything the server wrote, shown when it exits badly
    threading.Thread(target=lambda: [(lines.put(line), seen.append(line)) for line in proc.stderr],
                     daemon=True).start()
    try:
        deadline = time.monotonic() + 90
        url = None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line.startswith("serving"):
                url = line.split(" at ", 1)[1].split()[0]
        assert url, "the server did not start"
        check_server(url)
        client = _client(url)
        client.model = "cli-tiny"
        assert client.chat(_messages(QUESTIONS[0]), max_tokens=MAX_TOKENS)["text"] == expected[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
            time.sleep(0.2)  # let the reader thread take the last lines
            assert code == 0, f"the server exited with {code}; its stderr ended:\n" + "".join(seen[-30:])
            assert seen[-1].strip() == "stopped"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
