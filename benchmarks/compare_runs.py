"""Same artifacts from two commits: run the smoke and rule-demo recipes on each and compare every file.

A refactor that only moves code must leave a run's artifacts byte-identical. This script checks that: it
checks out each commit into a temporary worktree, runs both recipes there (smaller than their defaults, so
the check takes minutes, with one thread so float summation order is the same on both sides), and compares
every file of the two run directories:

- JSON and JSONL files compare as parsed values, with the fields listed in `VARIES` set aside: wall-clock
  times and dates, and (with --ignore-hashes) the input-hash fields a hash-scheme bump changes;
- every other file (adapters' safetensors, tokenizer files, logs) compares byte for byte.

Usage (from the repository root, with the project's venv):

    python benchmarks/compare_runs.py OLD_REV [NEW_REV]     # NEW_REV defaults to the working tree
    python benchmarks/compare_runs.py HEAD~1 --ignore-hashes

The report (report.md, report.html, report/) renders the compared JSON with its timings and is set aside.

Prints one line per file that differs and, last, `identical: N files` or `different: M of N files`.
Exit code 0 when identical.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each recipe with the overrides that keep the check to a few minutes on 2 CPU cores.
RECIPES = {
    "smoke": ["--set", "data.limit=6", "--set", "data.eval_limit=4", "--set", "critique.steps=1",
              "--set", "eval.early_stop_drop=null"],
    "rule-demo": ["--set", "data.limit=24", "--set", "data.eval_limit=8"],
}

# Fields that differ between two runs of the same code: wall-clock times, dates, durations, and memory peaks
# measured from the process (RSS moves with the allocator, not with the code).
TIMING = re.compile(r"(^|_)(time|times|seconds|secs|runtime|started|finished|created|date|elapsed|duration|"
                    r"per_second|wall|timing|timings|rss|peak_memory_gb)($|_)|_s$|_at$")
# The input-hash fields, set aside with --ignore-hashes (after a hash-scheme bump they differ by design).
HASHES = re.compile(r"(^|_)(inputs?|hash|hashes|inputs_hash|fingerprint)($|_)")


def scrub(value, ignore: re.Pattern):
    """`value` with every dict key matching `ignore` removed, recursively. PEFT writes `target_modules` from a
    set, whose order follows the interpreter's string hashing: compared sorted."""
    if isinstance(value, dict):
        return {k: sorted(v) if k == "target_modules" and isinstance(v, list) else scrub(v, ignore)
                for k, v in value.items() if not ignore.search(str(k))}
    if isinstance(value, list):
        return [scrub(v, ignore) for v in value]
    return value


def parsed(path: Path, ignore: re.Pattern):
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [scrub(json.loads(line), ignore) for line in text.splitlines() if line.strip()]
    return scrub(json.loads(text), ignore)


def is_json(path: Path) -> bool:
    return path.suffix in (".json", ".jsonl")


def compare(old: Path, new: Path, ignore: re.Pattern) -> tuple[list[str], int]:
    """Lines naming each differing file, and the number of files compared."""
    names = sorted({p.relative_to(old) for p in old.rglob("*") if p.is_file()}
                   | {p.relative_to(new) for p in new.rglob("*") if p.is_file()})
    names = [n for n in names if n.parts[0] != "checkpoints" and "checkpoints" not in n.parts
             and n.name != "run.log" and n.parts[0] != "report" and n.name not in ("report.md", "report.html")]
    diffs = []
    for name in names:
        a, b = old / name, new / name
        if not a.exists() or not b.exists():
            diffs.append(f"{name}: only in {'new' if b.exists() else 'old'}")
        elif is_json(a):
            if parsed(a, ignore) != parsed(b, ignore):
                diffs.append(f"{name}: values differ")
        elif a.read_bytes() != b.read_bytes():
            diffs.append(f"{name}: bytes differ")
    return diffs, len(names)


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    return where


def run_recipes(tree: Path, out: Path, tiny: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    for name, overrides in RECIPES.items():
        cmd = [sys.executable, "-m", "lora_cai.recipe", str(tree / "recipes" / f"{name}.yaml"),
               "--output-dir", str(out / name), *overrides]
        if name == "rule-demo":
            cmd += ["--set", f"model.name={tiny}"]
        print(f"# {tree.name}: {name}", flush=True)
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed in {tree}:\n{proc.stderr[-3000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", help="the commit before the change")
    ap.add_argument("new", nargs="?", help="the commit after it (default: the working tree)")
    ap.add_argument("--ignore-hashes", action="store_true", help="also set the input-hash fields aside")
    ap.add_argument("--keep", help="keep the run directories under this folder")
    args = ap.parse_args(argv)
    ignore = re.compile(TIMING.pattern + ("|" + HASHES.pattern if args.ignore_hashes else ""))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.keep or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        tiny = tmp / "tiny-model"
        # The same tiny model for both sides, built once by the old commit's builder.
        old_tree = worktree(args.old, tmp / "old")
        new_tree = worktree(args.new, tmp / "new") if args.new else ROOT
        try:
            subprocess.run([sys.executable, "-m", "lora_cai.tiny", str(tiny)], cwd=old_tree, check=True,
                           env={**os.environ, "PYTHONPATH": str(old_tree)}, capture_output=True)
            run_recipes(old_tree, tmp / "runs-old", tiny)
            run_recipes(new_tree, tmp / "runs-new", tiny)
            total, different = 0, 0
            for name in RECIPES:
                diffs, n = compare(tmp / "runs-old" / name, tmp / "runs-new" / name, ignore)
                total += n
                different += len(diffs)
                for line in diffs:
                    print(f"{name}/{line}")
        finally:
            for tree in (old_tree, new_tree):
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                                   capture_output=True)
    print(f"identical: {total} files" if not different else f"different: {different} of {total} files")
    return 0 if not different else 1


if __name__ == "__main__":
    sys.exit(main())
