"""Where a run's files live: round directory names, stage file names and stage order (no torch, no I/O).

One table for the round loop, `--restart-from`, `lora_cai.train`, `chat`, `export` and `report`, so a file
name is written once.
"""

from __future__ import annotations

import re

MANIFEST = "manifest.json"
CRITIC_CHECK = "critic-check.json"
BASELINE_EVAL = "baseline-eval.json"
ADAPTER = "adapter"

# The stages of one round, in order, with the files each owns inside round-<k>/. Restarting a stage
# supersedes its files and those of every later stage.
ROUND_STAGES = ("responses", "samples", "critique", "judge", "train", "eval")
STAGE_FILES = {
    "responses": ["responses.jsonl", "responses.jsonl.meta.json"],
    "samples": ["samples.jsonl", "samples.jsonl.meta.json"],
    "critique": ["critique-*.jsonl", "critique-*.jsonl.meta.json", "trajectories.jsonl"],
    "judge": ["judgments.jsonl", "judgments.jsonl.meta.json", "sft.jsonl", "pairs.jsonl"],
    "train": ["checkpoints", "train.json", ADAPTER, "ref_logps.jsonl", "sft_log.jsonl", "dpo_log.jsonl"],
    "eval": ["eval.json"],
}
# What --restart-from offers: the samples stage restarts with the responses it extends.
RESTARTABLE = ("responses", "critique", "judge", "train", "eval")
# The stages that run once, before round 1, with the file each writes at the run directory's top.
RUN_STAGES = {"critic_check": CRITIC_CHECK, "baseline_eval": BASELINE_EVAL}

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


def critique_file(step: int) -> str:
    return f"critique-{step}.jsonl"


def stage_key(stage: str, k: int | None = None) -> str:
    """The stage's name in the manifest's `stages` ledger: `critic_check`, `baseline_eval`, `round-2/train`."""
    return stage if k is None else f"{round_dir(k)}/{stage}"


def restart_files(stage: str) -> list[str]:
    """File patterns `--restart-from STAGE` supersedes inside its round: the stage's and every later stage's."""
    start = ROUND_STAGES.index("responses" if stage == "samples" else stage)
    return [pattern for st in ROUND_STAGES[start:] for pattern in STAGE_FILES[st]]
