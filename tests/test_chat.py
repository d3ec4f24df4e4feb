"""`python -m lora_cai.chat RUN_DIR`: one-shot and interactive answers from a run's policy, `--base` from the same
model with its adapters off, and one-line errors for anything that is not a run directory.

The run directory is built cheaply: the tiny offline model, one LoRA adapter whose B matrices are random (so the
policy differs from the base model) saved with PEFT, and a manifest like the one `lora_cai.recipe` writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROMPT = "How do I bake bread at home?"
TOKENS = 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_chat(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", COLUMNS="200")
    r = subprocess.run([sys.executable, "-m", "lora_cai.chat", *args], capture_output=True,
                       input=None if stdin is None else stdin.encode("utf-8"), env=env, timeout=timeout)
    # bytes decoded by hand: text mode would turn a "\r" in the random model's answers into "\n"
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8"))


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory) -> Path:
    """A finished one-round run: the tiny model (fp32, no 4-bit) + one random, non-zero LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_cai.config.schema import ModelConfig

    root = tmp_path_factory.mktemp("chat-run")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(root / "round-1" / "adapter"))
    model_cfg = ModelConfig(name=str(tiny_model), backend="transformers", load_in_4bit=False, dtype="float32")
    (root / "manifest.json").write_text(json.dumps({
        "name": "chat-test", "model": model_cfg.model_dump(), "backend": "transformers",
        "stack": ["round-1/adapter"], "rounds": {}}))
    return root


@pytest.fixture(scope="module")
def policy(run_dir):
    from lora_cai.engine.models import load_policy

    return load_policy(run_dir)


def greedy(model, tokenizer, messages: list[dict]) -> str:
    from lora_cai.engine.generation import generate, render_chat

    (text,) = generate(model, tokenizer, [render_chat(tokenizer, messages)], max_new_tokens=TOKENS, temperature=0.0)
    return text


@pytest.fixture(scope="module")
def expected(policy, tiny):
    """The policy's greedy answer (load_policy + generate) and the plain base model's (from_pretrained + generate)."""
    turn = [{"role": "user", "content": PROMPT}]
    answers = {"policy": greedy(*policy, turn), "base": greedy(*tiny, turn)}
    assert answers["policy"] and answers["base"]
    assert answers["policy"] != answers["base"], "the random adapter must change the answer"
    return answers


def test_prompt_prints_the_policy_answer(run_dir, expected, capsys):
    from lora_cai.chat import main

    assert main([str(run_dir), "--prompt", PROMPT, "--max-new-tokens", str(TOKENS)]) == 0
    assert capsys.readouterr().out == expected["policy"] + "\n"


def test_base_shows_both_answers_from_one_model(run_dir, expected):
    r = run_chat(str(run_dir), "--base", "--prompt", PROMPT, "--max-new-tokens", str(TOKENS))
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("\n\n")
    assert len(blocks) == 2, r.stdout
    (policy_label, policy_answer), (base_label, base_answer) = (b.rstrip("\n").split("\n", 1) for b in blocks)
    assert policy_label.startswith("policy (") and "round-1/adapter" in policy_label
    assert base_label.startswith("base (") and "adapters off" in base_label
    assert policy_answer == expected["policy"]
    assert base_answer == expected["base"]


def test_upto_zero_is_the_base_model(run_dir, expected, capsys):
    from lora_cai.chat import main

    assert main([str(run_dir), "--upto", "0", "--base", "--prompt", PROMPT, "--max-new-tokens", str(TOKENS)]) == 0
    out = capsys.readouterr()
    assert out.out == expected["base"] + "\n"  # no adapters: one answer, the base model's
    assert "no adapters" in out.err


def test_interactive_keeps_history_per_side_and_resets(run_dir, policy, tiny, expected):
    second = "Tell me about water."
    r = run_chat(str(run_dir), "--base", "--max-new-tokens", str(TOKENS),
                 stdin=f"{PROMPT}\n{second}\n/reset\n{PROMPT}\n/nope\n/quit\nnever read\n")
    assert r.returncode == 0, r.stderr
    # turn 2 sees turn 1 (each side its own earlier answer)
    policy_2 = greedy(*policy, [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": expected["policy"]},
                                {"role": "user", "content": second}])
    base_2 = greedy(*tiny, [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": expected["base"]},
                            {"role": "user", "content": second}])
    out = r.stdout
    first_policy = f":\n{expected['policy']}\n"
    assert out.count(first_policy) == 2  # asked again after /reset: the same first-turn answer
    assert out.count(f":\n{expected['base']}\n") == 2
    assert f":\n{policy_2}\n" in out and f":\n{base_2}\n" in out
    assert out.index(f":\n{policy_2}\n") < out.index("(conversation reset)") < out.rindex(first_policy)
    assert "unknown command /nope" in out


def test_module_import_keeps_the_package_chat_function(run_dir, expected):
    import lora_cai
    import lora_cai.chat  # noqa: F401  (rebinds the package attribute to the module)

    assert lora_cai.chat(str(run_dir), PROMPT, max_new_tokens=TOKENS) == expected["policy"]
    assert lora_cai.chat(str(run_dir), PROMPT, base=True, max_new_tokens=TOKENS) == expected["base"]


@pytest.mark.parametrize("case", ["missing", "no-manifest", "file", "bad-json", "no-model", "missing-adapter",
                                  "bad-upto", "bad-tokens", "bad-option"])
def test_mistakes_are_one_line_exit_2(case, run_dir, tmp_path):
    args = {"missing": [str(tmp_path / "nope")], "no-manifest": [str(tmp_path)],
            "file": [str(run_dir / "manifest.json")], "bad-upto": [str(run_dir), "--upto", "2"],
            "bad-tokens": [str(run_dir), "--max-new-tokens", "0"], "bad-option": [str(run_dir), "--sideways"]}.get(case)
    culprit = {"missing": "nope", "no-manifest": "manifest.json", "file": "not a directory", "bad-json": "manifest.json",
               "no-model": "model.name", "missing-adapter": "round-1/adapter", "bad-upto": "--upto 2",
               "bad-tokens": "--max-new-tokens", "bad-option": "--sideways"}[case]
    if args is None:
        bad = tmp_path / "run"
        bad.mkdir()
        manifest = {"bad-json": "{not json", "no-model": json.dumps({"stack": []}),
                    "missing-adapter": json.dumps({"model": {"name": "x"}, "stack": ["round-1/adapter"]})}[case]
        (bad / "manifest.json").write_text(manifest)
        args = [str(bad), "--prompt", "hi"]
    r = run_chat(*args, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
