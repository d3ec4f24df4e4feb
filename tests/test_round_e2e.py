"""Two CAI rounds end to end through the CLI, on the tiny model, for each backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, write_recipe

ROUND_FILES = [
    "adapter/README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
    "critique-1.jsonl", "critique-1.jsonl.meta.json", "critique-2.jsonl", "critique-2.jsonl.meta.json",
    "dpo_log.jsonl", "eval.json", "pairs.jsonl", "ref_logps.jsonl", "responses.jsonl", "responses.jsonl.meta.json",
    "sft.jsonl", "sft_log.jsonl", "train.json", "trajectories.jsonl",
]
REPORT = ["report.md", "report.html"] + [f"report/{name}.png" for name in
                                         ("sft_loss", "dpo", "eval", "judge_labels", "critique_outcomes")]
EXPECTED_TREE = sorted(["baseline-eval.json", "critic-check.json", "manifest.json"] + REPORT
                       + [f"round-{k}/{f}" for k in (1, 2) for f in ROUND_FILES])


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", params=["transformers", "unsloth"])
def finished_run(request, tiny_model, tmp_path_factory):
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"run-{backend}")
    recipe = write_recipe(tmp / "recipe.yaml", tiny_model, tmp / "run", backend=backend)
    proc = run_cli(str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return backend, recipe, tmp / "run", proc


def test_output_tree_is_exact(finished_run):
    _, _, run, _ = finished_run
    assert tree(run) == EXPECTED_TREE


def test_manifest_names_model_constitution_and_stack(finished_run, tiny_model):
    backend, _, run, proc = finished_run
    m = json.loads((run / "manifest.json").read_text())
    from lora_cai.cai.constitution import load_constitution

    assert m["model"]["name"] == str(tiny_model)
    assert m["backend"] == backend
    assert m["constitution"] == {"name": "default", "hash": load_constitution("default").hash()}
    assert m["stack"] == ["round-1/adapter", "round-2/adapter"]
    for k in ("1", "2"):
        r = m["rounds"][k]
        assert r["prompts"] == 6 and r["responses"] == 6
        assert r["sft_records"] == len(read_jsonl(run / f"round-{k}" / "sft.jsonl"))
        assert r["pairs"] == len(read_jsonl(run / f"round-{k}" / "pairs.jsonl"))
        assert r["sft"]["steps"] >= 1
    assert f"backend: {backend} (requested)" in proc.stderr
    assert "before -> after" in proc.stderr


def test_records_follow_the_schema(finished_run):
    _, _, run, _ = finished_run
    rd = run / "round-1"
    responses = read_jsonl(rd / "responses.jsonl")
    assert {r["id"] for r in responses} == {t["id"] for t in read_jsonl(rd / "trajectories.jsonl")}
    for t in read_jsonl(rd / "trajectories.jsonl"):
        assert set(t) == {"id", "prompt", "initial", "steps", "final", "stopped_early", "usable"}
        assert 1 <= len(t["steps"]) <= 2
    for p in read_jsonl(rd / "pairs.jsonl"):
        assert p["chosen"] != p["rejected"] and p["source"] == "revision"
    ref = read_jsonl(rd / "ref_logps.jsonl")
    assert [r["id"] for r in ref] == [p["id"] for p in read_jsonl(rd / "pairs.jsonl")]
    assert all(r["chosen_logp"] < 0 and r["rejected_logp"] < 0 for r in ref)


def test_new_adapters_learned(finished_run):
    """LoRA B starts at zero: non-zero B weights in each saved adapter prove each round trained its own."""
    from safetensors.torch import load_file

    _, _, run, _ = finished_run
    for k in (1, 2):
        weights = load_file(str(run / f"round-{k}" / "adapter" / "adapter_model.safetensors"))
        b = [v for n, v in weights.items() if "lora_B" in n]
        assert b and all(v.abs().sum() > 0 for v in b)
    w1 = load_file(str(run / "round-1" / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(run / "round-2" / "adapter" / "adapter_model.safetensors"))
    assert set(w1) == set(w2)
    assert any(not (w1[n] == w2[n]).all() for n in w1 if "lora_B" in n)


def test_load_policy_applies_the_whole_stack(finished_run, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    import lora_cai

    backend, _, run, _ = finished_run
    if backend == "unsloth":
        pytest.skip("load_policy is backend-independent; checked once, in a process without Unsloth patches")
    model, tok = lora_cai.load_policy(run)
    ids = tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        r1_model, _ = lora_cai.load_policy(run, upto=1)
        r1 = r1_model(input_ids=ids).logits
        base_model, _ = lora_cai.load_policy(run, upto=0)
        base = base_model(input_ids=ids).logits
    from lora_cai.engine.concat import concat_of

    # one adapter: round 1 concatenated in front of round 2 (checked against separate adapters in test_concat.py)
    assert list(model.peft_config) == ["round-2"] and concat_of(model).frozen_rank == r1_model.peft_config["round-1"].r
    assert not torch.allclose(full, r1) and not torch.allclose(full, base) and not torch.allclose(r1, base)
    # same 4-bit base as a plain from_pretrained load
    from transformers import BitsAndBytesConfig

    plain = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    for m in plain.modules():  # by hand, not through lora_cai: keep AVX512-BF16 CPUs off bnb's bf16 repack
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, base)


def test_rerun_skips_finished_stages(finished_run):
    backend, recipe, run, _ = finished_run
    if backend == "unsloth":
        pytest.skip("stage skipping is backend-independent")
    before = {p: (run / p).read_bytes() for p in tree(run)}
    proc = run_cli(str(recipe))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded" not in proc.stderr  # nothing needed the model
    after = {p: (run / p).read_bytes() for p in tree(run)}
    assert after == before
