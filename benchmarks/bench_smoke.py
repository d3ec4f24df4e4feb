"""Benchmark: the README's first command, `python -m lora_cai.recipe smoke`, timed end to end.

Runs the smoke recipe `--repeats` times from this checkout, each into a fresh run directory (the SmolLM2 model
already converted into the cache), and prints the wall time of each run, their median and the seconds per
stage from the run's own ledger (manifest.json `stages`). With `--against DIR` (another checkout, e.g. a
`git worktree` of an older commit) the two versions alternate run by run (these machines are noisy), both run
the same recipe file (`--recipe`, default this checkout's recipes/smoke.yaml: the same workload on both sides, so
the ratio is the code's alone), and the last line is `ratio: X` (this checkout's median / the other's); without it
the last line is `median: S s`. The other checkout must accept the recipe's keys.

    python benchmarks/bench_smoke.py [--repeats 2] [--against ../before] [--recipe recipes/smoke.yaml]

Run it on an idle machine (`uptime` load below 1): it waits 20 s before each run and prints the load then.
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

HERE = Path(__file__).resolve().parents[1]


def one_run(checkout: Path, recipe: Path, out: Path) -> tuple[float, dict]:
    time.sleep(20)  # let the previous run's load settle
    print(f"  load before the run: {os.getloadavg()[0]:.2f}", flush=True)
    t = time.perf_counter()
    # PYTHONPATH: each checkout's own lora_cai, whichever one the environment has installed
    env = dict(os.environ, PYTHONPATH=str(checkout))
    proc = subprocess.run([sys.executable, "-m", "lora_cai.recipe", str(recipe), "--output-dir", str(out)],
                          cwd=checkout, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"smoke run in {checkout} failed:\n{proc.stderr[-3000:]}")
    stages = json.loads((out / "manifest.json").read_text()).get("stages") or {}
    return wall, {k: (v.get("timing") or {}).get("seconds") for k, v in stages.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--against", type=Path, default=None, help="another checkout to alternate with")
    ap.add_argument("--recipe", type=Path, default=HERE / "recipes" / "smoke.yaml",
                    help="the recipe file both checkouts run (default: this checkout's recipes/smoke.yaml)")
    args = ap.parse_args()
    recipe = args.recipe.resolve()
    print(f"recipe: {recipe} (the same file for every checkout)", flush=True)
    versions = {"this": HERE} if args.against is None else {"this": HERE, "other": args.against.resolve()}
    walls: dict[str, list[float]] = {v: [] for v in versions}
    stages: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, checkout in versions.items():
                wall, per_stage = one_run(checkout, recipe, Path(tmp) / f"{name}-{i}")
                walls[name].append(wall)
                stages[name] = per_stage or stages.get(name, {})
                print(f"{name} run {i + 1}: {wall:.0f} s", flush=True)
    for name, values in walls.items():
        print(f"{name}: median {statistics.median(values):.0f} s of {', '.join(f'{w:.0f}' for w in values)}")
        if stages.get(name):
            print("  seconds per stage (last run): " + ", ".join(f"{k} {v:.0f}" for k, v in stages[name].items()
                                                                 if v is not None))
    this = statistics.median(walls["this"])
    if args.against is None:
        print(f"median: {this:.0f} s")
    else:
        print(f"ratio: {this / statistics.median(walls['other']):.2f}")


if __name__ == "__main__":
    main()
