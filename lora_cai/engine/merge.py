"""The stack of a run as plain weights: folded into the dequantized base, or concatenated into one adapter.

Shared by `export` (a merged checkpoint, `--single-adapter`) and by vLLM as the generation engine
(`engine.vllm_weights`), which serves the same weights: vLLM loads no bitsandbytes 4-bit weights, so it serves the
base dequantized exactly as here.

* `merged_model`: the base loaded in 4-bit exactly as the run trained it, each NF4 weight dequantized with
  bitsandbytes into float32 on the CPU (so the merged model starts from the very weights the trained policy
  multiplied by), every adapter of the stack merged in order with PEFT's `merge_and_unload`, still in float32.
* `concatenated_adapter`: since a stack computes W + sum_i s_i B_i A_i, the adapter with A = [A_1; ...; A_n] and
  B = [s_1 B_1, ..., s_n B_n] (rank sum r_i, scaling 1) computes exactly the same; from the adapter files alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_cai.errors import UserError


def _dequantize_to_cpu_fp32(model):
    """Replace every bitsandbytes 4-bit linear layer by an fp32 `nn.Linear` on the CPU holding its dequantized weight.

    Layer by layer, so GPU memory is released as the CPU copy grows. Afterwards the model is no longer
    quantized: its quantization config is removed and every tensor is fp32 on the CPU.
    """
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    if bnb is not None:
        for name, module in list(model.named_modules()):
            if not isinstance(module, bnb.nn.Linear4bit):
                continue
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            with torch.device("meta"):
                new = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            new.weight = torch.nn.Parameter(weight.to("cpu", torch.float32), requires_grad=False)
            if module.bias is not None:
                new.bias = torch.nn.Parameter(module.bias.data.to("cpu", torch.float32), requires_grad=False)
            model.set_submodule(name, new)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    try:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(model, recurse=True)  # a device_map's hooks would move inputs back to the GPU
    except ImportError:
        pass
    model.to("cpu", torch.float32)
    left = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if left:
        raise RuntimeError(f"dequantization left non-fp32 weights: {left[:3]}")
    return model


def merged_model(model_cfg, adapter_dirs: list[Path], *, backend: str = "transformers"):
    """The base loaded as trained (4-bit when `model_cfg.load_in_4bit`), dequantized to fp32 on the CPU, with
    every adapter in `adapter_dirs` merged in order. Returns `(model, tokenizer)`: a plain fp32 model."""
    from lora_cai.engine.models import load_base, stack_name

    for path in adapter_dirs:
        if not (Path(path) / "adapter_config.json").is_file():
            raise UserError(f"{path}: not a PEFT adapter folder (adapter_config.json missing); the run directory is "
                            f"damaged: restore it, or export fewer adapters with --upto")
    model, tokenizer = load_base(model_cfg, backend)
    from peft import PeftModel  # after the base: Unsloth (backend unsloth) must be imported before peft

    model = _dequantize_to_cpu_fp32(model)
    if not adapter_dirs:
        return model.eval(), tokenizer
    names = [stack_name(k) for k in range(1, len(adapter_dirs) + 1)]
    for name, path in zip(names, adapter_dirs):
        try:
            if name == names[0]:
                model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)
            else:
                model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        except Exception as e:  # a corrupt or mismatched adapter file
            raise UserError(f"{path}: unreadable adapter ({type(e).__name__}: {_last_line(str(e))})") from None
    model.base_model.set_adapter(names)
    model = model.merge_and_unload(adapter_names=names)
    return model.eval(), tokenizer


def concatenated_adapter(adapter_dirs: list[Path]) -> tuple[dict, dict]:
    """The stack `adapter_dirs` as one LoRA adapter of rank sum(r_i): `(tensors, adapter config)`, float32.

    Written by hand on the safetensors because PEFT's `add_weighted_adapter(combination_type="cat")`, which
    does this concatenation, needs the base model loaded (and keeps the first adapter's rsLoRA flag, whose
    scaling alpha/sqrt(r) would then be wrong for alpha = r).
    """
    import math

    import torch
    from safetensors.torch import load_file

    configs, tensors, scales = [], [], []
    for d in adapter_dirs:
        cfg_path, weights = Path(d) / "adapter_config.json", Path(d) / "adapter_model.safetensors"
        c = json.loads(cfg_path.read_text())
        if c.get("use_dora") or c.get("rank_pattern") or c.get("alpha_pattern") or c.get("modules_to_save"):
            raise UserError(f"{cfg_path}: DoRA, per-module ranks or modules_to_save cannot be concatenated into one "
                            f"adapter; merge the stack instead (export without --single-adapter; for vLLM "
                            f"generation.vllm_weights: merged)")
        configs.append(c)
        tensors.append(load_file(str(weights)))
        scales.append(c["lora_alpha"] / (math.sqrt(c["r"]) if c.get("use_rslora") else c["r"]))
    suffix_a, suffix_b = ".lora_A.weight", ".lora_B.weight"
    modules = sorted({k[:-len(suffix_a)] for t in tensors for k in t if k.endswith(suffix_a)})
    merged = {}
    for m in modules:
        have = [t for t in tensors if m + suffix_a in t]
        in_features, out_features = have[0][m + suffix_a].shape[1], have[0][m + suffix_b].shape[0]
        a_blocks, b_blocks = [], []
        for t, c, s in zip(tensors, configs, scales):
            if m + suffix_a in t:  # a module one adapter does not target contributes zero blocks
                a_blocks.append(t[m + suffix_a].float())
                b_blocks.append(t[m + suffix_b].float() * s)
            else:
                a_blocks.append(torch.zeros(c["r"], in_features))
                b_blocks.append(torch.zeros(out_features, c["r"]))
        merged[m + suffix_a] = torch.cat(a_blocks, 0).contiguous()
        merged[m + suffix_b] = torch.cat(b_blocks, 1).contiguous()
    rank = sum(c["r"] for c in configs)
    targets = sorted({t for c in configs for t in c.get("target_modules") or []})
    config = dict(configs[0], r=rank, lora_alpha=rank, use_rslora=False, target_modules=targets, lora_dropout=0.0)
    return merged, config


def _last_line(text: str) -> str:
    """The line of a library's output that says what went wrong: its last exception line, else its last line."""
    import re

    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*?:", ln) or ln.startswith("fatal:")]
    line = (errors or lines or ["no output"])[-1]
    return line[:240]
