"""One function per 4-bit model on every CPU: no entry point leaves a bitsandbytes layer able to repack itself.

bitsandbytes 0.50 repacks a `Linear4bit` weight in place at its first no-grad, non-training forward on CPUs
with AVX512-BF16 and then computes that layer in bfloat16 (see `models.keep_4bit_layers_unpacked`). These
tests make every 4-bit layer believe it runs on such a CPU (its flag is set from `has_avx512bf16()` when the
layer is built), so they hold on a CI host without the instruction too: whatever lora_cai loads must come
back with the flag off, and a no-grad forward must leave the stored layout alone.
"""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from lora_cai.engine import models
from lora_cai.config.schema import LoraSettings, ModelConfig


@pytest.fixture
def avx512bf16_layers(monkeypatch):
    """Every Linear4bit built inside the test is born with the repack switch on; returns them all (weakly)."""
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    born: list = []
    init = bnb.nn.Linear4bit.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        assert self.support_avx512bf16_for_cpu  # the patch took: the layer would repack unless guarded
        born.append(weakref.ref(self))

    monkeypatch.setattr(bnb.nn.Linear4bit, "__init__", recording_init)

    def alive():
        return [m for m in (r() for r in born) if m is not None]

    return alive


def assert_one_cpu_path(layers, model=None, tokenizer=None) -> None:
    """Flag off on every recorded layer; after a no-grad eval forward, no layer is repacked."""
    assert layers, "no 4-bit layer was built: the test checks nothing"
    assert all(not m.support_avx512bf16_for_cpu for m in layers), "a 4-bit layer can still take the repacked path"
    if model is not None:
        before = {id(m): m.weight.data.clone() for m in layers}
        ids = tokenizer("How do I bake bread?", return_tensors="pt").input_ids
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        for m in layers:
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
            assert torch.equal(m.weight.data, before[id(m)])  # the stored 4-bit weight is untouched


@pytest.mark.parametrize("backend", ["transformers", "unsloth"])
def test_policy_and_teacher_loads_keep_one_path(tiny_model, backend, avx512bf16_layers):
    if backend == "unsloth":
        pytest.importorskip("unsloth")
    cfg = ModelConfig(name=str(tiny_model), backend=backend)
    model, tok, _ = models.build_policy(cfg, LoraSettings(r=8, alpha=16), [], backend, 0)  # the policy
    assert_one_cpu_path(avx512bf16_layers(), models.for_inference(model, backend), tok)
    teacher, ttok = models.load_base(cfg, backend)  # the teacher (Run.teacher) and serve's server load this way
    layers = [m for m in avx512bf16_layers() if any(m is t for t in teacher.modules())]
    assert_one_cpu_path(layers, models.for_inference(teacher, backend), ttok)


@pytest.fixture
def run_dir(tiny_model, tmp_path):
    """A run directory with a one-adapter stack (the adapter built and saved as a round would)."""
    cfg = ModelConfig(name=str(tiny_model), backend="transformers")
    model, _, _ = models.build_policy(cfg, LoraSettings(r=8, alpha=16), [], "transformers", 0)
    (tmp_path / "run" / "round-1").mkdir(parents=True)
    models.save_adapter(model, tmp_path / "run" / "round-1" / "adapter")
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(
        {"model": cfg.model_dump(), "backend": "transformers", "stack": ["round-1/adapter"], "rounds": {}}))
    return tmp_path / "run"


def test_load_policy_chat_and_serve_keep_one_path(run_dir, avx512bf16_layers):
    import lora_cai
    from lora_cai.serve.server import load_model

    model, tok = lora_cai.load_policy(run_dir)  # also what `python -m lora_cai.chat` loads
    assert_one_cpu_path(avx512bf16_layers(), model, tok)
    lora_cai.chat((model, tok), "Hello", max_new_tokens=4)  # generation is a no-grad eval forward too
    assert_one_cpu_path(avx512bf16_layers(), model, tok)
    served, stok = load_model(run_dir)
    layers = [m for m in avx512bf16_layers() if any(m is t for t in served.modules())]
    assert_one_cpu_path(layers, served, stok)


def test_export_dequantizes_the_stored_layout(tiny_model, avx512bf16_layers):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_cai.export.weights import merged_model

    merged, _ = merged_model(ModelConfig(name=str(tiny_model), backend="transformers"), [])
    assert_one_cpu_path(avx512bf16_layers())
    plain = AutoModelForCausalLM.from_pretrained(  # an independent 4-bit load, never run: its stored layout
        tiny_model, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    stored = plain.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight,
                       bnb.functional.dequantize_4bit(stored.data, stored.quant_state).float())


def test_a_layer_repacked_before_the_guard_gets_its_stored_layout_back(tiny_model, avx512bf16_layers):
    """The guard also undoes a repack that happened before it ran (bitsandbytes' own inverse)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    layer = model.model.layers[0].self_attn.q_proj
    stored = layer.weight.data.clone()
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu and not torch.equal(layer.weight.data, stored)
    assert models.keep_4bit_layers_unpacked(model) == len(avx512bf16_layers())
    assert not layer.weight.quant_state.packing_format_for_cpu
    assert torch.equal(layer.weight.data, stored)
