"""A teacher as critic and judge: a local 4-bit teacher (with the student unloaded to make room) and an
OpenAI-compatible teacher on loopback, through the CLI on tiny models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli, write_recipe


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory) -> Path:
    from lora_cai.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "model", seed=1)


def _recipe(tmp: Path, student: Path, **extra) -> Path:
    return write_recipe(tmp / "recipe.yaml", student, tmp / "run", rounds="1", **extra)


def test_local_teacher_critiques_and_judges_with_the_student_unloaded(tiny_model, teacher_model, tmp_path):
    recipe = _recipe(tmp_path, tiny_model, critic="teacher", vram_gb="0.001",
                     judge=f"{{kind: teacher, model: {teacher_model}}}",
                     pairs="{builder: mix, n_samples: 3, judge_revisions: true}",
                     eval="{capability_limit: 0, critic_check: true, early_stop_drop: null}")
    proc = run_cli(str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unloading the student to make room for the teacher" in proc.stderr
    # the critic check ran on the teacher before the baseline eval, which needs the student back
    assert "unloading the teacher to make room for the student" in proc.stderr
    assert json.loads((tmp_path / "run" / "critic-check.json").read_text())["n_harmful"] == 6
    rd = tmp_path / "run" / "round-1"

    # The critiques are the teacher's: the same greedy critiques come out of the teacher model directly.
    from lora_cai.stages import critique
    from lora_cai.engine import models
    from lora_cai.config.load import load_recipe
    from lora_cai.cai.constitution import load_constitution
    from lora_cai.engine.generators import LocalGenerator

    cfg = load_recipe(recipe)
    const = load_constitution("default")
    model, tok = models.load_base(cfg.model.model_copy(update={"name": str(teacher_model)}), "transformers")
    responses = [r for r in read_jsonl(rd / "responses.jsonl") if r["response"] is not None]
    convs = [critique.critique_messages(const, critique.pick_principle(const, cfg.seed + 1, r["id"], 1), r["prompt"],
                                        r["response"], cfg.critique.demonstrations) for r in responses]
    expected = LocalGenerator(model, tok, token_budget=cfg.generation.token_budget,
                              max_batch_size=cfg.generation.max_batch_size).generate(
        convs, max_new_tokens=cfg.generation.critique_max_new_tokens, temperature=0.0, seed=cfg.seed + 1)
    got = {r["id"]: r["critique"] for r in read_jsonl(rd / "critique-1.jsonl")}
    assert [got[r["id"]] for r in responses] == expected

    judgments = read_jsonl(rd / "judgments.jsonl")
    assert judgments and {j["judge"] for j in judgments} == {"teacher"}
    assert {j["source"] for j in judgments} == {"best_of_n", "revision"}
    assert all(0 <= j["p_raw"] <= 1 and j["principle"] for j in judgments)
    summary = json.loads((tmp_path / "run" / "manifest.json").read_text())["rounds"]["1"]
    stats = summary["judge"]
    assert stats["comparisons"] == len(judgments) and 0 <= stats["position_consistency"] <= 1
    assert sum(stats["label_histogram"]) == len(judgments)
    for p in read_jsonl(rd / "pairs.jsonl"):  # every kept pair passed the confidence filter and names its judge
        assert p["p_raw"] >= 0.7 and p["judge"] == "teacher" and p["chosen"] != p["rejected"]
    assert set(summary["peak_memory_gb"]) >= {"responses", "samples", "critique-1", "judge", "train", "eval"}


def test_teacher_fits_beside_the_student_on_a_large_budget(tiny_model, teacher_model, tmp_path):
    from rich.console import Console

    from lora_cai.config.load import load_recipe
    from lora_cai.loop.session import Models

    recipe = _recipe(tmp_path, tiny_model, critic="teacher", judge=f"{{kind: teacher, model: {teacher_model}}}")
    cfg = load_recipe(recipe)
    models = Models(Console(stderr=True), tmp_path / "run")
    assert models.fits_together(cfg)
    cfg.vram_gb = 0.001
    assert not models.fits_together(cfg)


def test_api_teacher_through_the_cli_retries_and_never_writes_the_key(tiny, tiny_model, tmp_path):
    from fault_server import start_server

    key = "sk-never-in-a-file-4242"
    model, tok = tiny
    server, url = start_server(model, tok, model_name="teacher", api_key=key, fault_plan=[429, 500],
                               max_top_logprobs=len(tok))
    try:
        recipe = _recipe(tmp_path, tiny_model, critic="api",
                         judge=f"{{kind: api, base_url: '{url}', model: teacher, api_key_env: LORA_CAI_TEST_KEY, "
                               f"top_logprobs: {len(tok)}}}",
                         pairs="{builder: best_of_n, n_samples: 3}",
                         eval="{capability_limit: 0, critic_check: false, win_rate: false}")
        os.environ["LORA_CAI_TEST_KEY"] = key
        try:
            proc = run_cli(str(recipe))
        finally:
            del os.environ["LORA_CAI_TEST_KEY"]
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert key not in proc.stdout + proc.stderr
    rd = tmp_path / "run" / "round-1"
    judgments = read_jsonl(rd / "judgments.jsonl")
    assert judgments and {j["judge"] for j in judgments} == {"api"} and not any(j["garbled"] for j in judgments)
    assert all(e["authorization"] == f"Bearer {key}" for e in server.requests)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f
