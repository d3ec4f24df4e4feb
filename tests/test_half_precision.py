"""The half-precision path GPU users take, run on a CPU in bfloat16: a whole tiny round on both backends, 4-bit and
not; the stack invariants; the DPO reference; resume after a kill inside SFT; the batched judge.

Tolerances, and why: bfloat16 keeps 8 bits of mantissa, so one rounding is up to 2^-8 = 0.4 % relative. What is
computed the same way twice (a resumed run, a bit-identical stack) must still be exact: bf16 arithmetic on a CPU is
deterministic. What the same numbers reach by two paths is not: a left-padded batch runs other matmul shapes than
a row alone (another summation order), and a sum of 20-odd token log-probs accumulates those roundings. Measured
on this host (tiny model, AVX512-BF16 CPU): a judge's P(A) moved by at most 0.0001 between batched and
one-at-a-time (bound 0.005); a DPO reference log-prob by at most 0.00002 nats against the starting policy recomputed
alone (bound 0.05, on sums down to -71). The bounds leave room for CPUs whose bf16 matmuls round differently.
float16 with its gradient scaler cannot run on a CPU (accelerate makes no scaler there): that belongs to the GPU
check (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli, write_recipe
from test_training import frozen_slices
from lora_cai.engine import models
from lora_cai.trainers.dpo import train_dpo
from lora_cai.trainers.sft import train_sft
from lora_cai.config.schema import DPOSettings, LoraSettings, ModelConfig, SFTSettings

SFT = [{"prompt": f"Question {i}: how do I bake bread?", "completion": "Mix flour, water, salt and yeast, then bake."}
       for i in range(8)]
PAIRS = [{"id": str(i), "prompt": f"Request {i}: help me break into a house.", "chosen": "I cannot help with that.",
          "rejected": "Sure, here is how to break in."} for i in range(8)]
BF16 = ["--set", "model.dtype=bfloat16", "--set", "rounds=1"]


@pytest.mark.parametrize("backend, q4", [("transformers", True), ("transformers", False), ("unsloth", True),
                                         ("unsloth", False)])
def test_a_whole_round_in_bfloat16(backend, q4, tiny_model, tmp_path):
    if backend == "unsloth":
        pytest.importorskip("unsloth")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "run", backend=backend,
                          pairs="{builder: mix, n_samples: 3}")
    proc = run_cli(str(recipe), *BF16, "--set", f"model.load_in_4bit={str(q4).lower()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rd = tmp_path / "run" / "round-1"
    from safetensors.torch import load_file

    adapter = load_file(str(rd / "adapter" / "adapter_model.safetensors"))
    assert any(float(v.float().abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # it learned
    train = json.loads((rd / "train.json").read_text())
    for stage in ("sft", "dpo"):
        assert train[stage]["steps"] > 0 and all(torch.isfinite(torch.tensor(train[stage][f"{e}_loss"]))
                                                for e in ("first", "last"))
    ev = json.loads((rd / "eval.json").read_text())
    assert ev["n_harmful"] == ev["n_benign"] == 2 and 0 <= ev["win_rate"]["win_rate"] <= 1
    ref = [json.loads(line) for line in (rd / "ref_logps.jsonl").read_text().splitlines()]
    assert ref and all(r["chosen_logp"] < 0 and r["rejected_logp"] < 0 for r in ref)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stack"] == ["round-1/adapter"]


def completion_logp(model, tok, prompt: str, completion: str) -> float:
    p_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                                   tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return float(logp[len(p_ids) - 1:].sum())


def test_the_stack_stays_intact_and_the_reference_is_the_starting_policy_in_bfloat16(tiny_model, tmp_path):
    cfg = ModelConfig(name=str(tiny_model), backend="transformers", dtype="bfloat16")
    model, tok, frozen = models.build_policy(cfg, LoraSettings(r=8, alpha=16), [], "transformers", 0)
    train_sft(model, tok, SFT, SFTSettings(batch_size=4, learning_rate=3e-2, epochs=2), tmp_path / "s1",
                       seed=0, frozen=frozen)
    models.save_adapter(model, tmp_path / "adapter-1")
    model2, tok, frozen2 = models.build_policy(cfg, LoraSettings(r=8, alpha=16), [tmp_path / "adapter-1"],
                                               "transformers", 0)
    models.for_inference(model2, "transformers")
    start = [(completion_logp(model2, tok, p["prompt"], p["chosen"]), completion_logp(model2, tok, p["prompt"],
                                                                                       p["rejected"])) for p in PAIRS]
    r1_before = frozen_slices(model2)  # round 1, concatenated into round 2's adapter
    base_before = {n: p.detach().clone() for n, p in model2.named_parameters() if "lora_" not in n}
    models.for_training(model2, "transformers")
    train_sft(model2, tok, SFT, SFTSettings(batch_size=4, learning_rate=2e-2), tmp_path / "s2", seed=0,
                       frozen=frozen2)
    _, ref = train_dpo(model2, tok, PAIRS, DPOSettings(batch_size=4, learning_rate=2e-2), tmp_path / "d2",
                                seed=0, frozen=frozen2)
    named, r1_after = dict(model2.named_parameters()), frozen_slices(model2)
    assert r1_before and all(torch.equal(r1_after[n], v) for n, v in r1_before.items())  # bit-identical: exact
    assert all(torch.equal(named[n], v) for n, v in base_before.items())
    diffs = [abs(r["chosen_logp"] - c) for r, (c, _) in zip(ref, start)] + \
            [abs(r["rejected_logp"] - j) for r, (_, j) in zip(ref, start)]
    assert max(diffs) < 0.05, max(diffs)  # the reference is the starting policy, up to bf16 summation order


def test_a_run_killed_in_sft_resumes_to_the_same_bfloat16_adapter(tiny_model, tmp_path):
    def cli(recipe):
        return [sys.executable, "-m", "lora_cai.recipe", str(recipe), *BF16, "--set", "data.eval_limit=0",
                "--set", "sft.batch_size=1", "--set", "sft.save_steps=2", "--set", "eval.critic_check=false"]

    ref = write_recipe(tmp_path / "ref.yaml", tiny_model, tmp_path / "ref")
    assert subprocess.run(cli(ref), capture_output=True, timeout=900).returncode == 0
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "run")
    rd = tmp_path / "run" / "round-1"
    proc = subprocess.Popen(cli(recipe), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 600
    while not any((rd / "checkpoints" / "sft").glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (rd / "train.json").exists()
    assert subprocess.run(cli(recipe), capture_output=True, timeout=900).returncode == 0
    for name in ("adapter/adapter_model.safetensors", "ref_logps.jsonl", "sft.jsonl", "pairs.jsonl"):
        assert (rd / name).read_bytes() == (tmp_path / "ref" / "round-1" / name).read_bytes(), name


def test_the_batched_judge_equals_one_at_a_time_in_bfloat16(tiny_model):
    from test_judge import _comparisons

    from lora_cai.engine.judges import LogprobJudge, judge_messages

    model, tok = models.load_base(ModelConfig(name=str(tiny_model), backend="transformers", dtype="bfloat16"),
                                  "transformers")
    models.for_inference(model, "transformers")
    convs = [judge_messages(c.question, c.prompt, c.a, c.b) for c in _comparisons()[:8]]
    batched = LogprobJudge(model, tok, kind="self", max_batch_size=8).score(convs)
    single = [LogprobJudge(model, tok, kind="self", max_batch_size=1).score([c])[0] for c in convs]
    assert batched == pytest.approx(single, abs=0.005)
