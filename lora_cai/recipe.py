"""`python -m lora_cai.recipe RECIPE`: validate a recipe, then run its CAI rounds (`rounds.run`).

A stage whose output is complete for the same declared inputs is skipped, so the same command resumes an
interrupted run; a stage whose inputs changed reruns, with everything downstream of it, and the run says
which input changed. `--dry-run` answers without loading a model: the memory plan, and on an existing run
directory the stages a run would redo and why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .layout import RESTARTABLE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_cai.recipe",
        description="Run Constitutional AI rounds (critique, revision, SFT + DPO on stacked LoRA adapters) "
                    "from a YAML recipe.")
    p.add_argument("recipe", nargs="?", help="path to a recipe YAML (see recipes/)")
    p.add_argument("--output-dir", help="run directory (overrides the recipe's output_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set rounds=2 --set sft.learning_rate=1e-4 (repeatable)")
    p.add_argument("--help-keys", action="store_true", help="list every recipe key with its default and meaning")
    p.add_argument("--restart-from", choices=RESTARTABLE, metavar="STAGE",
                   help=f"rerun STAGE ({', '.join(RESTARTABLE)}) of round --round and everything after it; the "
                        f"superseded files are moved to DIR/superseded-<time>/, not deleted")
    p.add_argument("--round", type=int, default=1, metavar="K", help="the round --restart-from starts at (default 1)")
    p.add_argument("--stop-before", choices=("train",), metavar="train",
                   help="stop where the next untrained round's training would start (its data committed), to train "
                        "it on several GPUs with `accelerate launch -m lora_cai.train RECIPE`; rerun to go on")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe, print the memory plan per stage for vram_gb and, for an existing run "
                        "directory, the stages a run would redo and which input changed; load no model")
    return p


def dry_run(cfg, console) -> None:
    from .errors import UserError
    from .offline_models import resolve_model_path
    from .planner import format_plan, load_model_config, plan_recipe

    try:  # an architecture the planner knows by name needs no conversion of an offline model
        model_config = load_model_config(cfg.model.name)
    except UserError:
        model_config = load_model_config(resolve_model_path(cfg.model.name))
    estimates = plan_recipe(cfg, cfg.vram_gb, model_config=model_config, device="cuda")
    print(f"recipe {cfg.source}: model {cfg.model.name}, {cfg.rounds} round(s), output {cfg.output_dir}")
    print(f"memory plan for a {cfg.vram_gb:g} GB GPU (4-bit={cfg.model.load_in_4bit}, LoRA r={cfg.lora.r}):")
    print(format_plan(estimates))
    if cfg.judge.kind == "teacher":
        from .session import together_gb

        both = together_gb(cfg)
        print(f"teacher {cfg.judge.model}: student + teacher at batch 1 ~ {both:.2f} GB: "
              + ("both stay loaded" if both <= cfg.vram_gb else
                 "the student is unloaded while the teacher critiques and judges"))
    from .store import RunStore

    manifest = RunStore(cfg.output_dir).read_manifest()
    if manifest is None:
        return
    from .display import print_plan
    from .rounds import all_inputs, reruns
    from .rundata import load_run_data
    from .rundir import check_run_dir

    data = load_run_data(cfg)
    check_run_dir(cfg, data.constitution)
    print(f"run directory {cfg.output_dir}: a run would")
    plan = reruns(all_inputs(cfg, data, manifest), manifest.get("stages") or {})
    print_plan(console, plan)


def _print_keys() -> None:
    from .config import schema_keys

    for key, typ, default, help_ in schema_keys():
        print(f"{key:32} {typ:24} default {default}\n    {help_}")


def _main(args) -> int:
    if args.help_keys:
        _print_keys()
        return 0
    if not args.recipe:
        from .errors import UserError

        raise UserError("give a recipe, e.g. python -m lora_cai.recipe recipes/smoke.yaml (see --help)")
    from rich.console import Console

    from .config import load_recipe

    cfg = load_recipe(args.recipe, args.overrides, args.output_dir)
    args.writes_to = cfg.output_dir
    console = Console(stderr=True)
    if args.dry_run:
        dry_run(cfg, Console())
        return 0
    if args.restart_from:
        from .errors import UserError
        from .rundir import restart_from

        if args.round < 1 or args.round > cfg.rounds:
            raise UserError(f"--round {args.round}: the recipe has rounds 1..{cfg.rounds}")
        dest = restart_from(Path(cfg.output_dir), args.restart_from, args.round)
        if dest:
            console.print(f"restarting from round {args.round} {args.restart_from}: superseded files moved to {dest}")
    from .rounds import run

    run(cfg, console, stop_before_train=args.stop_before == "train")
    console.print(f"run directory: {cfg.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import OOM_ADVICE, main as cli_main

    return cli_main(build_parser(), _main, argv, oom_advice=OOM_ADVICE,
                    interrupted="interrupted: committed work is kept; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
