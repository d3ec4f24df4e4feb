"""`accelerate launch -m lora_cai.train RECIPE`: train the next round's adapter (SFT then DPO) on several GPUs.

The round loop is one process, so data generation (responses, critiques, judging) runs once, on one GPU or
against a server; only training is spread out. The workflow, repeated once per round:

    python -m lora_cai.recipe RECIPE --stop-before train    # the round's data, committed; stops there
    accelerate launch -m lora_cai.train RECIPE              # SFT + DPO of that round, one process per GPU
    python -m lora_cai.recipe RECIPE --stop-before train    # evaluates it, stacks it, makes the next round's data

Every process loads the policy (4-bit base on its own GPU + frozen earlier adapters + the new adapter) and
TRL's trainers run data-parallel under accelerate; only the main process writes. The recipe's effective
batch is kept where `grad_accum` divides by the number of processes. The training stage's input hash is the
one the recipe's run computes (`rounds.all_inputs`), so the recipe's next run skips the training it finds
done; data the recipe would redo (its inputs changed since it was made) is refused, not trained on.
Run plainly (`python -m lora_cai.train RECIPE`) it trains on one device, like the round loop would.
"""

from __future__ import annotations

import argparse
import sys

from lora_cai.errors import UserError
from lora_cai.core.layout import round_dir


def pending_round(cfg, store) -> int:
    """The round whose data is committed but whose adapter is not stacked yet."""
    m = store.read_manifest() or {}
    if m.get("stopped_round"):
        raise UserError(f"{store.root}: the run stopped early at round {m['stopped_round']} (its quality "
                        f"dropped); there is nothing left to train")
    k = max((int(r) for r in m.get("rounds", {})), default=0) + 1
    if k > cfg.rounds:
        raise UserError(f"{store.root}: all {cfg.rounds} round(s) of the recipe are done (raise `rounds` to "
                        f"train another)")
    rd = store.root / round_dir(k)
    if not ((rd / "sft.jsonl").exists() and (rd / "pairs.jsonl").exists()):
        raise UserError(f"{rd}: round {k}'s data is not there yet; run python -m lora_cai.recipe {cfg.source} "
                        f"--stop-before train first")
    return k


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


def _main(args) -> int:
    from rich.console import Console

    from lora_cai.config.load import load_recipe
    from lora_cai.core.layout import stage_key
    from lora_cai.engine.models import rank, world_size
    from lora_cai.loop.rounds import all_inputs, run_stage, stale_data
    from lora_cai.data.rundata import load_run_data
    from lora_cai.loop.rundir import Ledger, check_run_dir
    from lora_cai.loop.session import Models
    from lora_cai.core.stage import Round
    from lora_cai.core.store import RunStore
    from lora_cai.stages.train import TRAIN_STAGE

    cfg = load_recipe(args.recipe, args.overrides, args.output_dir)
    args.writes_to = cfg.output_dir
    console = Console(stderr=True, quiet=rank() != 0)  # one process speaks
    data = load_run_data(cfg)
    notice = check_run_dir(cfg, data.constitution)
    if notice:
        console.print(f"[yellow]{notice}[/]", soft_wrap=True)
    store = RunStore(cfg.output_dir)
    k = pending_round(cfg, store)
    manifest = store.read_manifest() or {}
    stale = stale_data(cfg, data, manifest, k)
    if stale:
        raise UserError(f"{store.root}: round {k}'s data is older than the recipe ({stale[0][0]}: {stale[0][1]}); run "
                        f"python -m lora_cai.recipe {cfg.source} --stop-before train first")
    inp = all_inputs(cfg, data, manifest)[stage_key(TRAIN_STAGE.name, k)]
    stack = [store.root / s for s in manifest.get("stack", [])]
    console.print(f"round {k}: training on {world_size()} process(es), {len(stack)} frozen adapter(s)")
    ledger = Ledger(store, cfg, data.constitution, writes=rank() == 0)
    ctx = Round(k, store.round_dir(k), store.root, cfg, data, Models(console, store.root), console, stack)
    done = run_stage(ledger, ctx, TRAIN_STAGE, inp, k=k)
    if not done.ran:
        console.print(f"round {k}: already trained for these inputs ({done.outputs})")
    else:
        console.print(f"round {k}: adapter {done.outputs}; SFT {done.summary['sft']}, DPO {done.summary['dpo']}")
    console.print(f"next: python -m lora_cai.recipe {cfg.source} (evaluates and stacks round {k})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from lora_cai.cli import OOM_ADVICE, main as cli_main

    return cli_main(build_parser(), _main, argv, oom_advice=OOM_ADVICE,
                    interrupted="interrupted: checkpoints are kept; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
