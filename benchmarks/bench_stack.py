"""Benchmark: what the earlier rounds cost a training step and generation, one adapter vs stacked adapters.

A random Llama (hidden 512, 4 layers, by default) in 4-bit NF4, LoRA r=16 on every linear layer, three earlier
rounds (random, non-zero adapters of the same rank). Policies built the way a round builds them
(`lora_cai.engine.models.build_policy`): the trainable `default` adapter alone (`alone`), the three earlier rounds
concatenated into it as frozen slices (`concat`, rank 64: what rounds 2+ run, `lora_cai.engine.concat`), and the three
kept as separate active adapters beside it (`stacked`, what rounds 2+ ran before). One training step = forward +
backward of a causal-LM loss on a fixed batch. Repetitions alternate between the policies, so a busy spell on a
shared machine hits all of them; each policy's median is reported. The clock is the process's CPU time with one
torch thread (`--threads 1`, the default), which other jobs on a shared machine do not inflate the way they
inflate wall time; wall-time medians are printed too. Generation: greedy `generate` of `--new-tokens` tokens from
the same batch's first row, tokens per CPU second.

`matmul-count ratio: F` is what a count of multiply-adds predicts for the concatenated step over the alone step
(it is no floor: the costs both steps share are left out, so the measured ratio may come out below it): per token,
the base's linear layers forward and their input gradient backward (2 x in x out each; the 4-bit weights get no
gradient), attention scores and values (forward and twice backward), and LoRA of rank R forward, input gradient
and weight gradient (3 x R x (in + out); the frozen slices' weight gradient is computed, then zeroed by the hook).
Dequantizing the 4-bit weights costs the same in both steps and is not counted: where it is a large part of a step
(a CPU, small layers), the measured ratio comes out below F.

Each backend runs in its own process (Unsloth must be imported before transformers): `transformers`
(peft) and, where it imports, `unsloth` (`FastLanguageModel.get_peft_model`; on a CPU, stock PEFT).
Prints per backend and policy the median ms per step, the generation tokens/s and their ratios, then
`matmul-count ratio: F` and, as the last line, `ratio: X.XX` = concat / alone training step, CPU time, on the
transformers path. Goal (issue #14): X <= F + 0.05.

    python benchmarks/bench_stack.py [--hidden 512] [--layers 4] [--batch 4] [--seq 128] [--reps 15]
                                     [--new-tokens 32] [--backends transformers,unsloth] [--threads 1]

Not a timed test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")

FROZEN = 3  # earlier rounds


def make_adapters(model_dir: Path, out: Path, n: int, r: int) -> list[Path]:
    """`n` random, non-zero LoRA adapters for the model at `model_dir` (plain transformers + peft, 4-bit)."""
    import torch
    from peft import get_peft_model

    from lora_cai.engine import models
    from lora_cai.config.schema import LoraSettings, ModelConfig

    paths = [out / f"frozen-{k}" for k in range(1, n + 1)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    base, _ = models.load_base(ModelConfig(name=str(model_dir), backend="transformers"), "transformers")
    peft_model = get_peft_model(base, models.lora_config(LoraSettings(r=r, alpha=r)))
    for k, path in enumerate(paths, 1):
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        peft_model.save_pretrained(path)
    return paths


POLICIES = ("alone", "concat", "stacked")


def matmul_count_ratio(model, r: int, frozen_rank: int, seq: int) -> float:
    """Multiply-adds per token of a training step with the frozen ranks concatenated over the step without them."""
    import torch

    base = lora = 0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):  # a targeted projection: its 4-bit base layer, plus LoRA
            layer = module.get_base_layer()
            base += layer.in_features * layer.out_features
            lora += layer.in_features + layer.out_features
        elif isinstance(module, torch.nn.Linear) and "lora_" not in name and not name.endswith("base_layer"):  # lm_head
            base += module.in_features * module.out_features
    cfg = model.config
    attention = 2 * cfg.num_hidden_layers * seq * cfg.hidden_size  # scores and values, one token against `seq`

    def step(rank: int) -> float:
        return 2 * base + 3 * attention + 3 * rank * lora

    return step(r + frozen_rank) / step(r)


def worker(args) -> None:
    """Time the policies on one backend; print one JSON line {policy: [[cpu ms, wall ms], ...], ...} last."""
    from lora_cai.engine import models
    from lora_cai.engine.concat import concat_of
    from lora_cai.config.schema import LoraSettings, ModelConfig

    backend = models.resolve_backend(args.backend)  # imports Unsloth first where asked
    import torch

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(name=args.model_dir, backend=backend, max_seq_length=max(256, args.seq + args.new_tokens))
    lora = LoraSettings(r=args.r, alpha=args.r)
    adapters = [Path(p) for p in json.loads(args.adapters)]
    policies = {}
    for name in POLICIES:
        stack = [] if name == "alone" else adapters
        model, _, frozen = models.build_policy(cfg, lora, stack, backend, seed=0, concat=name == "concat")
        models.for_training(model, backend)
        assert (concat_of(model) is not None) == (name == "concat") and bool(frozen) == (name == "stacked")
        with torch.no_grad():  # a trained new adapter (B non-zero), the same in every policy
            gen = torch.Generator().manual_seed(0)
            for n, p in sorted(model.named_parameters()):
                if ".default." in n and "lora_B" in n:
                    p[:, -args.r:].copy_(torch.randn(p[:, -args.r:].shape, generator=gen) * 0.01)
        policies[name] = model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, policies["alone"].config.vocab_size, (args.batch, args.seq), generator=gen)

    def step(model) -> tuple[float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return cpu * 1000, wall * 1000

    def generate(model) -> tuple[float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids[:1, :32], max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=0)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        assert out.shape[1] == 32 + args.new_tokens
        return cpu * 1000, wall * 1000

    for model in policies.values():  # warm-up: first-call allocations, lazy kernels
        step(model)
    times = {name: [] for name in POLICIES}
    for _ in range(args.reps):
        for name, model in policies.items():  # alternate
            times[name].append(step(model))
    gen_times = {name: [] for name in POLICIES}
    for model in policies.values():
        models.for_inference(model, backend)
        generate(model)
    for _ in range(max(3, args.reps // 3)):
        for name, model in policies.items():
            gen_times[name].append(generate(model))
    matmul_count = matmul_count_ratio(policies["concat"], args.r, concat_of(policies["concat"]).frozen_rank, args.seq)
    print(json.dumps({"backend": backend, "times": times, "generate": gen_times, "matmul_count": matmul_count}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15, help="timed steps per policy (alternating)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per timed generation")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU-time clock is exact with 1)")
    ap.add_argument("--backends", default="transformers,unsloth")
    ap.add_argument("--backend", help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.backend:
        worker(args)
        return

    from lora_cai.tiny import build_tiny_model

    cache = os.environ.get("LORA_CAI_CACHE")
    root = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="bench-stack-"))
    model_dir = build_tiny_model(root / f"bench-stack-model-h{args.hidden}-l{args.layers}", hidden_size=args.hidden,
                                 layers=args.layers)
    adapters = make_adapters(model_dir, root / f"bench-stack-adapters-h{args.hidden}-l{args.layers}-r{args.r}",
                             FROZEN, args.r)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"random Llama hidden {args.hidden}, {args.layers} layers, 4-bit NF4; LoRA r={args.r} on all linear "
          f"layers; batch {args.batch} x {args.seq} tokens; {args.reps} alternating steps per policy; "
          f"{args.threads} torch threads; load average {load}")
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print("warning: other processes are using the CPUs; medians of alternating runs soften that, but rerun on an "
              "idle machine for numbers to quote")
    medians, gen_rates, matmul_count = {}, {}, None
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--backend", backend, "--model-dir", str(model_dir),
               "--adapters", json.dumps([str(p) for p in adapters]), "--r", str(args.r), "--batch", str(args.batch),
               "--seq", str(args.seq), "--reps", str(args.reps), "--threads", str(args.threads),
               "--new-tokens", str(args.new_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            why = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            print(f"{backend}: not measured ({why})")
            continue
        result = json.loads(lines[-1])
        if result["backend"] != backend:
            print(f"{backend}: not measured (resolved to {result['backend']})")
            continue
        matmul_count = result["matmul_count"]
        med = medians[backend] = {name: statistics.median(c for c, _ in ts) for name, ts in result["times"].items()}
        rate = gen_rates[backend] = {name: args.new_tokens / (statistics.median(c for c, _ in ts) / 1000)
                                     for name, ts in result["generate"].items()}
        for name in POLICIES:
            cpu = sorted(c for c, _ in result["times"][name])
            wall = statistics.median(w for _, w in result["times"][name])
            print(f"{backend:12s} {name:8s} training step: median {med[name]:7.1f} ms CPU (min {cpu[0]:.1f}, max "
                  f"{cpu[-1]:.1f}; wall median {wall:.1f}) x{med[name] / med['alone']:.2f} vs alone; generation "
                  f"{rate[name]:6.1f} tok/s (CPU) x{rate['alone'] / rate[name]:.2f} time vs alone")
    if "transformers" not in medians:
        print("ratio: n/a (the transformers path did not run)")
        return
    med, rate = medians["transformers"], gen_rates["transformers"]
    print(f"stacked (3 separate adapters) / alone: {med['stacked'] / med['alone']:.2f}; "
          f"concat / stacked: {med['concat'] / med['stacked']:.2f}")
    print(f"generation time, concat / alone: {rate['alone'] / rate['concat']:.2f}; "
          f"stacked / alone: {rate['alone'] / rate['stacked']:.2f}")
    print(f"matmul-count ratio: {matmul_count:.2f} (multiply-adds alone; shared costs such as dequantizing not counted)")
    print(f"ratio: {med['concat'] / med['alone']:.2f}")


if __name__ == "__main__":
    main()
