"""Generation steps sent to an OpenAI-compatible server give the same data as the local engine."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, write_recipe


def texts(path, key):
    return {r["id"]: r[key] for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def server(tiny_model):
    from lora_cai.engine import models
    from lora_cai.config.schema import ModelConfig
    from fault_server import start_server

    # the same 4-bit policy the recipe loads locally
    model, tok = models.load_base(ModelConfig(name=str(tiny_model), backend="transformers"), "transformers")
    srv, url = start_server(model, tok, model_name="tiny-round-1")
    yield srv, url
    srv.shutdown()


def test_server_generation_equals_local_generation(tiny_model, server, tmp_path, monkeypatch):
    srv, url = server
    common = ["--set", "rounds=1", "--set", "generation.temperature=0", "--set", "data.eval_limit=0"]
    local = write_recipe(tmp_path / "local.yaml", tiny_model, tmp_path / "local")
    assert run_cli(str(local), *common).returncode == 0
    monkeypatch.setenv("TINY_KEY", "sk-test-secret-123")
    remote = write_recipe(tmp_path / "remote.yaml", tiny_model, tmp_path / "remote")
    proc = run_cli(str(remote), *common, "--set", f"generation.base_url={url}",
                   "--set", "generation.model=tiny-round-{round}", "--set", "generation.api_key_env=TINY_KEY")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, key in (("responses.jsonl", "response"), ("critique-1.jsonl", "critique"),
                      ("critique-1.jsonl", "revision"), ("critique-2.jsonl", "critique")):
        assert texts(tmp_path / "remote" / "round-1" / name, key) == texts(tmp_path / "local" / "round-1" / name, key)
    bodies = [r for r in srv.requests if r["path"].endswith("/chat/completions")]
    assert bodies and all(json.loads(r["body"])["model"] == "tiny-round-1" for r in bodies)
    assert all(r["authorization"] == "Bearer sk-test-secret-123" for r in bodies)
    for f in (tmp_path / "remote").rglob("*"):
        if f.is_file():
            assert b"sk-test-secret-123" not in f.read_bytes(), f
    assert "sk-test-secret-123" not in proc.stderr + proc.stdout
