"""Export: the merged checkpoint computes what the stacked 4-bit policy computes, holds no quantized weights,
loads plainly; folding; every failure is one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_cai import load_policy
from lora_cai.export.cli import main
from lora_cai.export.weights import export_run, fold_stack, single_adapter
from lora_cai.engine import models
from lora_cai.config.schema import LoraSettings, ModelConfig
from lora_cai.core.store import RunStore

TEXTS = ["How do I bake bread at home? Mix flour, water, salt and yeast, then bake.",
         "I cannot help with that request because it could hurt people.",
         "Which response is more helpful, honest and harmless? Answer (A) or (B).",
         "Python lists, dictionaries and functions are the basics of programming."]


def make_run(tiny_model, root: Path) -> Path:
    """A finished two-round run directory, cheaply: random non-zero LoRA weights instead of training.

    The adapters sit on the 4-bit base as in training; round 2's is stored in bfloat16, as TRL's QLoRA
    cast leaves trained adapters.
    """
    from peft import get_peft_model

    cfg = ModelConfig(name=str(tiny_model), backend="transformers")
    base, _ = models.load_base(cfg, "transformers")
    peft_model = get_peft_model(base, models.lora_config(LoraSettings(r=8, alpha=16)))
    for k, dtype in ((1, torch.float32), (2, torch.bfloat16)):
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.data = (torch.randn(p.shape, generator=gen) * (0.02 if "lora_B" in name else 0.3)).to(dtype)
        peft_model.save_pretrained(root / f"round-{k}" / "adapter")
    RunStore(root).write_manifest({"lora_cai": "0.1.0", "libraries": {}, "name": "test", "model": cfg.model_dump(),
                                   "backend": "transformers", "stack": ["round-1/adapter", "round-2/adapter"],
                                   "rounds": {}, "seed": 0})
    return root


def logits(model, tok) -> torch.Tensor:
    """Next-token logits at every real (unpadded) position of TEXTS, in float64 (exact for a float32 model)."""
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch).logits.double()
    return out[batch["attention_mask"].bool()]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "lora_cai.export", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """The run, and its whole stack exported in float32 through the command line, as a user runs it."""
    root = tmp_path_factory.mktemp("export")
    run = make_run(tiny_model, root / "run")
    proc = cli(str(run), "--out", str(root / "merged"), "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run, root / "merged"


@pytest.fixture(scope="module")
def policy_logits(exported):
    model, tok = load_policy(exported[0], backend="transformers")
    stacked = logits(model, tok)
    with model.disable_adapter():
        bare = logits(model, tok)
    return stacked, bare


def test_merged_fp32_computes_what_the_stacked_policy_computes(exported, policy_logits, tiny):
    """Float32 is the point here (the export's dtype, the 4-bit base's compute dtype), so the tolerance is the host's
    fp32 summation order (x(W + sum BA) vs xW + sum B(Ax)): measured 2.0e-6 to 2.5e-6 of the largest logit under
    tests/host_variance.sh's knobs. The bound, 1e-4 relative, is 40 times that; the bugs it guards exceed it by a
    thousand times: the stack dropped (max |stacked - bare| is 1.2 of the largest logit), or round 2 dropped (1.1)."""
    from transformers import AutoModelForCausalLM

    stacked, bare = policy_logits
    merged = AutoModelForCausalLM.from_pretrained(exported[1]).eval()
    got = logits(merged, tiny[1])
    scale = stacked.abs().max()
    assert (got - stacked).abs().max() <= 1e-4 * scale
    assert (stacked - bare).abs().max() > 1e3 * 1e-4 * scale  # the adapters matter: the bound is meaningful
    round_1, tok = load_policy(exported[0], upto=1, backend="transformers")
    assert (logits(round_1, tok) - stacked).abs().max() > 1e3 * 1e-4 * scale  # and so does each round
    assert torch.equal(got.argmax(-1), stacked.argmax(-1))


def test_export_holds_plain_weights_only_and_records_its_source(exported, tiny):
    from safetensors.torch import load_file

    run, out = exported
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    weights = {}
    for f in out.glob("*.safetensors"):
        weights.update(load_file(f))
    plain = tiny[0].state_dict()
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in plain.items()}
    assert {v.dtype for v in weights.values()} == {torch.float32}
    marker = json.loads((out / "lora_cai_export.json").read_text())
    assert marker["stack"] == ["round-1/adapter", "round-2/adapter"] and marker["dtype"] == "float32"
    assert marker["source_run"] == run.name and len(marker["adapter_sha256"]) == 2
    # nothing that a push uploads names a local path
    for f in out.rglob("*"):
        if f.is_file() and f.suffix != ".safetensors":
            text = f.read_bytes().decode("utf-8", "replace")
            assert str(run.resolve().parent) not in text and os.path.expanduser("~") + "/" not in text, f.name
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == tiny[1].chat_template


def test_upto_one_in_bfloat16_matches_round_one(exported, tmp_path):
    """`--upto 1` merges round 1 only; the default bfloat16 costs bf16 rounding of weights and activations.

    Measured for the whole stack: mean |diff| 0.024 (2 % of what the adapters change, 1.19), greedy next token
    equal at 97.7 % of positions (the rest near-ties). Bounds: 10 % and 90 %.
    """
    from transformers import AutoModelForCausalLM

    run = exported[0]
    out = export_run(run, tmp_path / "r1", upto=1)
    model, tok = load_policy(run, upto=1, backend="transformers")
    want = logits(model, tok)
    with model.disable_adapter():
        effect = (want - logits(model, tok)).abs().mean()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    got = logits(merged, tok)
    assert (got - want).abs().mean() <= 0.1 * effect
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert json.loads((out / "lora_cai_export.json").read_text())["stack"] == ["round-1/adapter"]


def test_fold_stack_gives_a_base_that_loads_in_4bit_with_the_rest_of_the_stack(exported, policy_logits, tiny,
                                                                               tmp_path):
    """Round 1 folded into a 16-bit base, re-quantized on load, round 2 stacked on top: the long-run path.

    The mechanics are checked here; the accuracy is benchmarks/bench_fold.py's (re-quantizing rounds small
    adapter deltas back onto the NF4 grid). Bound: no worse than 1.5x one NF4 quantization's own cost;
    measured mean |folded - stacked| 0.54 against mean |4-bit base - fp32 base| 0.57.
    """
    run = exported[0]
    cfg = ModelConfig(**RunStore(run).read_manifest()["model"])
    folded = fold_stack(cfg, [run / "round-1/adapter"], tmp_path / "folded", "bfloat16")
    assert json.loads((folded / "lora_cai_export.json").read_text())["kind"] == "fold"
    model, tok, frozen = models.build_policy(ModelConfig(name=str(folded), backend="transformers"),
                                             LoraSettings(r=8, alpha=16), [run / "round-2/adapter"], "transformers", 0)
    assert frozen == [] and models.active_adapters(model) == ["default"]  # round 2 concatenated into the new one
    assert any("Params4bit" in type(p).__name__ for p in model.parameters())
    model.eval()
    got = logits(model, tok)
    stacked, bare = policy_logits
    quantization_cost = (logits(tiny[0], tok) - bare).abs().mean()
    assert (got - stacked).abs().mean() <= 1.5 * quantization_cost


def errors_of(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case", ["missing", "not-a-run", "bad-upto", "adapter-gone", "out-taken", "bad-dtype"])
def test_bad_input_is_one_line_and_exit_2(case, exported, tmp_path, capsys):
    run, merged = exported
    argv = {
        "missing": [str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        "not-a-run": [str(tmp_path), "--out", str(tmp_path / "o")],
        "bad-upto": [str(run), "--out", str(tmp_path / "o"), "--upto", "3"],
        "adapter-gone": None,
        "out-taken": [str(run), "--out", str(merged)],
        "bad-dtype": [str(run), "--out", str(tmp_path / "o"), "--dtype", "int8"],
    }[case]
    if case == "adapter-gone":
        broken = tmp_path / "run"
        broken.mkdir()
        (broken / "manifest.json").write_text((run / "manifest.json").read_text())
        argv = [str(broken), "--out", str(tmp_path / "o")]
    code, err = errors_of(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
    want = {"missing": "no such run directory", "not-a-run": "no manifest.json here", "bad-upto": "--upto 3: the run "
            "has 2 adapter(s)", "adapter-gone": "round-1/adapter: not a PEFT adapter folder",
            "out-taken": "already exists and is not empty", "bad-dtype": "argument --dtype: invalid choice"}[case]
    assert want in err


def test_cli_exit_code_for_a_bad_run_dir(tmp_path):
    proc = cli(str(tmp_path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path}: no manifest.json here; is this a lora_cai run directory?\n"


def test_push_needs_a_token_and_the_hub_before_any_work(exported, tmp_path, capsys, monkeypatch):
    run = exported[0]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, err = errors_of(capsys, str(run), "--out", str(tmp_path / "o"), "--push-to-hub", "me/model")
    assert code == 2 and err == "error: --push-to-hub me/model: set HF_TOKEN to a Hugging Face write token " \
                                "(nothing was exported)\n"
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")  # the tests run with HF_HUB_OFFLINE=1: no network
    code, err = errors_of(capsys, str(run), "--out", str(tmp_path / "o"), "--push-to-hub", "me/model")
    assert code == 2 and err.count("\n") == 1
    assert "--push-to-hub me/model: cannot reach the Hugging Face Hub or the token is refused" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_gguf_through_unsloth_or_a_one_line_reason(exported, tmp_path):
    """Unsloth fetches and builds llama.cpp: offline that must fail in one line, leaving the merged export whole."""
    pytest.importorskip("unsloth")
    out = tmp_path / "g"
    proc = cli(str(exported[0]), "--out", str(out), "--gguf", "q8_0")
    assert (out / "model.safetensors").is_file()
    if proc.returncode == 0:
        assert list((out / "gguf").glob("*.gguf"))
        return
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: --gguf q8_0: Unsloth's save_pretrained_gguf failed (")
    assert "needs the network" in err and f"the merged checkpoint in {out} is complete" in err
    assert not (out / "gguf").exists()


def test_single_adapter_computes_the_whole_stack(exported, policy_logits, tiny_model, tmp_path):
    """One adapter of rank 8 + 8 = 16 on the 4-bit base equals the two stacked adapters. Tolerance as for the
    merge: only fp32 summation order could differ (measured: 0, since load_policy concatenates the stack the same
    way)."""
    from peft import PeftModel

    run, _ = exported
    proc = cli(str(run), "--out", str(tmp_path / "one"), "--single-adapter")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "one adapter for the stack of 2 (rank 16)" in proc.stderr
    config = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (16, 16, False)
    base, tok = models.load_base(ModelConfig(name=str(tiny_model), backend="transformers"), "transformers")
    one = PeftModel.from_pretrained(base, str(tmp_path / "one")).eval()
    stacked, bare = policy_logits
    got = logits(one, tok)
    scale = stacked.abs().max()
    assert (got - stacked).abs().max() <= 1e-4 * scale
    assert (stacked - bare).abs().max() > 1e3 * 1e-4 * scale
    code = main([str(run), "--out", str(tmp_path / "one"), "--single-adapter"])
    assert code == 2  # OUT taken: one line, as every export error


def test_single_adapter_fills_modules_an_adapter_does_not_target_with_zeros(tiny_model, tmp_path):
    """Round 1 adapts q_proj only, round 2 v_proj only (rsLoRA scaling): the union, each where it was."""
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = ModelConfig(name=str(tiny_model), backend="transformers", load_in_4bit=False)
    dirs = []
    for k, (target, rslora) in enumerate(((["q_proj"], False), (["v_proj"], True)), 1):
        base, tok = models.load_base(cfg, "transformers")
        peft_model = get_peft_model(base, LoraConfig(r=4 * k, lora_alpha=8, target_modules=target, use_rslora=rslora))
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.data = torch.randn(p.shape, generator=gen) * 0.3
        dirs.append(tmp_path / f"a{k}")
        peft_model.save_pretrained(dirs[-1])
    base, tok = models.load_base(cfg, "transformers")
    stack = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name="r1")
    stack.load_adapter(str(dirs[1]), adapter_name="r2")
    stack.base_model.set_adapter(["r1", "r2"])
    want = logits(stack.double().eval(), tok)
    out = single_adapter(dirs, tmp_path / "one")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    base, tok = models.load_base(cfg, "transformers")
    one = PeftModel.from_pretrained(base, str(out)).double().eval()
    got = logits(one, tok)
    # In float64 no summation order is left to differ; what is, is the single adapter's float32 storage of the
    # rescaled slices (rsLoRA's alpha / sqrt(r) folded in): measured 3.4e-7 to 3.8e-7 under tests/host_variance.sh.
    bound = 1e-5 * want.abs().max()
    assert (got - want).abs().max() <= bound
    with torch.no_grad():  # what the bound guards: one round's module (round 1's q_proj) left out
        for name, p in one.named_parameters():
            if "q_proj.lora_B" in name:
                p.zero_()
    assert (logits(one, tok) - want).abs().max() > 1e3 * bound
