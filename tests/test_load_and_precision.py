"""What a GPU user's first minutes depend on, checked on a CPU: the compute dtype `auto` picks for each card, the
trainers' mixed precision following it, a model that cannot load answered in one line, Unsloth imported first."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lora_cai.engine import models
from lora_cai.config.schema import LoraSettings, ModelConfig
from lora_cai.errors import UserError


def fake_gpu(monkeypatch, major: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major, minor=0))
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("major, card, expected", [(6, "P100", torch.float16), (7, "T4/V100", torch.float16),
                                                   (8, "A100/RTX 30xx", torch.bfloat16), (9, "H100", torch.bfloat16)])
def test_auto_is_bfloat16_only_where_the_card_computes_it(monkeypatch, major, card, expected):
    from lora_cai.trainers.common import _precision_args

    fake_gpu(monkeypatch, major)
    dtype = models.pick_dtype("auto")
    assert dtype == expected, card
    assert models.pick_dtype("float32") == torch.float32  # an explicit choice stays
    model = SimpleNamespace(config=SimpleNamespace(dtype=dtype))
    assert _precision_args(model) == {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def test_auto_is_float32_on_a_cpu():
    from lora_cai.trainers.common import _precision_args

    assert not torch.cuda.is_available()
    assert models.pick_dtype("auto") == torch.float32
    assert _precision_args(SimpleNamespace(config=SimpleNamespace(dtype=torch.bfloat16))) == \
        {"bf16": False, "fp16": False, "use_cpu": True}


def broken(tiny_model, tmp_path, how: str):
    """A copy of the tiny model broken in one way a user's download can be."""
    path = tmp_path / how
    shutil.copytree(tiny_model, path)
    if how == "unknown-architecture":
        cfg = json.loads((path / "config.json").read_text())
        cfg["model_type"] = "not-a-real-architecture"
        (path / "config.json").write_text(json.dumps(cfg))
    elif how == "corrupt-weights":
        (path / "model.safetensors").write_bytes(b"\x00" * 64)
    elif how == "no-tokenizer":
        for f in path.glob("tokenizer*"):
            f.unlink()
    elif how == "missing":
        shutil.rmtree(path)
    return path


@pytest.mark.parametrize("backend", ["transformers", "unsloth"])
@pytest.mark.parametrize("how", ["unknown-architecture", "corrupt-weights", "no-tokenizer", "missing"])
def test_a_model_that_cannot_load_is_one_line(tiny_model, tmp_path, how, backend):
    if backend == "unsloth":
        pytest.importorskip("unsloth")
    path = broken(tiny_model, tmp_path, how)
    with pytest.raises(UserError) as e:
        models.load_base(ModelConfig(name=str(path), backend=backend), backend)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"model.name: cannot load '{path}'"), message
    assert "check the name or path" in message


def test_load_policy_imports_unsloth_before_peft(tiny_model, tmp_path):
    """In a fresh interpreter, loading a run made with the Unsloth backend imports unsloth before peft, transformers
    and trl, so it patches them before they are used."""
    pytest.importorskip("unsloth")
    cfg = ModelConfig(name=str(tiny_model), backend="transformers")
    model, _, _ = models.build_policy(cfg, LoraSettings(r=4, alpha=8), [], "transformers", 0)
    (tmp_path / "run" / "round-1").mkdir(parents=True)
    models.save_adapter(model, tmp_path / "run" / "round-1" / "adapter")
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(
        {"model": {**cfg.model_dump(), "backend": "unsloth"}, "backend": "unsloth", "stack": ["round-1/adapter"]}))
    # Unsloth imports peft itself while it loads; what matters is that none of them was imported before it.
    code = ("import sys\nfirst = []\nclass Watch:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'unsloth' and not first:\n"
            "            first.append([m for m in ('peft', 'transformers', 'trl') if m in sys.modules])\n"
            "sys.meta_path.insert(0, Watch())\nimport lora_cai\nlora_cai.load_policy(sys.argv[1])\n"
            "print(first == [[]] and 'peft' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "True"
