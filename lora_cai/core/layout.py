"""Where a run's files live: the run directory's own files, round directories, the adapter stack's entries, and
the ledger's stage keys (no torch, no I/O). Each stage's own files are declared with it (`stages.registry`)."""

from __future__ import annotations

import re

MANIFEST = "manifest.json"
CRITIC_CHECK = "critic-check.json"
BASELINE_EVAL = "baseline-eval.json"
ADAPTER = "adapter"

_ROUND = re.compile(r"round-(\d+)$")


def round_dir(k: int) -> str:
    return f"round-{k}"


def round_of(name: str) -> int | None:
    """k for a folder named `round-k`, else None."""
    m = _ROUND.match(name)
    return int(m.group(1)) if m else None


def stack_entry(k: int) -> str:
    """How the manifest's `stack` names round k's adapter (relative to the run directory)."""
    return f"{round_dir(k)}/{ADAPTER}"


def round_of_stack_entry(entry: str) -> int:
    k = round_of(str(entry).split("/")[0])
    if k is None:
        raise ValueError(f"not a stack entry: {entry!r}")
    return k


def stage_key(stage: str, k: int | None = None) -> str:
    """The stage's name in the manifest's `stages` ledger: `critic_check`, `baseline_eval`, `round-2/train`."""
    return stage if k is None else f"{round_dir(k)}/{stage}"
