"""`python -m lora_cai.export RUN_DIR`: the command line of the weights, dataset and Hub exports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lora_cai.errors import UserError
from lora_cai.export.hub import _hub_api, push_to_hub
from lora_cai.export.weights import DTYPES, export_gguf, export_run, read_run, single_adapter


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m lora_cai.export", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a lora_cai run directory (it has manifest.json)")
    p.add_argument("--out", default=None, help="new directory for the merged checkpoint")
    p.add_argument("--dataset", metavar="OUT", default=None,
                   help="write the run's data instead (SFT records, preference pairs, held-out answers per round) "
                        "as a Hugging Face dataset in Parquet with its card; with --push-to-hub, to a dataset repo")
    p.add_argument("--upto", type=int, default=None, help="merge adapters 1..K only (default: the whole stack)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the saved weights (default bfloat16)")
    p.add_argument("--gguf", metavar="QUANT", default=None,
                   help="also write OUT/gguf/*.gguf through Unsloth (e.g. q4_k_m, q8_0, f16); needs the network the "
                        "first time, to build llama.cpp")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="upload OUT to this Hub repository (created private if new; an existing public one is "
                        "refused without --public); token from HF_TOKEN")
    p.add_argument("--public", action="store_true",
                   help="with --push-to-hub: create the repository public, or upload into an existing public one")
    p.add_argument("--backend", default=None, choices=("auto", "transformers", "unsloth"),
                   help="loader for the 4-bit base (default: the run's own backend)")
    p.add_argument("--single-adapter", action="store_true",
                   help="write OUT as one PEFT adapter that computes the whole stack (rank = the sum of the ranks), "
                        "for servers taking one LoRA per request (vLLM --lora-modules); loads no model")
    return p


def _main(args) -> int:
    if args.public and not args.push_to_hub:
        raise UserError("--public applies to --push-to-hub REPO_ID: add it, or drop --public")
    if args.dataset:
        return _export_dataset(args)
    if not args.out:
        raise UserError("give --out DIR (a merged checkpoint or, with --single-adapter, one adapter) or --dataset DIR")
    args.writes_to = Path(args.out).parent
    api = _hub_api(args.push_to_hub, public=args.public) if args.push_to_hub else None  # fail before the slow merge
    if args.single_adapter:
        if args.gguf:
            raise UserError("--gguf needs a merged checkpoint; drop --single-adapter")
        _, adapters, _ = read_run(Path(args.run_dir), args.upto)
        out = single_adapter(adapters, Path(args.out))
        rank = json.loads((out / "adapter_config.json").read_text())["r"]
        print(f"one adapter for the stack of {len(adapters)} (rank {rank}): {out}", file=sys.stderr)
        if api is not None:
            print(f"pushed: {push_to_hub(api, out, args.push_to_hub, public=args.public)}", file=sys.stderr)
        return 0
    out = export_run(Path(args.run_dir), Path(args.out), upto=args.upto, dtype=args.dtype, backend=args.backend)
    print(f"merged checkpoint ({args.dtype}): {out}", file=sys.stderr)
    if args.gguf:
        print(f"gguf: {export_gguf(out, args.gguf)}", file=sys.stderr)
    if api is not None:
        print(f"pushed: {push_to_hub(api, out, args.push_to_hub, public=args.public)}", file=sys.stderr)
    return 0


def _export_dataset(args) -> int:
    from lora_cai.export.dataset import check_target, write_dataset

    others = [flag for flag, on in (("--out", args.out), ("--single-adapter", args.single_adapter),
                                    ("--gguf", args.gguf), ("--upto", args.upto is not None)) if on]
    if others:
        raise UserError(f"--dataset writes the run's data, not a model: drop {', '.join(others)}")
    args.writes_to = Path(args.dataset).parent
    check_target(Path(args.dataset))
    api = _hub_api(args.push_to_hub, "dataset", args.public) if args.push_to_hub else None
    sizes = write_dataset(Path(args.run_dir), Path(args.dataset))
    print(f"dataset ({', '.join(f'{k} {v}' for k, v in sizes.items())}): {args.dataset}", file=sys.stderr)
    if api is not None:
        pushed = push_to_hub(api, Path(args.dataset), args.push_to_hub, repo_type="dataset", public=args.public)
        print(f"pushed: {pushed}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from lora_cai.cli import main as cli_main

    return cli_main(build_parser(), _main, argv)
