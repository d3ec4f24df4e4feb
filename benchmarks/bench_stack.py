"""Benchmark: what frozen adapters stacked under the trainable one cost per training step.

A random Llama (hidden 512, 4 layers, by default) in 4-bit NF4, LoRA r=16 on every linear layer.
Three policies built the way a round builds them (`lora_cai.models.build_policy`): the trainable
`default` adapter alone, and with 1 and with 3 frozen adapters (random, non-zero) active underneath.
One training step = forward + backward of a causal-LM loss on a fixed batch (the optimizer step touches
only `default` and is the same in every case). Repetitions alternate between the three policies, so a busy
spell on a shared machine hits all of them; each policy's median is reported. The clock is the process's
CPU time with one torch thread (`--threads 1`, the default), which other jobs on a shared machine do not
inflate the way they inflate wall time; wall-time medians are printed too.

Each backend runs in its own process (Unsloth must be imported before transformers): `transformers`
(peft) and, where it imports, `unsloth` (`FastLanguageModel.get_peft_model`, then `load_adapter` for
the frozen ones). Prints per backend and policy the median ms per step and, as the last line,
`ratio: X.XX` = (3 frozen + trainable) / (trainable alone), CPU time, on the transformers path.

    python benchmarks/bench_stack.py [--hidden 512] [--layers 4] [--batch 4] [--seq 128] [--reps 15]
                                     [--backends transformers,unsloth] [--threads 1]

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

STACKS = (0, 1, 3)


def make_adapters(model_dir: Path, out: Path, n: int, r: int) -> list[Path]:
    """`n` random, non-zero LoRA adapters for the model at `model_dir` (plain transformers + peft, 4-bit)."""
    import torch
    from peft import get_peft_model

    from lora_cai import models
    from lora_cai.config import LoraSettings, ModelConfig

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


def worker(args) -> None:
    """Time the three policies on one backend; print one JSON line {stack: [ms, ...]} last."""
    from lora_cai import models
    from lora_cai.config import LoraSettings, ModelConfig

    backend = models.resolve_backend(args.backend)  # imports Unsloth first where asked
    import torch

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(name=args.model_dir, backend=backend, max_seq_length=max(256, args.seq))
    lora = LoraSettings(r=args.r, alpha=args.r)
    adapters = [Path(p) for p in json.loads(args.adapters)]
    policies = {}
    for n in STACKS:
        model, _, frozen = models.build_policy(cfg, lora, adapters[:n], backend, seed=0)
        models.for_training(model, backend)
        assert models.active_adapters(model) == frozen + [models.TRAINABLE]
        policies[n] = model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, policies[0].config.vocab_size, (args.batch, args.seq), generator=gen)

    def step(model) -> tuple[float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return cpu * 1000, wall * 1000

    for model in policies.values():  # warm-up: first-call allocations, lazy kernels
        step(model)
    times = {n: [] for n in STACKS}
    for _ in range(args.reps):
        for n, model in policies.items():  # alternate
            times[n].append(step(model))
    print(json.dumps({"backend": backend, "times": times}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15, help="timed steps per policy (alternating)")
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
                             max(STACKS), args.r)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"random Llama hidden {args.hidden}, {args.layers} layers, 4-bit NF4; LoRA r={args.r} on all linear "
          f"layers; batch {args.batch} x {args.seq} tokens; {args.reps} alternating steps per policy; "
          f"{args.threads} torch threads; load average {load}")
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print("warning: other processes are using the CPUs; medians of alternating runs soften that, but rerun on an "
              "idle machine for numbers to quote")
    medians = {}
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--backend", backend, "--model-dir", str(model_dir),
               "--adapters", json.dumps([str(p) for p in adapters]), "--r", str(args.r), "--batch", str(args.batch),
               "--seq", str(args.seq), "--reps", str(args.reps), "--threads", str(args.threads)]
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
        medians[backend] = {int(n): statistics.median(c for c, _ in ts) for n, ts in result["times"].items()}
        for n, ms in sorted(medians[backend].items()):
            cpu = sorted(c for c, _ in result["times"][str(n)])
            wall = statistics.median(w for _, w in result["times"][str(n)])
            print(f"{backend:12s} trainable + {n} frozen: median {ms:7.1f} ms CPU/step (min {cpu[0]:.1f}, max "
                  f"{cpu[-1]:.1f}; wall median {wall:.1f}); x{ms / medians[backend][0]:.2f} vs alone")
    if "transformers" not in medians:
        print("ratio: n/a (the transformers path did not run)")
        return
    print(f"ratio: {medians['transformers'][3] / medians['transformers'][0]:.2f}")


if __name__ == "__main__":
    main()
