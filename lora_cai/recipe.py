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

from lora_cai.stages.registry import RESTARTABLE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_cai.recipe",
        description="Run Constitutional AI rounds (critique, revision, SFT + DPO on stacked LoRA adapters) "
                    "from a YAML recipe.")
    p.add_argument("recipe", nargs="?", help="a built-in recipe's name (see --list) or the path to a recipe YAML")
    p.add_argument("--list", action="store_true", help="list the built-in recipes with their purpose and hardware")
    p.add_argument("--copy", metavar="DEST", help="write an editable copy of RECIPE (a built-in name or a file) to "
                                                   "DEST (never overwrites)")
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
    from lora_cai.errors import UserError
    from lora_cai.engine.offline_models import resolve_model_path
    from lora_cai.engine.planner import format_plan, load_model_config, plan_recipe

    try:  # an architecture the planner knows by name needs no conversion of an offline model
        model_config = load_model_config(cfg.model.name)
    except UserError:
        model_config = load_model_config(resolve_model_path(cfg.model.name))
    estimates = plan_recipe(cfg, cfg.vram_gb, model_config=model_config, device="cuda")
    print(f"recipe {cfg.source}: model {cfg.model.name}, {cfg.rounds} round(s), output {cfg.output_dir}")
    print(f"memory plan for a {cfg.vram_gb:g} GB GPU (4-bit={cfg.model.load_in_4bit}, LoRA r={cfg.lora.r}):")
    print(format_plan(estimates))
    if cfg.judge.kind == "teacher":
        from lora_cai.loop.session import together_gb

        both = together_gb(cfg)
        print(f"teacher {cfg.judge.model}: student + teacher at batch 1 ~ {both:.2f} GB: "
              + ("both stay loaded" if both <= cfg.vram_gb else
                 "the student is unloaded while the teacher critiques and judges"))
    from lora_cai.core.store import RunStore
    from lora_cai.data.rundata import load_run_data

    data = None
    if cfg.eval.per_principle and cfg.data.eval_limit:  # the per-principle stage's size, from the loaded sets
        from lora_cai.stages.principles import dry_run_line

        data = load_run_data(cfg)
        print(dry_run_line(data))
    manifest = RunStore(cfg.output_dir).read_manifest()
    if manifest is None:
        return
    from lora_cai.loop.display import print_plan
    from lora_cai.loop.rounds import all_inputs, reruns
    from lora_cai.loop.rundir import check_run_dir

    data = data or load_run_data(cfg)
    notice = check_run_dir(cfg, data.constitution)
    if notice:
        print(notice)
    print(f"run directory {cfg.output_dir}: a run would")
    plan = reruns(all_inputs(cfg, data, manifest), manifest.get("stages") or {})
    print_plan(console, plan)


def _print_keys() -> None:
    from lora_cai.config.schema import schema_keys

    for key, typ, default, help_ in schema_keys():
        print(f"{key:32} {typ:24} default {default}\n    {help_}")


def list_recipes() -> None:
    from lora_cai.config.builtin import builtin_recipes, recipe_header

    for name, path in builtin_recipes().items():
        h = recipe_header(path)
        print(f"{name:20} {h.get('Purpose', '')}\n{'':20} hardware: {h.get('Hardware', '?')}")
    print("run one: python -m lora_cai.recipe NAME; edit a copy: python -m lora_cai.recipe NAME --copy my.yaml")


def copy_recipe(name: str, dest: str) -> Path:
    """An editable copy of a recipe; its relative file references still resolve from `dest`'s folder."""
    from lora_cai.config.builtin import find_recipe
    from lora_cai.config.load import load_recipe
    from lora_cai.errors import UserError

    src, dest = find_recipe(name), Path(dest)
    if dest.exists():
        raise UserError(f"--copy {dest}: already exists; choose another file name (nothing was overwritten)")
    cfg = load_recipe(src)
    text = src.read_text(encoding="utf-8")
    # A built-in recipe's own files come as builtin: names, which resolve from anywhere; a recipe's relative
    # paths to files beside it would not, so they become absolute.
    for key, value in (("constitution", cfg.constitution), ("judge.rules", cfg.judge.rules)):
        if value and not value.startswith("builtin:") and (src.parent / value).is_file() and not Path(value).is_absolute():
            text = text.replace(value, str((src.parent / value).resolve()))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "x", encoding="utf-8") as f:  # "x": never overwrite, even in a race
            f.write(text)
    except OSError as e:
        raise UserError(f"--copy {dest}: cannot write it ({e.strerror or e})") from None
    return dest


def _main(args) -> int:
    if args.help_keys:
        _print_keys()
        return 0
    if args.list:
        list_recipes()
        return 0
    if args.copy:
        if not args.recipe:
            from lora_cai.errors import UserError

            raise UserError("--copy needs a recipe to copy, e.g. python -m lora_cai.recipe smoke --copy my.yaml")
        print(f"wrote {copy_recipe(args.recipe, args.copy)}; run it with python -m lora_cai.recipe {args.copy}")
        return 0
    if not args.recipe:
        from lora_cai.errors import UserError

        raise UserError("give a recipe, e.g. python -m lora_cai.recipe smoke (--list shows the built-ins; see --help)")
    from rich.console import Console

    from lora_cai.config.load import load_recipe

    cfg = load_recipe(args.recipe, args.overrides, args.output_dir)
    args.writes_to = cfg.output_dir
    console = Console(stderr=True)
    if args.dry_run:
        dry_run(cfg, Console())
        return 0
    if args.restart_from:
        from lora_cai.errors import UserError
        from lora_cai.loop.rundir import restart_from

        if args.round < 1 or args.round > cfg.rounds:
            raise UserError(f"--round {args.round}: the recipe has rounds 1..{cfg.rounds}")
        dest = restart_from(Path(cfg.output_dir), args.restart_from, args.round)
        if dest:
            console.print(f"restarting from round {args.round} {args.restart_from}: superseded files moved to {dest}")
    from lora_cai.loop.rounds import run

    run(cfg, console, stop_before_train=args.stop_before == "train")
    console.print(f"run directory: {cfg.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from lora_cai.cli import OOM_ADVICE, main as cli_main

    return cli_main(build_parser(), _main, argv, oom_advice=OOM_ADVICE,
                    interrupted="interrupted: committed work is kept; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
