"""The run's manifest.json, typed: what a run is, its adapter stack, its rounds' summaries and its stage ledger.

`loop.rundir.Ledger` is the one writer (and `--restart-from` there); every other module reads it through
`RunStore.read_manifest`. docs/artifacts.md describes each field.
"""

from __future__ import annotations

from typing import TypedDict


class StageEntry(TypedDict):
    """One finished stage in the ledger: its input hash, a hash per declared input, and where the time went."""

    inputs: str
    by_input: dict[str, str]
    timing: dict[str, float]


class Manifest(TypedDict, total=False):
    lora_cai: str                       # the version that made the directory
    libraries: dict[str, str]           # torch, transformers, trl, peft, ... versions at its start
    name: str                           # the recipe's name
    model: dict                         # the recipe's model section
    backend: str | None                 # unsloth or transformers, as used
    constitution: dict                  # {name, hash}
    seed: int
    hash_scheme: int                    # core.inputs.HASH_SCHEME
    stack: list[str]                    # adapter folders in stacking order: "round-1/adapter", ...
    rounds: dict[str, dict]             # "k" -> the round's summary (loop.rounds._summary)
    stages: dict[str, StageEntry]       # ledger key ("baseline_eval", "round-2/train") -> entry
    best_round: int | None              # the round with the best quality score (0: the base)
    stopped_round: int                  # present when early stopping ended the run at that round


FIELDS = frozenset(Manifest.__annotations__)
