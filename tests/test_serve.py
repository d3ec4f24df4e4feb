"""`lora_cai.serve` as the servers it imitates: a run served as `base` and `round-k` with the adapters switched in
process (each name computing exactly `load_policy(run, upto=k)`), 404 for a model not served, streaming through the
`openai` client, 413 before a large body is read, and a one-line 400 for every malformed field.

The run directory is built cheaply: the tiny offline model in float32 and two random, non-zero LoRA adapters saved
with PEFT, with a manifest like the one `lora_cai.recipe` writes.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from lora_cai.engine import served as served_names
from lora_cai.serve import models as serve_models
from lora_cai.serve.server import start_server

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MESSAGES = [{"role": "user", "content": "How do I bake bread at home?"}]
TOKENS = 16


def save_round(tiny_model, root: Path, k: int, seed: int) -> None:
    """Round k's adapter: random A and B (B non-zero, so the round changes the policy)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "lora_B" in name else 0.5))
    peft_model.save_pretrained(str(root / f"round-{k}" / "adapter"))


def write_manifest(tiny_model, root: Path, rounds: int) -> None:
    from lora_cai.config.schema import ModelConfig
    from lora_cai.core.store import RunStore

    cfg = ModelConfig(name=str(tiny_model), backend="transformers", load_in_4bit=False, dtype="float32")
    RunStore(root).write_manifest({"name": "serve-test", "model": cfg.model_dump(), "backend": "transformers",
                                   "stack": [f"round-{k}/adapter" for k in range(1, rounds + 1)], "rounds": {}})


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-run")
    for k in (1, 2):
        save_round(tiny_model, root, k, seed=k)
    write_manifest(tiny_model, root, 2)
    return root


@pytest.fixture(scope="module")
def run_server(run_dir):
    server, url = start_server(serve_models.RunModels(run_dir), api_key="sk-serve-test")
    yield server, url
    server.shutdown()


def openai_client(url: str, key: str = "sk-serve-test"):
    import openai

    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def ask(client, model: str, **kw):
    kw = {"messages": MESSAGES, "max_tokens": TOKENS, "temperature": 0, **kw}
    return client.chat.completions.create(model=model, **kw)


def tokens_and_logprobs(answer) -> list[tuple[str, float, list[tuple[str, float]]]]:
    return [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
            for e in answer.choices[0].logprobs.content]


# ------------------------------------------------------------------------------------------ names and switching

def test_names_are_defined_once_and_the_template_follows_them():
    assert [served_names.policy_name(k) for k in range(3)] == ["base", "round-1", "round-2"]
    # round k starts from the policy after round k-1: {policy} names it, {round} stays the round's number
    assert served_names.expand_model_template("{policy}", 1) == "base"
    assert served_names.expand_model_template("{policy}", 3) == "round-2"
    assert served_names.expand_model_template("my-policy-round-{round}", 3) == "my-policy-round-3"


def test_models_lists_base_and_every_round(run_server):
    _, url = run_server
    assert [m.id for m in openai_client(url).models.list()] == ["base", "round-1", "round-2"]


def test_each_name_answers_as_load_policy_upto_that_round(run_dir, run_server):
    """One base in memory, the rounds switched in: every name gives the tokens and log-probs (top 5 too) of the
    policy loaded on its own (`load_policy(run, upto=k)`, served alone), bit for bit, in any order of requests.
    The three policies differ, so a switch that did not happen would show."""
    from lora_cai.engine.models import load_policy

    _, url = run_server
    client = openai_client(url)
    served = {name: tokens_and_logprobs(ask(client, name, logprobs=True, top_logprobs=5))
              for name in ("round-2", "round-1", "base", "round-1", "round-2")}
    alone = {}
    for k in (0, 1, 2):
        model, tok = load_policy(run_dir, upto=k, backend="transformers")
        server, one_url = start_server(model, tok, model_name="alone")
        try:
            alone[served_names.policy_name(k)] = tokens_and_logprobs(
                ask(openai_client(one_url), "alone", logprobs=True, top_logprobs=5))
        finally:
            server.shutdown()
    assert served == alone
    assert len({json.dumps(v) for v in alone.values()}) == 3, "the rounds must change the policy"
    assert all(len(v) >= 3 for v in alone.values())


def test_a_round_finished_or_retrained_while_serving_is_served_fresh(tiny_model, tmp_path):
    """The manifest gains round 2 and round 1 is retrained (another adapter in its folder): the running server
    answers for the new policies, never the ones it loaded first; a round's folder gone is a 503 until the
    manifest agrees, then a 404."""
    import openai

    from lora_cai.engine.models import load_policy

    save_round(tiny_model, tmp_path, 1, seed=1)
    write_manifest(tiny_model, tmp_path, 1)
    server, url = start_server(serve_models.RunModels(tmp_path))
    try:
        client = openai_client(url)
        before = tokens_and_logprobs(ask(client, "round-1", logprobs=True))
        assert [m.id for m in client.models.list()] == ["base", "round-1"]
        save_round(tiny_model, tmp_path, 1, seed=11)
        save_round(tiny_model, tmp_path, 2, seed=12)
        write_manifest(tiny_model, tmp_path, 2)
        assert [m.id for m in client.models.list()] == ["base", "round-1", "round-2"]
        after = {name: tokens_and_logprobs(ask(client, name, logprobs=True)) for name in ("round-1", "round-2")}
        alone = {}
        for k in (1, 2):
            model, tok = load_policy(tmp_path, upto=k, backend="transformers")
            one, one_url = start_server(model, tok, model_name="alone")
            try:
                alone[f"round-{k}"] = tokens_and_logprobs(ask(openai_client(one_url), "alone", logprobs=True))
            finally:
                one.shutdown()
        shutil.rmtree(tmp_path / "round-2")  # a restart moves the round away before the manifest says so
        with pytest.raises(openai.InternalServerError) as caught:
            ask(client, "round-1")
        assert caught.value.status_code == 503 and "round-2" in caught.value.body["message"]
        write_manifest(tiny_model, tmp_path, 1)
        assert tokens_and_logprobs(ask(client, "round-1", logprobs=True)) == after["round-1"]
        with pytest.raises(openai.NotFoundError):
            ask(client, "round-2")
    finally:
        server.shutdown()
    assert after == alone and after["round-1"] != before


def test_an_unknown_model_is_404_in_openais_shape(run_server, tiny):
    import openai

    _, url = run_server
    with pytest.raises(openai.NotFoundError) as caught:
        ask(openai_client(url), "round-9")
    error = caught.value.body
    assert caught.value.status_code == 404
    assert error["code"] == "model_not_found" and error["param"] == "model" and error["type"] == "invalid_request_error"
    assert "round-9" in error["message"] and "base, round-1, round-2" in error["message"]
    server, one_url = start_server(*tiny, model_name="tiny")  # a single model refuses other names too
    try:
        with pytest.raises(openai.NotFoundError):
            ask(openai_client(one_url), "round-1")
        assert ask(openai_client(one_url), "tiny").choices[0].message.content
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------ streaming

@pytest.mark.parametrize("stop", [None, ["e"]])
def test_streaming_through_the_openai_client_equals_the_whole_answer(run_server, stop):
    """Token by token: more than one content chunk, their concatenation the non-streamed greedy answer (cut at
    the stop string as that one is), a finish reason, then usage when asked."""
    _, url = run_server
    client = openai_client(url)
    whole = ask(client, "round-1", stop=stop).choices[0].message.content
    chunks = list(ask(client, "round-1", stop=stop, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert whole and (stop is None or "e" not in whole)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1 and all(c.model == "round-1" for c in chunks)


def test_a_stream_is_server_sent_events_ending_with_done(run_server):
    _, url = run_server
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = json.dumps({"model": "base", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True})
    conn.request("POST", u.path + "/chat/completions", body=body,
                 headers={"Content-Type": "application/json", "Authorization": "Bearer sk-serve-test"})
    reply = conn.getresponse()
    text = reply.read().decode("utf-8")
    assert reply.status == 200 and reply.getheader("Content-Type") == "text/event-stream"
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:  # HTTP/1.0: no chunks, the stream ends
        s.sendall(f"POST {u.path}/chat/completions HTTP/1.0\r\nAuthorization: Bearer sk-serve-test\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        received = b"".join(iter(lambda: s.recv(65536), b"")).decode("utf-8")
    again = [e for e in received.split("\r\n\r\n", 1)[1].split("\n\n") if e]
    assert again[-1] == "data: [DONE]" and [json.loads(e[6:])["choices"] for e in again[:-1]] == [
        c["choices"] for c in chunks]  # the same events (greedy), ids aside


# ------------------------------------------------------------------------------------------ limits and bad fields

def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 10) -> tuple[int, dict]:
    """Send `head` (request line and headers) and `body` as they are; the status and JSON body of the reply."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(head.encode("ascii") + b"\r\n" + body)
        reply = http.client.HTTPResponse(s)
        reply.begin()
        return reply.status, json.loads(reply.read())


def test_a_body_over_the_limit_is_413_before_it_is_read_and_before_the_key(run_server, tiny):
    """The body is announced and never sent: a server that read it would wait out the 10 s timeout."""
    _, url = run_server
    path = urlparse(url).path + "/chat/completions"
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {(1 << 20) + 1}\r\n"
    status, body = raw_request(url, head)  # no key at all: the size is refused first
    assert status == 413 and str((1 << 20) + 1) in body["error"]["message"] and "\n" not in body["error"]["message"]
    status, _ = raw_request(url, head.replace(str((1 << 20) + 1), "2"), b"{}")
    assert status == 401  # under the limit, the missing key is what is refused
    server, one_url = start_server(*tiny, model_name="tiny", max_body_bytes=100)
    try:
        big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 200}]}).encode()
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(big)}\r\n"
        assert raw_request(one_url, head, big)[0] == 413
    finally:
        server.shutdown()


def test_the_product_server_keeps_no_request_log(run_server):
    server, url = run_server
    ask(openai_client(url), "base")
    kept = json.dumps({k: v for k, v in vars(server).items() if isinstance(v, (str, list, dict, tuple))}, default=str)
    assert not hasattr(server, "requests") and not hasattr(server, "fault_plan")
    assert "Bearer" not in kept and "bake bread" not in kept


BAD_FIELDS = [
    ({"n": "2"}, "n"), ({"n": 1.0}, "n"), ({"n": 2}, "n"), ({"n": True}, "n"),
    ({"top_logprobs": "3", "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2.5, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": 2.0}, "max_completion_tokens"),
    ({"temperature": "hot"}, "temperature"), ({"temperature": -1}, "temperature"), ({"top_p": True}, "top_p"),
    ({"top_p": 0}, "top_p"), ({"seed": 1.5}, "seed"), ({"seed": "7"}, "seed"), ({"stop": 5}, "stop"),
    ({"stop": ["a", 1]}, "stop"), ({"logprobs": "yes"}, "logprobs"), ({"stream": "yes"}, "stream"),
    ({"model": 5}, "model"), ({"messages": []}, "messages"), ({"messages": [{"role": "user"}]}, "messages"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 1024}, "messages"),  # prompt + max_tokens over the tiny model's 1024-token context
    ({"max_tokens": 1024, "logprobs": True}, "messages"),  # the log-probs path is bounded like the others
    ({"max_tokens": 10 ** 9, "stream": True}, "messages"),
]


@pytest.mark.parametrize("fields,param", BAD_FIELDS, ids=[json.dumps(f) for f, _ in BAD_FIELDS])
def test_every_malformed_field_is_a_one_line_400(run_server, fields, param):
    _, url = run_server
    body = json.dumps({"model": "round-1", "messages": MESSAGES, "max_tokens": 4, **fields}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-serve-test\r\n"
            f"Content-Length: {len(body)}\r\n")
    status, reply = raw_request(url, head, body, timeout=30)
    error = reply["error"]
    assert status == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"]


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"\xff\xfe"])
def test_a_body_that_is_no_json_object_is_a_400(run_server, body):
    _, url = run_server
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-serve-test\r\n"
            f"Content-Length: {len(body)}\r\n")
    status, reply = raw_request(url, head, body)
    assert status == 400 and "\n" not in reply["error"]["message"]


# ------------------------------------------------------------------------------------------ command line

def test_cli_refuses_a_model_name_for_a_run_in_one_line(run_dir):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "lora_cai.serve", str(run_dir), "--model-name", "x"],
                            capture_output=True, text=True, env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--model-name" in lines[0] and "round-1" in lines[0]


def test_cli_serves_a_run_by_round(run_dir):
    """`python -m lora_cai.serve RUN` as a user starts it: it says what it serves, answers by name, stops on SIGTERM."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lora_cai.serve", str(run_dir), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        line = ""
        while not line.startswith("serving") and proc.poll() is None:
            line = proc.stderr.readline()
        assert line.startswith("serving base, round-1, round-2 at "), line
        url = line.split(" at ", 1)[1].split()[0]
        client = openai_client(url)
        assert [m.id for m in client.models.list()] == ["base", "round-1", "round-2"]
        assert ask(client, "round-2").model == "round-2"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0 and proc.stderr.read().strip().splitlines()[-1] == "stopped"


# ------------------------------------------------------------------------------------------ a recipe through it

def test_a_recipe_generates_each_round_through_the_served_run_by_policy_name(tiny_model, tmp_path):
    """`generation.model: "{policy}"` against `serve` on a finished run of the same recipe: round 1 asks for
    `base`, round 2 for `round-1`, and every response, critique and revision equals the local run's (greedy;
    round 2's only if the name picked exactly the policy the local round 2 started from)."""
    from conftest import run_cli, write_recipe

    def texts(path: Path, key: str) -> dict:
        return {r["id"]: r[key] for r in map(json.loads, path.read_text().splitlines())}

    common = ["--set", "generation.temperature=0", "--set", "data.eval_limit=0"]
    proc = run_cli(str(write_recipe(tmp_path / "local.yaml", tiny_model, tmp_path / "local")), *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    server, url = start_server(serve_models.RunModels(tmp_path / "local"))
    try:
        proc = run_cli(str(write_recipe(tmp_path / "remote.yaml", tiny_model, tmp_path / "remote")), *common,
                       "--set", f"generation.base_url={url}", "--set", 'generation.model="{policy}"')
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    for k in (1, 2):
        for name, key in (("responses.jsonl", "response"), ("critique-1.jsonl", "critique"),
                          ("critique-1.jsonl", "revision")):
            remote, local = (texts(tmp_path / run / f"round-{k}" / name, key) for run in ("remote", "local"))
            assert remote == local and len(local) == 6, (k, name, key)
