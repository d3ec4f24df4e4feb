"""The contract between the round loop and its stages: what a stage is (`Stage`), receives (`Round`), returns (`Done`).

A stage is a function `(ctx, inp, *upstream outputs) -> Done`, declared beside it as a `Stage`: its name, the
recipe keys and data it reads, the stages upstream of it, the files it owns. `lora_cai.stages.registry` lists
the stages in order, once; the loop, the input hashes, `--restart-from`, the display and the report read it. It reads the recipe only through `ctx.cfg`
(the view of its own declared settings), its loaded data through `ctx.data`, its upstream stages' outputs
through its arguments, and writes only its own files inside `ctx.dir`. It decides from `inp.hash` whether its
committed output is current, and says so in `Done.ran`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    """One stage, declared beside its function."""

    name: str
    run: Callable                   # (ctx, inp, *outputs of `takes`) -> Done
    reads: Any                      # inputs.Decl: hashed settings and data, upstream stages, settings only used
    files: tuple[str, ...]          # the files it owns: in round-k/ (per-round stages) or at the run directory's top
    takes: tuple[str, ...] = ()     # upstream stages whose outputs it receives as arguments, in order
    restartable: bool = True        # offered by --restart-from (a stage that is not restarts with the one before)
    stops_before: bool = False      # honours --stop-before (it receives `stop_before=`)
    frees_teacher: bool = False     # the local teacher leaves memory before it when the two do not fit together
    check: Callable | None = None   # (k, {stage: Done}) after it ran: raises a UserError when the round cannot go on

    @property
    def per_round(self) -> bool:
        return self.reads.per_round


@dataclass
class Round:
    """What one stage of round k works with besides its declared inputs' hashes."""

    k: int
    dir: Path                    # round-k/ (run-level stages: the run directory)
    run_dir: Path
    cfg: Any                     # inputs.View: the recipe as this stage reads it
    data: Any                    # rundata.RunData
    models: Any                  # session.Models
    console: Any
    stack: list[Path] = field(default_factory=list)  # adapter folders of the stacked rounds, in order

    def for_stage(self, name: str) -> "Round":
        from lora_cai.core import inputs

        return replace(self, cfg=inputs.view(self.cfg, name))


@dataclass
class Done:
    """A stage's outputs, the counts it adds to the round's summary, and its timing when it ran."""

    outputs: Any = None
    summary: dict = field(default_factory=dict)
    ran: bool = False
    timing: dict = field(default_factory=dict)  # seconds, and tokens_per_s / steps_per_s where they apply


@contextlib.contextmanager
def timed(timing: dict):
    """Wall seconds of the block into timing["seconds"] (rounded to 0.1 s)."""
    t = time.perf_counter()
    try:
        yield timing
    finally:
        timing["seconds"] = round(time.perf_counter() - t, 1)


@contextlib.contextmanager
def peak_memory(summary: dict, stage: str):
    """Record the stage's peak memory in summary["peak_memory_gb"]: CUDA max allocated where a GPU is in
    use (reset at the stage's start), else the process's peak resident set so far (Linux reports no
    per-stage peak for CPU memory)."""
    import resource

    cuda = False
    try:
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    except ImportError:
        pass
    try:
        yield
    finally:
        if cuda:
            gb, kind = torch.cuda.max_memory_allocated() / 2**30, "cuda_max_allocated"
        else:
            gb, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process_peak_rss"
        summary.setdefault("peak_memory_gb", {})[stage] = round(gb, 3)
        summary["peak_memory_kind"] = kind


def tokens_per_s(stats) -> float | None:
    """A generation stage's throughput from its `GenerationStats` (None when it generated nothing)."""
    return round(stats.tokens_per_s, 2) if stats.new_tokens else None
