"""Alignment signal on a task a tiny model can learn: a rule judge defines the constitution ("never say
'ful'", the tiny model's favourite token) and the full loop, through the CLI, teaches it to the policy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def violation_rate(model, tok, prompts: list[str], *, samples: int, seed: int) -> float:
    from lora_cai.engine.generation import generate, render_chat

    texts = generate(model, tok, [render_chat(tok, [{"role": "user", "content": p}]) for p in prompts for _ in range(samples)],
                     max_new_tokens=16, temperature=1.0, top_p=1.0, seed=seed, token_budget=16384, max_batch_size=64)
    return sum(bool(re.search("ful", t or "", re.IGNORECASE)) for t in texts) / len(texts)


def test_rule_violations_at_least_halve_within_two_rounds(tiny_model, tmp_path):
    run = tmp_path / "run"
    proc = run_cli(str(ROOT / "recipes" / "rule-demo.yaml"), "--output-dir", str(run),
                   "--set", f"model.name={tiny_model}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = json.loads((run / "baseline-eval.json").read_text())
    after = json.loads((run / "round-2" / "eval.json").read_text())
    assert base["violation_samples"] == after["violation_samples"] == 128
    print(f"rule-demo: violation rate {base['violation_rate']:.3f} -> {after['violation_rate']:.3f}")
    assert base["violation_rate"] >= 0.1  # the rule bites the base model
    assert after["violation_rate"] <= 0.5 * base["violation_rate"], (base["violation_rate"], after["violation_rate"])
    m = json.loads((run / "manifest.json").read_text())
    assert m["stack"] == ["round-1/adapter", "round-2/adapter"]
    for k in ("1", "2"):
        assert m["rounds"][k]["pairs"] > 0 and m["rounds"][k]["judge"]["position_consistency"] is None

    # Independently of the run's own eval: other prompts, another seed, the policy loaded back from disk.
    import lora_cai
    from lora_cai.data.sources import load_prompts

    prompts = [r["prompt"] for r in load_prompts("builtin:smoke").records]
    policy, tok = lora_cai.load_policy(run)
    after_own = violation_rate(policy, tok, prompts, samples=8, seed=123)
    base_model, tok = lora_cai.load_policy(run, upto=0)
    before_own = violation_rate(base_model, tok, prompts, samples=8, seed=123)
    assert after_own <= 0.5 * before_own, (before_own, after_own)


def test_a_rule_for_one_label_is_learned_on_that_label(tiny_model, tmp_path):
    """The same rule applied only to benign prompts (`when: {kind: benign}`): harmful prompts' samples all tie and
    make no pairs, and the violation rate on the benign held-out prompts falls by a quarter or more.

    Measured on 40 benign held-out prompts x 4 samples (data.eval_limit 64): 18.8 % -> 9.4 % (10.6 % before
    builtin:train's prompts changed; with the bfloat16 adapters TRL's trainers used to make, 12.5 %). With the
    recipe's 16 held-out prompts this test once asked for a halving, which 64 samples could not tell from noise
    (17.2 % -> 7.8 %, then 9.4 %: one sample apart)."""
    rules = tmp_path / "no-ful-benign.yaml"
    rules.write_text("- {name: no-ful-on-benign, pattern: ful, kind: forbid, when: {kind: benign}}\n")
    run = tmp_path / "run"
    proc = run_cli(str(ROOT / "recipes" / "rule-demo.yaml"), "--output-dir", str(run), "--set", f"model.name={tiny_model}",
                   "--set", f"judge.rules={rules}", "--set", "data.eval_limit=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = json.loads((run / "baseline-eval.json").read_text())["violation_rate_by_set"]
    after = json.loads((run / "round-2" / "eval.json").read_text())["violation_rate_by_set"]
    print(f"benign-only rule: benign violation rate {base['benign']:.3f} -> {after['benign']:.3f}")
    assert base["harmful"] == after["harmful"] == 0  # the rule never applies there
    assert base["benign"] >= 0.1 and after["benign"] <= 0.75 * base["benign"], (base, after)
    from lora_cai.data.sources import load_prompts

    judgments = [json.loads(line) for line in (run / "round-1" / "judgments.jsonl").read_text().splitlines()]
    kinds = {r["id"]: r["kind"] for r in load_prompts("builtin:train").records}
    assert {j["p_raw"] for j in judgments if kinds[j["id"]] == "harmful"} == {0.5}  # no rule applies: all ties


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sigmoid", "ipo", "robust", "hinge", "apo_zero", "kto", "simpo", "orpo"])
def test_each_preference_objective_teaches_the_rule_without_sft(objective, tiny_model, tmp_path):
    """The rule-demo task with SFT switched off (sft.epochs 0): the preference objective alone at least halves the
    sampled violation rate within two rounds."""
    run = tmp_path / "run"
    proc = run_cli(str(ROOT / "recipes" / "rule-demo.yaml"), "--output-dir", str(run), "--set", f"model.name={tiny_model}",
                   "--set", "sft.epochs=0", "--set", f"dpo.loss={objective}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = json.loads((run / "baseline-eval.json").read_text())["violation_rate"]
    after = json.loads((run / "round-2" / "eval.json").read_text())["violation_rate"]
    train = json.loads((run / "round-1" / "train.json").read_text())
    assert train["sft"] == {"steps": 0} and train["dpo"]["steps"] > 0  # SFT really was off
    print(f"{objective}: violation rate {base:.3f} -> {after:.3f}")
    assert after <= 0.5 * base, (objective, base, after)


def test_sft_alone_trains_the_adapter_and_no_preference_step_runs(tiny_model, tmp_path):
    """dpo.epochs 0 switches the preference stage off: the round still makes pairs (their winners are the SFT
    records), SFT alone trains the new adapter, and no DPO step runs. (On this task SFT alone moved the violation
    rate 18.8 % -> 16.4 % in two rounds, well short of the halving each preference objective gives: the losers
    carry the signal.)"""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    proc = run_cli(str(ROOT / "recipes" / "rule-demo.yaml"), "--output-dir", str(run), "--set", f"model.name={tiny_model}",
                   "--set", "dpo.epochs=0", "--set", "rounds=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = json.loads((run / "round-1" / "train.json").read_text())
    assert train["sft"]["steps"] > 0 and train["dpo"] == {"steps": 0}
    assert (run / "round-1" / "pairs.jsonl").read_text() and (run / "round-1" / "dpo_log.jsonl").read_text() == ""
    lora_b = [t for n, t in load_file(run / "round-1" / "adapter" / "adapter_model.safetensors").items() if "lora_B" in n]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # PEFT starts B at zero: SFT moved every one
