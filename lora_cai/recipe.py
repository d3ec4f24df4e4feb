"""`python -m lora_cai.recipe RECIPE`: validate a recipe, then run its CAI rounds stage by stage.

Each round: load base (4-bit) + frozen earlier adapters + a new adapter; generate responses; critique
and revise (K steps); build SFT records and revision pairs; SFT then DPO the new adapter; evaluate on
held-out prompts; stack it. A stage whose output is complete for the same inputs is skipped, so the
same command resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path

from .errors import UserError

# Files each stage owns inside round-<k>/, in stage order: restarting a stage supersedes it and all after it.
STAGE_FILES = {
    "responses": ["responses.jsonl", "responses.jsonl.meta.json"],
    "critique": ["critique-*.jsonl", "critique-*.jsonl.meta.json", "trajectories.jsonl", "sft.jsonl", "pairs.jsonl"],
    "train": ["checkpoints", "train.json", "adapter", "ref_logps.jsonl", "sft_log.jsonl", "dpo_log.jsonl"],
    "eval": ["eval.json"],
}
RESTARTABLE = tuple(STAGE_FILES)


def restart_from(root: Path, stage: str, k: int) -> Path | None:
    """Move `stage` and every later stage of round k, and every later round, into root/superseded-<time>/."""
    from .store import RunStore

    store = RunStore(root)
    manifest = store.read_manifest()
    if manifest is None:
        raise UserError(f"--restart-from: {root} has no finished work to restart (no manifest.json)")
    dest = root / time.strftime("superseded-%Y%m%d-%H%M%S")
    later = list(STAGE_FILES)[list(STAGE_FILES).index(stage):]
    moved = []
    for rd in sorted(root.glob("round-*"), key=lambda p: int(p.name.split("-")[1])):
        r = int(rd.name.split("-")[1])
        if r < k:
            continue
        paths = [rd] if r > k else [p for st in later for pattern in STAGE_FILES[st] for p in rd.glob(pattern)]
        for p in paths:
            target = dest / rd.name / p.name if p != rd else dest / rd.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, target)
            moved.append(p)
    manifest["stack"] = [s for s in manifest.get("stack", []) if int(s.split("/")[0].split("-")[1]) < k]
    manifest["rounds"] = {r: v for r, v in manifest.get("rounds", {}).items() if int(r) < k}
    store.write_manifest(manifest)
    return dest if moved else None


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
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe and print the memory plan per stage for vram_gb; load no model")
    return p


def dry_run(cfg) -> None:
    from .offline_models import resolve_model_path
    from .planner import format_plan, load_model_config, plan_recipe

    name = cfg.model.name
    if name.startswith("pip:") or name.endswith(".gguf"):
        name = resolve_model_path(name)
    estimates = plan_recipe(cfg, cfg.vram_gb, model_config=load_model_config(name), device="cuda")
    print(f"recipe {cfg.source}: model {cfg.model.name}, {cfg.rounds} round(s), output {cfg.output_dir}")
    print(f"memory plan for a {cfg.vram_gb:g} GB GPU (4-bit={cfg.model.load_in_4bit}, LoRA r={cfg.lora.r}):")
    print(format_plan(estimates))


def _print_keys() -> None:
    from .config import schema_keys

    for key, typ, default, help_ in schema_keys():
        print(f"{key:32} {typ:24} default {default}\n    {help_}")


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

class Run:
    """One recipe's run: its inputs (validated up front), its store, and the model loaded lazily per round."""

    def __init__(self, cfg, console):
        from .constitution import load_constitution
        from .data import load_prompts
        from .store import RunStore, content_hash

        self.cfg, self.console = cfg, console
        name = cfg.constitution
        if name.endswith((".yaml", ".yml")) or os.sep in name:
            name = cfg.resolve(name)
        try:
            self.constitution = load_constitution(name)
        except UserError as e:
            raise UserError(f"{cfg.source}: {e}") from None
        d = cfg.data
        self.prompts = load_prompts(self._src(d.prompts), column=d.prompt_column, split=d.split, limit=d.limit)
        self.eval_sets = {}
        if d.eval_limit:
            for key, src in (("harmful", d.eval_harmful), ("benign", d.eval_benign)):
                self.eval_sets[key] = load_prompts(self._src(src), limit=d.eval_limit,
                                                   where=f"data.eval_{key}").records
        self.store = RunStore(cfg.output_dir)
        self.prompts_hash = content_hash([r["id"] for r in self.prompts.records])
        self._check_run_dir()
        self.backend = None
        self.model = self.tokenizer = None
        self.frozen: list[str] = []

    def _src(self, src: str) -> str:
        return src if src.startswith("builtin:") or not Path(self.cfg.resolve(src)).exists() else self.cfg.resolve(src)

    def _check_run_dir(self) -> None:
        root, path = self.store.root, self.store.manifest_path
        if root.exists() and not root.is_dir():
            raise UserError(f"{root}: output_dir is a file, not a directory; use another --output-dir")
        if not path.exists():
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
        if made_with != self.cfg.model.name:
            raise UserError(f"{path}: this run directory was made with base model "
                            f"'{made_with}', not '{self.cfg.model.name}'; use another --output-dir")
        # Another constitution is another run; an edited one (same name) reruns the stages it feeds.
        const = m.get("constitution")
        made_const = const.get("name") if isinstance(const, dict) else None
        if made_const is not None and made_const != self.constitution.name:
            raise UserError(f"{path}: this run directory was made with constitution '{made_const}', not "
                            f"'{self.constitution.name}'; use another --output-dir")

    # ---------------------------------------------------------------- manifest
    def manifest(self) -> dict:
        m = self.store.read_manifest() or {}
        if not m:
            import importlib.metadata as md

            libs = {}
            for dist in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "datasets"):
                try:
                    libs[dist] = md.version(dist)
                except md.PackageNotFoundError:
                    pass
            from . import __version__

            m = {"lora_cai": __version__, "libraries": libs, "stack": [], "rounds": {}}
        m.update({"name": self.cfg.name, "model": self.cfg.model.model_dump(), "backend": self.backend or m.get("backend"),
                  "constitution": {"name": self.constitution.name, "hash": self.constitution.hash()},
                  "seed": self.cfg.seed})
        return m

    # ---------------------------------------------------------------- model
    def ensure_model(self, k: int, stack: list[Path]) -> None:
        if self.model is not None:
            return
        from . import models

        if self.backend is None:
            self.backend = models.resolve_backend(self.cfg.model.backend)
            _quiet_library_bars()
        from transformers import set_seed

        set_seed(self.cfg.seed + k)
        t = time.time()
        self.model, self.tokenizer, self.frozen = models.build_policy(
            self.cfg.model, self.cfg.lora, stack, self.backend, self.cfg.seed + k)
        self.console.log(f"round {k}: loaded {self.cfg.model.name} ({'4-bit' if self.cfg.model.load_in_4bit else 'full'}"
                         f", {self.backend}) + {len(stack)} frozen adapter(s) in {time.time() - t:.1f}s")

    def drop_model(self) -> None:
        from .models import free

        self.model = self.tokenizer = None
        free()

    # ---------------------------------------------------------------- stages
    def run(self) -> dict:
        from .store import file_hash

        m = self.manifest()
        stack: list[str] = []
        for k in range(1, self.cfg.rounds + 1):
            stack_paths = [self.store.root / s for s in stack]
            stack_hash = [file_hash(p / "adapter_model.safetensors") for p in stack_paths]
            if k == 1:
                self.baseline_eval(stack_paths, stack_hash)
            summary = self.run_round(k, stack_paths, stack_hash)
            stack.append(f"round-{k}/adapter")
            m = self.manifest()
            m["stack"] = list(stack)
            m["rounds"][str(k)] = summary
            self.store.write_manifest(m)
            self.print_round(k, summary)
            self.drop_model()
        self.print_before_after(m)
        return m

    def baseline_eval(self, stack_paths, stack_hash) -> None:
        from .store import atomic_write_json, content_hash, read_json

        path = self.store.root / "baseline-eval.json"
        inputs = content_hash({"model": self.cfg.model.name, "sets": self.eval_sets, "stack": stack_hash})
        if not self.eval_sets or (path.exists() and read_json(path).get("inputs") == inputs):
            return
        result = self._evaluate(self.generator(1, stack_paths, local=True))
        atomic_write_json(path, {"inputs": inputs, **result})

    def generator(self, k: int, stack_paths: list[Path], local: bool = False):
        """The round's policy behind one generation interface: the local model, or the configured server.

        Evaluation always runs locally (`local=True`): the policy just trained is the one in memory.
        """
        g = self.cfg.generation
        if g.base_url and not local:
            from .api import ChatClient
            from .generators import APIGenerator

            client = ChatClient(g.base_url, g.model.replace("{round}", str(k)), api_key_env=g.api_key_env,
                                concurrency=g.concurrency, timeout=g.timeout,
                                cache_dir=self.store.root / "cache" / "api")
            return APIGenerator(client, batch_size=max(g.concurrency * 4, 1))
        from . import models
        from .generators import LocalGenerator

        self.ensure_model(k, stack_paths)
        models.for_inference(self.model, self.backend)
        return LocalGenerator(self.model, self.tokenizer, token_budget=g.token_budget, max_batch_size=g.max_batch_size)

    def _evaluate(self, generator) -> dict:
        from .evaluation import evaluate
        from .generation import make_progress

        with make_progress(console=self.console, transient=True) as progress:
            return evaluate(generator, self.eval_sets.get("harmful", []), self.eval_sets.get("benign", []),
                            max_new_tokens=min(96, self.cfg.generation.max_new_tokens), progress=progress)

    def run_round(self, k: int, stack_paths: list[Path], stack_hash: list[str]) -> dict:
        from . import critique, models, training
        from .generation import GenerationStats, make_progress
        import shutil

        from .store import (JsonlStage, atomic_write_json, content_hash, file_hash, read_json, read_jsonl,
                            write_jsonl_atomic)

        cfg, rd = self.cfg, self.store.round_dir(k)
        summary: dict = {"prompts": len(self.prompts.records), "dropped_empty_prompts": self.prompts.dropped_empty,
                         "dropped_duplicate_prompts": self.prompts.dropped_duplicate}
        t0, worked = time.time(), False  # a rerun that only skips keeps the recorded time: the manifest stays put

        # 1. initial responses
        resp_inputs = content_hash({"model": cfg.model.model_dump(), "stack": stack_hash, "prompts": self.prompts_hash,
                                    "generation": cfg.generation.model_dump(), "seed": cfg.seed, "round": k})
        stage = JsonlStage(rd / "responses.jsonl", resp_inputs)
        gstats = GenerationStats()
        if not stage.complete:
            worked = True
            recs = self.prompts.records
            g = cfg.generation
            with make_progress(console=self.console) as progress:
                for batch, outs in self.generator(k, stack_paths).iter(
                        [[{"role": "user", "content": r["prompt"]}] for r in recs], max_new_tokens=g.max_new_tokens,
                        temperature=g.temperature, top_p=g.top_p, seed=cfg.seed + 7919 * k,
                        skip_batches=stage.done_batches, stats=gstats, progress=progress,
                        description=f"round {k} responses"):
                    stage.commit([{"id": recs[i]["id"], "prompt": recs[i]["prompt"], "response": text,
                                   "round": k, "seed": cfg.seed, "batch": batch} for i, text in outs], batch)
            stage.finish(generation=gstats.as_dict())
        responses = stage.records()
        summary["responses"] = sum(r["response"] is not None for r in responses)
        summary["skipped_too_long"] = sum(r["response"] is None for r in responses)

        # 2. critique -> revision, K steps
        lstats = GenerationStats()
        step_records: list[list[dict]] = []
        upstream = file_hash(stage.path)
        current = {r["id"]: r for r in responses if r["response"] is not None}
        for s in range(1, cfg.critique.steps + 1):
            items = [{"id": i, "prompt": r["prompt"], "response": r["response"]} for i, r in current.items()]
            st = JsonlStage(rd / f"critique-{s}.jsonl", critique.step_inputs_hash(cfg, self.constitution, upstream, s))
            if not st.complete and items:
                worked = True
                with make_progress(console=self.console) as progress:
                    critique.run_critique_step(self.generator(k, stack_paths), self.constitution, items, s, st,
                                               cfg=cfg, seed=cfg.seed + k, progress=progress, stats=lstats)
            if not st.complete:
                st.finish(generation=lstats.as_dict())
            recs = st.records()
            step_records.append(recs)
            upstream = content_hash([upstream, file_hash(st.path)])
            current = {r["id"]: {"prompt": current[r["id"]]["prompt"], "response": r["revision"]}
                       for r in recs if r["status"] == "revise" and r["revision"]}
        trajectories = critique.assemble(responses, step_records, self.constitution)
        sft = critique.sft_records(trajectories)
        pairs = critique.revision_pairs(trajectories)
        write_jsonl_atomic(rd / "trajectories.jsonl", trajectories)
        write_jsonl_atomic(rd / "sft.jsonl", sft)
        write_jsonl_atomic(rd / "pairs.jsonl", pairs)
        statuses = [s["status"] for recs in step_records for s in recs]
        summary.update({
            "critiques": len(statuses), "revisions": statuses.count("revise"),
            "no_change": statuses.count("no_change"), "copied_demonstration": statuses.count("copied_demonstration"),
            "copied_response": statuses.count("copied_response"),
            "empty": statuses.count("empty"), "sft_records": len(sft), "pairs": len(pairs)})
        if not sft:
            raise UserError(f"round {k}: no usable revisions to train on (critiques: {summary['critiques']}, copied "
                            f"demonstrations: {summary['copied_demonstration']}); use more prompts or a larger model")

        # 3. SFT then DPO on the new adapter
        adapter = rd / "adapter"
        train_inputs = content_hash({"sft": file_hash(rd / "sft.jsonl"), "pairs": file_hash(rd / "pairs.jsonl"),
                                     "stack": stack_hash, "lora": cfg.lora.model_dump(), "sft_cfg": cfg.sft.model_dump(),
                                     "dpo_cfg": cfg.dpo.model_dump(), "model": cfg.model.model_dump(), "seed": cfg.seed})
        done = rd / "train.json"
        if not (done.exists() and read_json(done).get("inputs") == train_inputs
                and (adapter / "adapter_model.safetensors").exists()):
            worked = True
            ckpt = rd / "checkpoints"
            if (ckpt / "inputs.json").exists() and read_json(ckpt / "inputs.json").get("inputs") != train_inputs:
                shutil.rmtree(ckpt)  # checkpoints of other inputs: stale
            atomic_write_json(ckpt / "inputs.json", {"inputs": train_inputs})
            self.ensure_model(k, stack_paths)
            models.for_training(self.model, self.backend)
            sft_done = ckpt / "sft-adapter"
            if (sft_done / "adapter_model.safetensors").exists():  # SFT finished before a crash: keep it
                models.load_trainable_weights(self.model, sft_done, self.frozen)
                sft_log = read_jsonl(ckpt / "sft_log.jsonl")
            else:
                sft_log = training.train_sft(self.model, self.tokenizer, sft, cfg.sft, ckpt / "sft",
                                             seed=cfg.seed + k, frozen=self.frozen, console=self.console,
                                             desc=f"round {k} SFT")
                training.write_log(ckpt / "sft_log.jsonl", sft_log)
                models.save_adapter(self.model, sft_done)
            dpo_log, ref = [], []
            if pairs:
                dpo_log, ref = training.train_dpo(self.model, self.tokenizer, pairs, cfg.dpo,
                                                  ckpt / "dpo", seed=cfg.seed + k, frozen=self.frozen,
                                                  console=self.console, desc=f"round {k} DPO")
            write_jsonl_atomic(rd / "ref_logps.jsonl", ref)
            training.write_log(rd / "sft_log.jsonl", sft_log)
            training.write_log(rd / "dpo_log.jsonl", dpo_log)
            models.save_adapter(self.model, adapter)
            atomic_write_json(done, {"inputs": train_inputs,
                                     "sft": training.summarize(sft_log), "dpo": training.summarize(dpo_log)})
        tr = read_json(done)
        shutil.rmtree(rd / "checkpoints", ignore_errors=True)  # the adapter and train.json are committed
        summary["sft"], summary["dpo"] = tr["sft"], tr["dpo"]

        # 4. evaluate the round's policy (base + adapters 1..k)
        ev_path = rd / "eval.json"
        ev_inputs = content_hash({"adapter": file_hash(adapter / "adapter_model.safetensors"), "stack": stack_hash,
                                  "sets": self.eval_sets})
        if self.eval_sets and not (ev_path.exists() and read_json(ev_path).get("inputs") == ev_inputs):
            worked = True
            if self.model is None:
                self.ensure_model(k, stack_paths)
                self.model.load_adapter(str(adapter), adapter_name="trained", is_trainable=False)
                models.set_active(self.model, self.frozen + ["trained"])
            result = self._evaluate(self.generator(k, stack_paths, local=True))
            atomic_write_json(ev_path, {"inputs": ev_inputs, **result})
        if ev_path.exists():
            ev = read_json(ev_path)
            summary["eval"] = {k2: ev[k2] for k2 in ("harmful_compliance", "over_refusal", "n_harmful", "n_benign",
                                                     "detector")}
        before = ((self.store.read_manifest() or {}).get("rounds") or {}).get(str(k), {})
        summary["seconds"] = round(time.time() - t0, 1) if worked or "seconds" not in before else before["seconds"]
        return summary

    # ---------------------------------------------------------------- output
    def print_round(self, k: int, s: dict) -> None:
        from rich.table import Table

        t = Table(title=f"round {k}", show_header=True, header_style="bold")
        t.add_column("stage")
        t.add_column("result", justify="right")
        t.add_row("prompts", f"{s['prompts']} ({s['skipped_too_long']} too long)")
        t.add_row("responses", str(s["responses"]))
        t.add_row("critiques", f"{s['critiques']} ({s['no_change']} no change, {s['copied_demonstration']} copied demo, "
                               f"{s.get('copied_response', 0)} echoed answer, {s['empty']} empty)")
        t.add_row("revisions", str(s["revisions"]))
        t.add_row("SFT records / pairs", f"{s['sft_records']} / {s['pairs']}")
        t.add_row("SFT loss", _fmt_span(s["sft"], "loss"))
        t.add_row("DPO loss", _fmt_span(s["dpo"], "loss"))
        t.add_row("DPO reward margin", _fmt_span(s["dpo"], "rewards/margins"))
        if "eval" in s:
            t.add_row("harmful compliance", _pct(s["eval"]["harmful_compliance"]))
            t.add_row("over-refusal", _pct(s["eval"]["over_refusal"]))
        t.add_row("time", f"{s['seconds']} s")
        self.console.print(t)

    def print_before_after(self, m: dict) -> None:
        from .store import read_json

        base_path = self.store.root / "baseline-eval.json"
        last = m["rounds"].get(str(self.cfg.rounds), {}).get("eval")
        if not base_path.exists() or not last:
            return
        base = read_json(base_path)
        self.console.print(
            f"[bold]before -> after[/]: harmful compliance {_pct(base['harmful_compliance'])} -> "
            f"{_pct(last['harmful_compliance'])}, over-refusal {_pct(base['over_refusal'])} -> "
            f"{_pct(last['over_refusal'])} (held out: {last['n_harmful']} harmful + {last['n_benign']} benign prompts, "
            f"{last['detector']})")


def _disk_full(exc: BaseException) -> str | None:
    """The file being written when the disk filled ('' if unknown), or None when `exc` is not a full disk.

    Libraries wrap ENOSPC in their own errors (safetensors: SafetensorError "... (os error 28)").
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc.filename or ""
        if "No space left on device" in str(exc):
            return ""
        exc = exc.__cause__ or exc.__context__
    return None


def _quiet_library_bars() -> None:
    """Our rich bars show progress; the libraries' own tqdm bars (weights, dataset maps) would bury them."""
    import datasets
    import transformers

    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference-log-prob pass reads this
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _fmt_span(summary: dict, key: str) -> str:
    first, last = summary.get(f"first_{key}"), summary.get(f"last_{key}")
    if first is None:
        return "n/a"
    return f"{first:.3f} -> {last:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def _one_line(message: str):  # argparse's own errors print usage + error (two lines); keep the one-line promise
        raise UserError(f"{message} (see python -m lora_cai.recipe --help)")

    parser.error = _one_line
    try:
        args = parser.parse_args(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if args.help_keys:
        _print_keys()
        return 0
    if not args.recipe:
        print("error: give a recipe, e.g. python -m lora_cai.recipe recipes/smoke.yaml (see --help)", file=sys.stderr)
        return 2
    try:
        from rich.console import Console

        from .config import load_recipe

        cfg = load_recipe(args.recipe, args.overrides, args.output_dir)
        if args.dry_run:
            dry_run(cfg)
            return 0
        console = Console(stderr=True)
        if args.restart_from:
            if args.round < 1 or args.round > cfg.rounds:
                raise UserError(f"--round {args.round}: the recipe has rounds 1..{cfg.rounds}")
            dest = restart_from(Path(cfg.output_dir), args.restart_from, args.round)
            if dest:
                console.print(f"restarting from round {args.round} {args.restart_from}: superseded files moved to {dest}")
        run = Run(cfg, console)
        run.run()
        console.print(f"run directory: {cfg.output_dir}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: committed work is kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        full = _disk_full(e)
        if full is not None:
            print(f"error: disk full while writing {full or 'the run directory'}: free some space and rerun the same "
                  f"command (committed work is kept)", file=sys.stderr)
            return 2
        if type(e).__name__ != "OutOfMemoryError":
            raise
        print("error: the GPU ran out of memory; run the same command with --dry-run to see the memory plan, then "
              "lower sft.batch_size / dpo.batch_size (raise grad_accum), max_length or lora.r, or set vram_gb to "
              "your card and rerun (committed work is kept)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
