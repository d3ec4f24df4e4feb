"""`accelerate launch -m lora_cai.train RECIPE`: train the next round's adapter (SFT then DPO) on several GPUs.

The round loop is one process, so data generation (responses, critiques, judging) runs once, on one GPU or
against a server; only training is spread out. The workflow, repeated once per round:

    python -m lora_cai.recipe RECIPE --stop-before train    # the round's data, committed; stops there
    accelerate launch -m lora_cai.train RECIPE              # SFT + DPO of that round, one process per GPU
    python -m lora_cai.recipe RECIPE --stop-before train    # evaluates it, stacks it, makes the next round's data

Every process loads the policy (4-bit base on its own GPU + frozen earlier adapters + the new adapter) and
TRL's trainers run data-parallel under accelerate; only the main process writes. The recipe's effective
batch is kept where `grad_accum` divides by the number of processes. The adapter is committed exactly as the
round loop commits it (same `train.json` inputs), so the recipe's next run skips the training it finds done.
Run plainly (`python -m lora_cai.train RECIPE`) it trains on one device, like the round loop would.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError


def pending_round(run) -> tuple[int, list[Path], list[str]]:
    """The round whose data is committed but whose adapter is not stacked yet, with the stack before it."""
    m = run.store.read_manifest() or {}
    if m.get("stopped_round"):
        raise UserError(f"{run.store.root}: the run stopped early at round {m['stopped_round']} (its quality "
                        f"dropped); there is nothing left to train")
    k = max((int(r) for r in m.get("rounds", {})), default=0) + 1
    if k > run.cfg.rounds:
        raise UserError(f"{run.store.root}: all {run.cfg.rounds} round(s) of the recipe are done (raise `rounds` to "
                        f"train another)")
    rd = run.store.round_dir(k)
    if not ((rd / "sft.jsonl").exists() and (rd / "pairs.jsonl").exists()):
        raise UserError(f"{rd}: round {k}'s data is not there yet; run python -m lora_cai.recipe {run.cfg.source} "
                        f"--stop-before train first")
    return (k, *run.stack_state(m.get("stack", [])))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="accelerate launch -m lora_cai.train",
        description="Train the next round's adapter (SFT then DPO) from its committed data; under "
                    "`accelerate launch` on every GPU, data-parallel.")
    p.add_argument("recipe", help="the recipe the run was started with")
    p.add_argument("--output-dir", help="run directory (overrides the recipe's output_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, as for python -m lora_cai.recipe (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .recipe import Run
    from .models import rank, world_size

    parser = build_parser()

    def _one_line(message: str):
        raise UserError(f"{message} (see python -m lora_cai.train --help)")

    parser.error = _one_line
    try:
        args = parser.parse_args(argv)
        from rich.console import Console

        from .config import load_recipe

        cfg = load_recipe(args.recipe, args.overrides, args.output_dir)
        console = Console(stderr=True, quiet=rank() != 0)  # one process speaks
        run = Run(cfg, console)
        k, stack_paths, stack_hash = pending_round(run)
        summary: dict = {"peak_memory_gb": {}}
        console.print(f"round {k}: training on {world_size()} process(es), {len(stack_paths)} frozen adapter(s)")
        adapter = run.stage_train(k, stack_paths, stack_hash, summary)
        if not run.worked:
            console.print(f"round {k}: already trained for these inputs ({adapter})")
        else:
            console.print(f"round {k}: adapter {adapter}; SFT {summary['sft']}, DPO {summary['dpo']}")
        console.print(f"next: python -m lora_cai.recipe {cfg.source} (evaluates and stacks round {k})")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: checkpoints are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
