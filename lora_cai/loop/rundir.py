"""The run directory as a whole: the checks before a run touches it, the manifest and its ledger of stages
(each finished stage's input hash, per-input hashes and timing), and `--restart-from`.

The ledger is `manifest.json`'s `stages`: {"round-2/train": {"inputs", "by_input", "timing"}, "baseline_eval":
...}. Each stage's own files still decide whether it is complete (their `inputs` hash); the ledger is what a
rerun and `--dry-run` compare against to say which declared input changed, and where the time went.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lora_cai.errors import UserError
from lora_cai.core.inputs import HASH_SCHEME
from lora_cai.core.layout import (
    BASELINE_EVAL,
    CRITIC_CHECK,
    MANIFEST,
    round_of,
    round_of_stack_entry,
    stack_entry,
)
from lora_cai.core.manifest import Manifest
from lora_cai.core.store import RunStore
from lora_cai.stages.registry import ROUND_STAGES, restart_files


def _has_work(root: Path) -> bool:
    return any(root.glob("round-*")) or (root / BASELINE_EVAL).exists() or (root / CRITIC_CHECK).exists()


def check_run_dir(cfg, constitution) -> str | None:
    """Refuse, in one line, a run directory made with another base model or constitution, or by a lora_cai whose
    input hashes this one cannot check (another hash scheme): neither trusted nor silently redone. Returns the one
    line to print when the directory continues under this version's scheme (`SCHEME_3`), else None."""
    root = Path(cfg.output_dir)
    path = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: output_dir is a file, not a directory; use another --output-dir")
    if not path.exists():
        if root.is_dir() and _has_work(root):
            raise _old_scheme(root, None)
        return
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not a readable run manifest ({type(e).__name__}: {e}); this is not a "
                        f"lora_cai run directory or the file is damaged; use another --output-dir") from None
    if not isinstance(m, dict):
        raise UserError(f"{path}: not a run manifest (a JSON object was expected, got {type(m).__name__}); "
                        f"use another --output-dir")
    model = m.get("model")
    made_with = model.get("name") if isinstance(model, dict) else None
    if "model" in m and made_with != cfg.model.name:  # (no model yet: written by --restart-from, filled in now)
        raise UserError(f"{path}: this run directory was made with base model "
                        f"'{made_with}', not '{cfg.model.name}'; use another --output-dir")
    # Another constitution is another run; an edited one (same name) reruns the stages it feeds.
    const = m.get("constitution")
    made_const = const.get("name") if isinstance(const, dict) else None
    if made_const is not None and made_const != constitution.name:
        raise UserError(f"{path}: this run directory was made with constitution '{made_const}', not "
                        f"'{constitution.name}'; use another --output-dir")
    if m.get("hash_scheme") == 2 and HASH_SCHEME == 3 and _has_work(root):
        return SCHEME_3.format(root=root)
    if m.get("hash_scheme") != HASH_SCHEME and _has_work(root):
        raise _old_scheme(root, m.get("hash_scheme"))
    return None


# A scheme-2 directory continues: every stage whose inputs hash differently under scheme 3 reruns (the run prints
# which, `loop.rounds.say_reruns`), and a stage whose hash is unchanged had the very same declared inputs. Scheme 3
# hashes pairs.sft_accepted and dpo.loss at every value and declares inputs scheme 2 had not (the generation
# engine, the held-out sets' sources): for the shipped recipes that is every stage but, with a teacher or an API
# critic, the critic check.
SCHEME_3 = ("{root}: made with hash scheme 2; scheme 3 hashes every key a stage reads at every value and declares "
            "new inputs (the generation engine, the held-out sets' sources), so the stages whose inputs now hash "
            "differently rerun, listed below; the others are kept")


def _old_scheme(root: Path, scheme) -> UserError:
    made = f"hash scheme {scheme}" if scheme else "an earlier lora_cai, before stages declared their inputs"
    return UserError(f"{root}: this run directory was made by {made}; this version (hash scheme {HASH_SCHEME}) "
                     f"cannot tell which of its finished stages are still current. Continue it with --restart-from "
                     f"responses --round 1 (the old files move to {root}/superseded-<time>/ and every stage is redone) "
                     f"or start a new --output-dir")


class Ledger:
    """manifest.json: what the run is, its stack and round summaries, and the ledger of finished stages."""

    def __init__(self, store: RunStore, cfg, constitution, *, writes: bool = True):
        self.store, self.cfg, self.constitution = store, cfg, constitution
        self.writes = writes  # under accelerate launch only the main process writes
        self.backend: str | None = None

    def read(self) -> Manifest:
        m = self.store.read_manifest() or {}
        if not m:
            import importlib.metadata as md

            from lora_cai.version import __version__

            libs = {}
            for dist in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "datasets"):
                try:
                    libs[dist] = md.version(dist)
                except md.PackageNotFoundError:
                    pass
            m = {"lora_cai": __version__, "libraries": libs, "stack": [], "rounds": {}}
        m.update({"name": self.cfg.name, "model": self.cfg.model.model_dump(),
                  "backend": self.backend or m.get("backend"),
                  "constitution": {"name": self.constitution.name, "hash": self.constitution.hash()},
                  "seed": self.cfg.seed, "hash_scheme": HASH_SCHEME})
        m.setdefault("stages", {})
        return m

    def close_round(self, k: int, summary: dict, scores: dict[int, float | None], stopped: bool) -> Manifest:
        """Round k's summary in; its adapter stacked unless it `stopped` the run early (then later rounds go); the
        best round by quality `scores` (0: the base). Written, and returned."""
        m = self.read()
        m["stack"] = [s for s in m["stack"] if round_of_stack_entry(s) < k] + ([] if stopped else [stack_entry(k)])
        m["rounds"][str(k)] = summary
        m.pop("stopped_round", None)
        known = {r: s for r, s in scores.items() if s is not None}
        m["best_round"] = max(known, key=lambda r: (known[r], -r)) if known else None
        if stopped:
            m["stopped_round"] = k
            m["rounds"] = {r: v for r, v in m["rounds"].items() if int(r) <= k}
        self.write(m)
        return m

    def write(self, m: Manifest) -> None:
        if self.writes and self.store.read_manifest() != m:  # a rerun that changes nothing rewrites nothing
            self.store.write_manifest(m)

    def record(self, key: str, inp, done) -> dict:
        """Note a finished stage: its input hashes, and its timing when it ran (kept from the run that did the
        work when it was skipped). Returns the stage's timing."""
        m = self.read()
        old = m["stages"].get(key) or {}
        if done.ran or old.get("inputs") != inp.hash:
            entry = {"inputs": inp.hash, "by_input": dict(sorted(inp.by_input.items())), "timing": dict(done.timing)}
        else:
            entry = old
        m["stages"][key] = entry
        self.write(m)
        return entry.get("timing") or {}



def restart_from(root: Path, stage: str, k: int) -> Path | None:
    """Move `stage` and every later stage of round k, and every later round, into root/superseded-<time>/.

    The manifest forgets the rounds and ledger entries it moved, and takes this version's hash scheme: the
    user chose to redo from here, so whatever else no longer matches reruns too.
    """
    store = RunStore(root)
    if not _has_work(root) and store.read_manifest() is None:
        raise UserError(f"--restart-from: {root} has no finished work to restart (no manifest.json)")
    manifest = store.read_manifest() or {}
    dest = root / time.strftime("superseded-%Y%m%d-%H%M%S")
    moved = []
    for rd in sorted(root.glob("round-*"), key=lambda p: round_of(p.name) or 0):
        r = round_of(rd.name)
        if r is None or r < k:
            continue
        paths = [rd] if r > k else [p for pattern in restart_files(stage) for p in rd.glob(pattern)]
        for p in paths:
            target = dest / rd.name / p.name if p != rd else dest / rd.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, target)
            moved.append(p)
    if not manifest:  # made before manifests were written first: the next run fills in the rest
        manifest = {"stack": [], "rounds": {}}
    manifest["stack"] = [s for s in manifest.get("stack", []) if round_of_stack_entry(s) < k]
    manifest["rounds"] = {r: v for r, v in manifest.get("rounds", {}).items() if int(r) < k}
    manifest.pop("stopped_round", None)
    later = set(restart_files(stage))
    redone = {st.name for st in ROUND_STAGES if set(st.files) <= later}
    manifest["stages"] = {key: v for key, v in (manifest.get("stages") or {}).items()
                          if not _superseded(key, k, redone)}
    manifest["hash_scheme"] = HASH_SCHEME
    store.write_manifest(manifest)
    return dest if moved else None


def _superseded(key: str, k: int, redone: set[str]) -> bool:
    if "/" not in key:
        return False
    rd, stage = key.split("/", 1)
    r = round_of(rd)
    return r is not None and (r > k or (r == k and stage in redone))
