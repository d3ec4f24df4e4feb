"""Benchmark: one round's training (SFT, then the preference objective) per `dpo.loss`, against SFT + DPO.

A random Llama (hidden 512, 4 layers, by default) in 4-bit NF4, LoRA r=16 on every linear layer, round 2 of a
run (one earlier adapter concatenated into the new one, as `lora_cai.engine.models.build_policy` builds it). The same
48 SFT records and 48 preference pairs for every objective, the recipe defaults' batch sizes (SFT 4, preference
stage 2; KTO trains on the 96 answers of those pairs, 2 per step, as the recipe's `dpo.batch_size` would). Each
objective runs in its own process (peak memory = that process's peak RSS, model loading included, the same in
all), `--reps` times, alternating, so a busy spell on a shared machine hits all of them; medians are reported.
The clock is CPU time with one torch thread (`--threads 1`, the default).

Prints per objective the median seconds of the round's training (SFT + the preference stage), its ratio to
SFT + DPO (sigmoid), the peak RSS and its ratio, and as the last line `ratio: X`, the fastest objective's time
over SFT + DPO. ORPO folds SFT into its stage (every SFT record here is a pair's winner, so SFT is skipped, as a
round does); SimPO and KTO keep SFT.

    python benchmarks/bench_objectives.py [--hidden 512] [--layers 4] [--reps 3] [--threads 1]

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
os.environ.setdefault("TQDM_DISABLE", "1")

OBJECTIVES = ("sigmoid", "ipo", "kto", "simpo", "orpo")
TOPICS = ["bread", "a bicycle", "tea", "a bookshelf", "tomatoes", "a kite", "soup", "a fence"]


def data() -> tuple[list[dict], list[dict]]:
    sft, pairs = [], []
    for i in range(48):
        topic = TOPICS[i % len(TOPICS)]
        prompt = f"Request {i}: how do I make {topic}? Please explain the steps."
        good = f"Here is a careful way to make {topic}: gather what you need, work step by step, check as you go."
        bad = f"Just wing it with {topic}, nobody checks anyway, and skip whatever looks like too much effort."
        sft.append({"prompt": prompt, "completion": good})
        pairs.append({"id": str(i), "prompt": prompt, "chosen": good, "rejected": bad, "p_chosen": 1.0})
    return sft, pairs


def worker(args) -> None:
    import resource

    import torch

    from lora_cai.engine import models
    from lora_cai.trainers.dpo import train_preferences
    from lora_cai.trainers.sft import sft_training_records, train_sft
    from lora_cai.config.schema import DPOSettings, LoraSettings, ModelConfig, SFTSettings

    torch.set_num_threads(args.threads)
    backend = models.resolve_backend("transformers")
    cfg = ModelConfig(name=args.model_dir, backend=backend)
    model, tok, frozen = models.build_policy(cfg, LoraSettings(r=16, alpha=16), [Path(args.adapter)], backend, 0)
    models.for_training(model, backend)
    sft, pairs = data()
    out = Path(args.out)
    c0, t0 = time.process_time(), time.perf_counter()
    sft = sft_training_records(args.objective, sft, pairs)  # ORPO: only what no pair covers, here nothing
    if sft:
        train_sft(model, tok, sft, SFTSettings(), out / "sft", seed=0, frozen=frozen)
    c1 = time.process_time()
    train_preferences(model, tok, pairs, DPOSettings(loss=args.objective), out / "pref", seed=0, frozen=frozen)
    c2, t2 = time.process_time(), time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"objective": args.objective, "cpu": c2 - c0, "sft_cpu": c1 - c0, "pref_cpu": c2 - c1,
                      "wall": t2 - t0, "peak_mb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--objective", help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.objective:
        worker(args)
        return

    from lora_cai.tiny import build_tiny_model

    cache = os.environ.get("LORA_CAI_CACHE")
    root = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="bench-objectives-"))
    model_dir = build_tiny_model(root / f"bench-obj-model-h{args.hidden}-l{args.layers}", hidden_size=args.hidden,
                                 layers=args.layers)
    from bench_stack import make_adapters  # a random, non-zero round-1 adapter (r=16), as bench_stack makes them

    adapter = make_adapters(model_dir, root / f"bench-obj-adapters-h{args.hidden}-l{args.layers}-r16", 1, 16)[0]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"random Llama hidden {args.hidden}, {args.layers} layers, 4-bit NF4, LoRA r=16, round 2 (one earlier "
          f"adapter concatenated); 48 SFT records + 48 pairs; {args.reps} alternating runs per objective; "
          f"{args.threads} torch thread(s); load average {load}")
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print("warning: other processes are using the CPUs; rerun on an idle machine for numbers to quote")
    runs: dict[str, list[dict]] = {o: [] for o in OBJECTIVES}
    for rep in range(args.reps):
        for objective in OBJECTIVES:
            out = Path(tempfile.mkdtemp(prefix=f"{objective}-", dir=root))
            cmd = [sys.executable, __file__, "--objective", objective, "--model-dir", str(model_dir), "--adapter",
                   str(adapter), "--out", str(out), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                print(f"{objective}: failed ({(proc.stderr.strip().splitlines() or ['no output'])[-1][:200]})")
                continue
            runs[objective].append(json.loads(lines[-1]))
    med = {o: {k: statistics.median(r[k] for r in rs) for k in ("cpu", "sft_cpu", "pref_cpu", "peak_mb")}
           for o, rs in runs.items() if rs}
    if "sigmoid" not in med:
        print("ratio: n/a (SFT + DPO did not run)")
        return
    base = med["sigmoid"]
    for o, m in med.items():
        print(f"{o:8s} SFT {m['sft_cpu']:6.1f} s + preference stage {m['pref_cpu']:6.1f} s = {m['cpu']:6.1f} s CPU "
              f"(x{m['cpu'] / base['cpu']:.2f} vs SFT + DPO); peak RSS {m['peak_mb']:7.0f} MB "
              f"(x{m['peak_mb'] / base['peak_mb']:.2f})")
    fastest = min(med, key=lambda o: med[o]["cpu"])
    print(f"fastest: {fastest}")
    print(f"ratio: {med[fastest]['cpu'] / base['cpu']:.2f}")


if __name__ == "__main__":
    main()
