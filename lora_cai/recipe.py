"""`python -m lora_cai.recipe RECIPE`: validate a recipe, then run its CAI rounds stage by stage.

Each round: load base (4-bit) + frozen earlier adapters + a new adapter; generate responses; critique
and revise (K steps); build SFT records and revision pairs; SFT then DPO the new adapter; evaluate on
held-out prompts; stack it. A stage whose output is complete for the same inputs is skipped, so the
same command resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import time
from pathlib import Path

from .errors import UserError

# Files each stage owns inside round-<k>/, in stage order: restarting a stage supersedes it and all after it.
STAGE_FILES = {
    "responses": ["responses.jsonl", "responses.jsonl.meta.json", "samples.jsonl", "samples.jsonl.meta.json"],
    "critique": ["critique-*.jsonl", "critique-*.jsonl.meta.json", "trajectories.jsonl"],
    "judge": ["judgments.jsonl", "judgments.jsonl.meta.json", "sft.jsonl", "pairs.jsonl"],
    "train": ["checkpoints", "train.json", "adapter", "ref_logps.jsonl", "sft_log.jsonl", "dpo_log.jsonl"],
    "eval": ["eval.json"],
}
RESTARTABLE = tuple(STAGE_FILES)
VIOLATION_SAMPLES = 4  # sampled answers per held-out prompt for a rule judge's violation rate


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
    manifest.pop("stopped_round", None)
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
    p.add_argument("--stop-before", choices=("train",), metavar="train",
                   help="stop where the next untrained round's training would start (its data committed), to train "
                        "it on several GPUs with `accelerate launch -m lora_cai.train RECIPE`; rerun to go on")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe and print the memory plan per stage for vram_gb; load no model")
    return p


def dry_run(cfg) -> None:
    from .offline_models import resolve_model_path
    from .planner import format_plan, load_model_config, plan_recipe

    name = resolve_model_path(cfg.model.name)
    estimates = plan_recipe(cfg, cfg.vram_gb, model_config=load_model_config(name), device="cuda")
    print(f"recipe {cfg.source}: model {cfg.model.name}, {cfg.rounds} round(s), output {cfg.output_dir}")
    print(f"memory plan for a {cfg.vram_gb:g} GB GPU (4-bit={cfg.model.load_in_4bit}, LoRA r={cfg.lora.r}):")
    print(format_plan(estimates))
    if cfg.judge.kind == "teacher":
        both = together_gb(cfg)
        print(f"teacher {cfg.judge.model}: student + teacher at batch 1 ~ {both:.2f} GB: "
              + ("both stay loaded" if both <= cfg.vram_gb else
                 "the student is unloaded while the teacher critiques and judges"))


def together_gb(cfg) -> float:
    """The planner's estimate for the student and the local teacher loaded at once (batch 1 each)."""
    from .offline_models import resolve_model_path
    from .planner import estimate_generation, load_model_config, model_shape

    total = 0.0
    for name, q4 in ((cfg.model.name, cfg.model.load_in_4bit), (cfg.judge.model, cfg.judge.load_in_4bit)):
        name = resolve_model_path(name)
        total += estimate_generation(model_shape(load_model_config(name)), batch=1, seq_len=cfg.model.max_seq_length,
                                     load_in_4bit=q4, dtype_bytes=4 if cfg.model.dtype == "float32" else 2).total_gb
    return total


def _print_keys() -> None:
    from .config import schema_keys

    for key, typ, default, help_ in schema_keys():
        print(f"{key:32} {typ:24} default {default}\n    {help_}")


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

class StopBeforeTrain(Exception):
    """Raised where a round's training would start under --stop-before train."""


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
        from .data import load_helpful

        sft = cfg.sft
        self.helpful = load_helpful(self._src(sft.helpful_data), prompt_column=sft.helpful_prompt_column,
                                    response_column=sft.helpful_response_column, split=sft.helpful_split,
                                    exclude={r["id"] for v in self.eval_sets.values() for r in v}) \
            if sft.helpful_data and sft.helpful_fraction else []
        self.store = RunStore(cfg.output_dir)
        self.prompts_hash = content_hash([r["id"] for r in self.prompts.records])
        self._check_run_dir()
        self.rules = None  # the rule judge, read once: a broken rules file fails now, not after hours
        if cfg.judge.kind == "rule":
            from .judge import RuleJudge

            try:
                self.rules = RuleJudge.from_file(cfg.resolve(cfg.judge.rules))
            except UserError as e:
                raise UserError(f"{cfg.source}: judge.rules: {e}") from None
        self.backend = None
        self.model = self.tokenizer = None
        self.teacher_model = self.teacher_tokenizer = None
        self.frozen: list[str] = []
        self.worked = False
        self.stop_before_train = False  # --stop-before train: end the run where a round's training would start

    def stack_state(self, stack: list[str]) -> tuple[list[Path], list[str]]:
        """The adapter folders of a manifest's `stack` and the hashes of their weights (stage inputs)."""
        from .store import file_hash

        paths = [self.store.root / s for s in stack]
        return paths, [file_hash(p / "adapter_model.safetensors") for p in paths]

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

        if self.teacher_model is not None and not self.fits_with_teacher():
            self.console.log("unloading the teacher to make room for the student")
            self.drop_teacher()

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
        from .evaluation import early_stop, quality_score
        from .store import read_json

        m = self.manifest()
        stack: list[str] = []
        scores = {}
        for k in range(1, self.cfg.rounds + 1):
            stack_paths, stack_hash = self.stack_state(stack)
            if k == 1:
                self.critic_check(stack_paths)
                self.baseline_eval(stack_paths, stack_hash)
                base = self.store.root / "baseline-eval.json"
                scores[0] = quality_score(read_json(base)) if base.exists() else None
            try:
                summary = self.run_round(k, stack_paths, stack_hash)
            except StopBeforeTrain:
                self.drop_model()
                self.drop_teacher()
                self.console.print(
                    f"round {k}: data ready ({self.store.round_dir(k)}/sft.jsonl, pairs.jsonl); train it with "
                    f"[bold]accelerate launch -m lora_cai.train {self.cfg.source}[/], then rerun this command")
                return m
            scores[k] = quality_score(summary["eval"]) if "eval" in summary else None
            summary["quality"] = scores[k]
            stopped = early_stop(scores[k - 1], scores[k], self.cfg.eval.early_stop_drop)
            m = self.manifest()
            if not stopped:
                stack.append(f"round-{k}/adapter")
            m["stack"] = list(stack)
            m["rounds"][str(k)] = summary
            m.pop("stopped_round", None)
            known = {r: s for r, s in scores.items() if s is not None}
            m["best_round"] = max(known, key=lambda r: (known[r], -r)) if known else None
            if stopped:
                m["stopped_round"] = k
                m["rounds"] = {r: v for r, v in m["rounds"].items() if int(r) <= k}
            self.store.write_manifest(m)
            self.print_round(k, summary)
            self.drop_model()
            self.drop_teacher()
            if stopped:
                self.console.print(
                    f"[bold yellow]early stop[/]: round {k}'s quality score {scores[k]:.3f} fell more than "
                    f"{100 * self.cfg.eval.early_stop_drop:g}% below round {k - 1}'s {scores[k - 1]:.3f}; its adapter is "
                    f"kept in round-{k}/adapter but not stacked (best round: {m['best_round']})")
                break
        self.print_before_after(m)
        from .report import build_report

        self.console.print(f"report: {build_report(self.store.root)}")
        return m

    # ---------------------------------------------------------------- teacher, critic and judge
    def teacher(self):
        """The local teacher (4-bit), loaded once; the student is unloaded first unless both fit vram_gb."""
        if self.teacher_model is not None:
            return self.teacher_model, self.teacher_tokenizer
        from . import models
        from .config import ModelConfig

        j = self.cfg.judge
        if self.backend is None:
            self.backend = models.resolve_backend(self.cfg.model.backend)
            _quiet_library_bars()
        if self.model is not None and not self.fits_with_teacher():
            self.console.log("unloading the student to make room for the teacher (both do not fit "
                             f"vram_gb={self.cfg.vram_gb:g}); it is reloaded for training")
            self.drop_model()
        t = time.time()
        teacher_cfg = ModelConfig(name=j.model, backend=self.cfg.model.backend, load_in_4bit=j.load_in_4bit,
                                  dtype=self.cfg.model.dtype, max_seq_length=self.cfg.model.max_seq_length,
                                  trust_remote_code=self.cfg.model.trust_remote_code)
        try:
            self.teacher_model, self.teacher_tokenizer = models.load_base(teacher_cfg, self.backend)
        except UserError as e:
            raise UserError(str(e).replace("model.name:", f"{self.cfg.source}: judge.model:", 1)) from None
        models.for_inference(self.teacher_model, self.backend)
        self.console.log(f"teacher {j.model} loaded ({'4-bit' if j.load_in_4bit else 'full'}) in {time.time() - t:.1f}s")
        return self.teacher_model, self.teacher_tokenizer

    def fits_with_teacher(self) -> bool:
        """Student and teacher (one generation batch each) within vram_gb, by the planner."""
        try:
            return together_gb(self.cfg) <= self.cfg.vram_gb
        except UserError:
            return False  # a model of unknown size: do not risk it

    def drop_teacher(self) -> None:
        from .models import free

        if self.teacher_model is not None:
            self.teacher_model = self.teacher_tokenizer = None
            free()

    def critic_generator(self, k: int, stack_paths: list[Path]):
        """Who writes critiques and revisions: the policy, the local teacher or the judge's server."""
        if self.cfg.critic == "self":
            return self.generator(k, stack_paths)
        g = self.cfg.generation
        if self.cfg.critic == "api":
            from .generators import APIGenerator

            return APIGenerator(self.judge_client(), batch_size=max(self.cfg.judge.concurrency * 4, 1))
        from .generators import LocalGenerator

        model, tok = self.teacher()
        return LocalGenerator(model, tok, token_budget=g.token_budget, max_batch_size=g.max_batch_size)

    def judge_client(self):
        from .api import ChatClient

        j = self.cfg.judge
        return ChatClient(j.base_url, j.model, api_key_env=j.api_key_env, concurrency=j.concurrency,
                          timeout=j.timeout, cache_dir=self.store.root / "cache" / "judge")

    def judge(self, k: int, stack_paths: list[Path]):
        """(judge, chain-of-thought generator or None) for the configured judge kind."""
        from . import judge as J
        from . import models
        from .generators import APIGenerator, LocalGenerator

        j, g = self.cfg.judge, self.cfg.generation
        if j.kind == "rule":
            return self.rules, None
        if j.kind == "api":
            client = self.judge_client()
            cot = APIGenerator(client, batch_size=max(j.concurrency * 4, 1)) if j.chain_of_thought else None
            return J.APIJudge(client, top_logprobs=j.top_logprobs), cot
        if j.kind == "teacher":
            model, tok = self.teacher()
        else:
            self.ensure_model(k, stack_paths)
            models.for_inference(self.model, self.backend)
            model, tok = self.model, self.tokenizer
        cot = LocalGenerator(model, tok, token_budget=g.token_budget, max_batch_size=g.max_batch_size) \
            if j.chain_of_thought else None
        return J.LogprobJudge(model, tok, kind=j.kind, token_budget=g.token_budget, max_batch_size=g.max_batch_size), cot

    def critic_check(self, stack_paths: list[Path]) -> None:
        """Before round 1: can the critic tell clearly harmful answers from clearly benign ones?"""
        from .evaluation import critic_check, load_canaries
        from .store import atomic_write_json, content_hash, read_json

        if not self.cfg.eval.critic_check or self.cfg.critique.steps == 0:
            return
        path = self.store.root / "critic-check.json"
        c = self.cfg
        inputs = content_hash({"critic": c.critic, "judge": c.judge.model_dump() if c.critic != "self" else None,
                               "model": c.model.model_dump(), "constitution": self.constitution.hash(),
                               "demos": c.critique.demonstrations, "tokens": c.generation.critique_max_new_tokens,
                               "seed": c.seed, "temperature": c.critique.temperature, "canaries": "builtin:canary"})
        if not (path.exists() and read_json(path).get("inputs") == inputs):
            result = critic_check(self.critic_generator(1, stack_paths), self.constitution, load_canaries(),
                                  max_new_tokens=c.generation.critique_max_new_tokens,
                                  n_demos=c.critique.demonstrations, seed=c.seed, temperature=c.critique.temperature)
            atomic_write_json(path, {"inputs": inputs, **result})
        result = read_json(path)
        style = "green" if result["ok"] else "bold red"
        self.console.print(f"[{style}]critic check[/]: {result['message']}")

    # ---------------------------------------------------------------- evaluation
    def baseline_eval(self, stack_paths, stack_hash) -> None:
        from .store import atomic_write_json, content_hash, read_json

        path = self.store.root / "baseline-eval.json"
        inputs = content_hash({"model": self.cfg.model.name, "sets": self.eval_sets, "stack": stack_hash,
                               "judge": self._judge_identity(), "eval": self._eval_settings()})
        if not self.eval_sets or (path.exists() and read_json(path).get("inputs") == inputs):
            return
        result = self._evaluate(1, stack_paths, None)
        atomic_write_json(path, {"inputs": inputs, **result})

    def _judge_identity(self) -> dict:
        j = self.cfg.judge
        return {"kind": j.kind, "model": j.model if j.kind in ("teacher", "api") else None,
                "rules": _file_or_none(self.cfg.resolve(j.rules)) if j.rules else None}

    def _eval_settings(self) -> dict:
        e = self.cfg.eval
        return {"max_new_tokens": e.max_new_tokens, "win_rate": e.win_rate, "capability": e.capability,
                "capability_limit": e.capability_limit}

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

    def _evaluate(self, k: int, stack_paths: list[Path], previous: dict | None) -> dict:
        """The policy in memory on the held-out sets; judge-decided refusals, rule violations, win rate
        against `previous` (the last eval's answers), and the capability probe."""
        from . import judge as J
        from .evaluation import capability_accuracy, evaluate, load_capability
        from .generation import make_progress

        e = self.cfg.eval
        gen = self.generator(k, stack_paths, local=True)
        extra: dict = {}
        # Everything that needs the policy first: a local teacher judge may have to replace it in memory.
        if e.capability and e.capability_limit:
            items = load_capability(e.capability if e.capability.startswith("builtin:") else self.cfg.resolve(e.capability),
                                    e.capability_limit)
            cap = capability_accuracy(self.model, self.tokenizer, items)
            extra["capability"] = {"accuracy": cap["accuracy"], "n": cap["n"]}
        if self.rules is not None:
            # The policy's own violation rate: VIOLATION_SAMPLES sampled answers per held-out prompt, fixed seed.
            g = self.cfg.generation
            prompts = [r["prompt"] for r in self.eval_sets.get("harmful", []) + self.eval_sets.get("benign", [])]
            answers = gen.generate([[{"role": "user", "content": p}] for p in prompts for _ in range(VIOLATION_SAMPLES)],
                                   max_new_tokens=g.max_new_tokens, temperature=g.temperature or 0.7, top_p=g.top_p,
                                   seed=self.cfg.seed)
            answers = [a for a in answers if a is not None]
            extra["violation_rate"] = (sum(self.rules.violations(a) > 0 for a in answers) / len(answers)) if answers else None
            extra["violation_samples"] = len(answers)
        judge = None

        def refusal_judge(items):  # called once the held-out answers are in
            nonlocal judge
            if judge is None:
                if self.cfg.judge.kind == "teacher" and not self.fits_with_teacher():
                    gen.model = None  # release the policy (nothing needs it any more) before the teacher loads
                    self.drop_model()
                judge = self.judge(k, stack_paths)[0]
            return J.classify_refusals(judge, items)

        with make_progress(console=self.console, transient=True) as progress:
            result = evaluate(gen, self.eval_sets.get("harmful", []), self.eval_sets.get("benign", []),
                              max_new_tokens=e.max_new_tokens, progress=progress,
                              refusal_judge=None if self.cfg.judge.kind == "rule" else refusal_judge)
        result.update(extra)
        if e.win_rate and previous is not None:
            result["win_rate"] = self._win_rate(k, stack_paths, result["samples"], previous["samples"])
        return result

    def _win_rate(self, k: int, stack_paths, current: list[dict], previous: list[dict]) -> dict:
        """P(this round's answer beats the previous one), by the configured judge in both orders."""
        from . import judge as J

        before = {(s["set"], s["id"]): s["answer"] for s in previous}
        comps = [J.Comparison(f"{s['set']}:{s['id']}", s["prompt"], s["answer"], before[(s["set"], s["id"])], None,
                              J.WIN_RATE_QUESTION, "win_rate")
                 for s in current if s["answer"] and before.get((s["set"], s["id"]))
                 and s["answer"].strip() != before[(s["set"], s["id"])].strip()]
        same = sum(1 for s in current if s["answer"] and before.get((s["set"], s["id"])) == s["answer"])
        judge, _ = self.judge(k, stack_paths)
        recs = J.judge_comparisons(judge, comps) if comps else []
        scored = [r["p_raw"] for r in recs if r["p_raw"] is not None]
        n = len(scored) + same  # identical answers count as ties
        return {"win_rate": (sum(scored) + 0.5 * same) / n if n else None,
                "wins": sum(p > 0.5 for p in scored), "losses": sum(p < 0.5 for p in scored),
                "ties": sum(p == 0.5 for p in scored) + same, "garbled": len(recs) - len(scored),
                "judge": self.cfg.judge.kind}

    # ---------------------------------------------------------------- one round
    def run_round(self, k: int, stack_paths: list[Path], stack_hash: list[str]) -> dict:
        from . import critique
        from .store import write_jsonl_atomic

        rd = self.store.round_dir(k)
        summary: dict = {"prompts": len(self.prompts.records), "dropped_empty_prompts": self.prompts.dropped_empty,
                         "dropped_duplicate_prompts": self.prompts.dropped_duplicate, "peak_memory_gb": {}}
        t0 = time.time()
        self.worked = False  # a rerun that only skips keeps the recorded time: the manifest stays put
        responses = self.stage_responses(k, stack_paths, stack_hash, summary)
        samples = self.stage_samples(k, stack_paths, responses, summary)
        trajectories = self.stage_critique(k, stack_paths, responses, summary)
        pairs = self.stage_judge(k, stack_paths, trajectories, samples, summary)
        if self.cfg.critique.steps:
            sft = critique.sft_records(trajectories)
        else:  # RLAIF only: fine-tune on the judged winners
            sft = [{"id": p["id"], "prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
        write_jsonl_atomic(rd / "trajectories.jsonl", trajectories)
        write_jsonl_atomic(rd / "sft.jsonl", sft)
        write_jsonl_atomic(rd / "pairs.jsonl", pairs)
        summary.update({"sft_records": len(sft), "pairs": len(pairs)})
        if not sft:
            raise UserError(f"round {k}: nothing to train on (critiques: {summary.get('critiques', 0)}, copied "
                            f"demonstrations: {summary.get('copied_demonstration', 0)}, judged pairs kept: "
                            f"{len(pairs)}); use more prompts, a larger model or a teacher critic (critic: teacher)")
        if self.cfg.judge.kind == "teacher" and not self.fits_with_teacher():
            self.drop_teacher()
        adapter = self.stage_train(k, stack_paths, stack_hash, summary)
        self.stage_eval(k, stack_paths, stack_hash, adapter, summary)
        before = ((self.store.read_manifest() or {}).get("rounds") or {}).get(str(k), {})
        summary["seconds"] = round(time.time() - t0, 1) if self.worked or "seconds" not in before else before["seconds"]
        if not self.worked:  # nothing ran: keep what the run that did the work measured
            for key in ("peak_memory_gb", "peak_memory_kind"):
                if key in before:
                    summary[key] = before[key]
        return dict(sorted(summary.items()))  # one key order whichever stages ran: a rerun rewrites the same bytes

    def stage_responses(self, k, stack_paths, stack_hash, summary) -> list[dict]:
        from .generation import GenerationStats, make_progress
        from .store import JsonlStage, content_hash

        cfg, rd = self.cfg, self.store.round_dir(k)
        inputs = content_hash({"model": cfg.model.model_dump(), "stack": stack_hash, "prompts": self.prompts_hash,
                               "generation": cfg.generation.model_dump(), "seed": cfg.seed, "round": k})
        stage = JsonlStage(rd / "responses.jsonl", inputs)
        self.responses_hash = inputs
        gstats = GenerationStats()
        if not stage.complete:
            self.worked = True
            recs, g = self.prompts.records, cfg.generation
            with _peak(summary, "responses"), make_progress(console=self.console) as progress:
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
        if self.rules is not None:
            texts = [r["response"] for r in responses if r["response"] is not None]
            summary["response_violation_rate"] = (sum(self.rules.violations(t) > 0 for t in texts) / len(texts)
                                                  if texts else None)
        return responses

    def stage_samples(self, k, stack_paths, responses, summary) -> dict[str, dict] | None:
        """N responses per prompt for best-of-N pairs: the initial response plus N-1 more samples."""
        from .generation import GenerationStats, make_progress
        from .store import JsonlStage, content_hash

        cfg, rd = self.cfg, self.store.round_dir(k)
        if cfg.pairs.builder == "revision":
            return None
        items = [r for r in responses if r["response"] is not None]
        extra = cfg.pairs.n_samples - 1
        stage = JsonlStage(rd / "samples.jsonl", content_hash({"responses": self.responses_hash, "n": cfg.pairs.n_samples}))
        if not stage.complete:
            self.worked = True
            g = cfg.generation
            convs = [[{"role": "user", "content": r["prompt"]}] for r in items for _ in range(extra)]
            with _peak(summary, "samples"), make_progress(console=self.console) as progress:
                for batch, outs in self.generator(k, stack_paths).iter(
                        convs, max_new_tokens=g.max_new_tokens, temperature=max(g.temperature, 0.7), top_p=g.top_p,
                        seed=cfg.seed + 7919 * k + 1, skip_batches=stage.done_batches, stats=GenerationStats(),
                        progress=progress, description=f"round {k} samples"):
                    stage.commit([{"id": items[i // extra]["id"], "sample": 1 + i % extra, "response": text,
                                   "batch": batch} for i, text in outs], batch)
            stage.finish()
        out = {r["id"]: {"prompt": r["prompt"], "responses": [r["response"]]} for r in items}
        for s in sorted(stage.records(), key=lambda s: (s["id"], s["sample"])):
            if s["response"] and s["response"].strip():
                out[s["id"]]["responses"].append(s["response"])
        summary["samples"] = sum(len(v["responses"]) for v in out.values())
        return out

    def stage_critique(self, k, stack_paths, responses, summary) -> list[dict]:
        from . import critique
        from .generation import GenerationStats, make_progress
        from .store import JsonlStage, content_hash, file_hash

        cfg, rd = self.cfg, self.store.round_dir(k)
        lstats = GenerationStats()
        step_records: list[list[dict]] = []
        upstream = content_hash([self.responses_hash, cfg.critic,
                                 cfg.judge.model if cfg.critic != "self" else None])
        current = {r["id"]: r for r in responses if r["response"] is not None}
        for s in range(1, cfg.critique.steps + 1):
            items = [{"id": i, "prompt": r["prompt"], "response": r["response"]} for i, r in current.items()]
            st = JsonlStage(rd / f"critique-{s}.jsonl", critique.step_inputs_hash(cfg, self.constitution, upstream, s))
            if not st.complete and items:
                self.worked = True
                with _peak(summary, f"critique-{s}"), make_progress(console=self.console) as progress:
                    critique.run_critique_step(self.critic_generator(k, stack_paths), self.constitution, items, s, st,
                                               cfg=cfg, seed=cfg.seed + k, progress=progress, stats=lstats)
            if not st.complete:
                st.finish(generation=lstats.as_dict())
            recs = st.records()
            step_records.append(recs)
            upstream = content_hash([upstream, file_hash(st.path)])
            current = {r["id"]: {"prompt": current[r["id"]]["prompt"], "response": r["revision"]}
                       for r in recs if r["status"] == "revise" and r["revision"]}
        self.critique_hash = upstream
        statuses = [s["status"] for recs in step_records for s in recs]
        summary.update({
            "critiques": len(statuses), "revisions": statuses.count("revise"),
            "no_change": statuses.count("no_change"), "copied_demonstration": statuses.count("copied_demonstration"),
            "copied_response": statuses.count("copied_response"), "empty": statuses.count("empty")})
        return critique.assemble(responses, step_records, self.constitution)

    def stage_judge(self, k, stack_paths, trajectories, samples, summary) -> list[dict]:
        """Judge the comparisons the pair builder needs (committed per batch), then build the pairs."""
        from itertools import combinations

        from . import critique
        from . import judge as J
        from .generation import make_progress
        from .store import JsonlStage, content_hash

        cfg, rd, j = self.cfg, self.store.round_dir(k), self.cfg.judge
        revision = critique.revision_pairs(trajectories) if cfg.pairs.builder in ("revision", "mix") else []
        comps: list[J.Comparison] = []
        principles = {p.name: p for p in self.constitution.principles}
        if cfg.pairs.judge_revisions:
            comps += [J.Comparison(p["id"], p["prompt"], p["chosen"], p["rejected"], p["principle"],
                                   principles[p["principle"]].judge if p["principle"] in principles
                                   else J.WIN_RATE_QUESTION, "revision") for p in revision]
        for pid, s in (samples or {}).items():
            principle = critique.pick_principle(self.constitution, cfg.seed + k, f"judge:{pid}", 0)
            texts = list(dict.fromkeys(t.strip() for t in s["responses"] if t and t.strip()))
            comps += [J.Comparison(pid, s["prompt"], a, b, principle.name, principle.judge)
                      for a, b in combinations(texts, 2)]
            s["responses"] = texts
        if not comps:
            summary["judge"] = None
            return revision
        inputs = content_hash({"comparisons": [c.__dict__ for c in comps], "judge": j.model_dump(),
                               "rules": self._judge_identity()["rules"], "policy": self.responses_hash})
        stage = JsonlStage(rd / "judgments.jsonl", inputs)
        # commit granularity: what one round trip computes (a server's concurrency window, or about one
        # forward batch of the local judge: two orders per comparison)
        per_batch = max(1, j.concurrency * 4 if j.kind == "api" else cfg.generation.max_batch_size // 2)
        batches = [comps[i:i + per_batch] for i in range(0, len(comps), per_batch)]
        if not stage.complete:
            self.worked = True
            judge, cot = self.judge(k, stack_paths)
            self_judge = None
            if j.cross_check_self and j.kind in ("teacher", "api"):
                if self.model is None and j.kind == "teacher" and not self.fits_with_teacher():
                    raise UserError(f"{cfg.source}: judge.cross_check_self needs the student and the teacher in "
                                    f"memory together, which vram_gb={cfg.vram_gb:g} does not allow; turn it off")
                self_judge = J.LogprobJudge(*self._policy_for_judging(k, stack_paths), kind="self",
                                            token_budget=cfg.generation.token_budget,
                                            max_batch_size=cfg.generation.max_batch_size)
            with _peak(summary, "judge"), make_progress(console=self.console) as progress:
                task = progress.add_task(f"round {k} judging ({j.kind})", total=len(comps), tokens_per_s=0.0)
                for b, chunk in enumerate(batches):
                    if b in stage.done_batches:
                        progress.advance(task, len(chunk))
                        continue
                    recs = J.judge_comparisons(judge, chunk, cot_generator=cot, cot_max_new_tokens=j.cot_max_new_tokens,
                                               seed=cfg.seed + k)
                    if self_judge is not None:
                        for r, s in zip(recs, J.judge_comparisons(self_judge, chunk)):
                            r["p_self"] = s["p_raw"]
                    stage.commit([{**r, "batch": b} for r in recs], b)
                    progress.advance(task, len(chunk))
            stage.finish()
        judgments = stage.records()
        stats = J.judgment_stats(judgments, confidence=j.confidence)
        if any("p_self" in r for r in judgments):
            stats["agreement_with_self"] = J.agreement(judgments, [{"p_raw": r.get("p_self")} for r in judgments])
        pairs, dropped = [], {}
        if cfg.pairs.judge_revisions:
            revision, dropped["revision"] = J.judged_revision_pairs(
                revision, [r for r in judgments if r["source"] == "revision"], confidence=j.confidence)
        pairs += revision
        if samples:
            bon, dropped["best_of_n"] = J.best_of_n_pairs(
                samples, [r for r in judgments if r["source"] == "best_of_n"], confidence=j.confidence)
            pairs += bon
        stats["dropped"] = dropped
        summary["judge"] = stats
        return pairs

    def _policy_for_judging(self, k, stack_paths):
        from . import models

        self.ensure_model(k, stack_paths)
        models.for_inference(self.model, self.backend)
        return self.model, self.tokenizer

    def stage_train(self, k, stack_paths, stack_hash, summary) -> Path:
        """SFT then DPO on the new adapter; resumes from checkpoints; returns the adapter folder."""
        import shutil

        from . import models, training
        from .store import atomic_write_json, content_hash, file_hash, read_json, read_jsonl, write_jsonl_atomic

        cfg, rd = self.cfg, self.store.round_dir(k)
        sft, pairs = read_jsonl(rd / "sft.jsonl"), read_jsonl(rd / "pairs.jsonl")
        from .data import mix_helpful

        sft = mix_helpful(sft, self.helpful, cfg.sft.helpful_fraction, cfg.seed + k)
        sft_cfg, dpo_cfg = self.planned(cfg.sft, "sft"), self.planned(cfg.dpo, "dpo")
        adapter = rd / "adapter"
        train_inputs = content_hash({"sft": file_hash(rd / "sft.jsonl"), "pairs": file_hash(rd / "pairs.jsonl"),
                                     "stack": stack_hash, "lora": cfg.lora.model_dump(), "sft_cfg": sft_cfg.model_dump(),
                                     "dpo_cfg": dpo_cfg.model_dump(), "model": cfg.model.model_dump(), "seed": cfg.seed,
                                     "helpful": content_hash([(r["id"], r["completion"]) for r in self.helpful])})
        done = rd / "train.json"
        # Under `accelerate launch -m lora_cai.train` every process trains its shard of each batch and only the
        # main one writes; the effective batch of the recipe is kept where grad_accum divides by the number of
        # processes (the input hash above uses the recipe's settings, so a later single-process rerun of the
        # recipe finds this training done).
        main, world = models.rank() == 0, models.world_size()
        if not (done.exists() and read_json(done).get("inputs") == train_inputs
                and (adapter / "adapter_model.safetensors").exists()):
            if self.stop_before_train:
                raise StopBeforeTrain(k)
            sft_cfg, dpo_cfg = _per_process(sft_cfg, world), _per_process(dpo_cfg, world)
            self.worked = True
            ckpt = rd / "checkpoints"
            if main:
                if (ckpt / "inputs.json").exists() and read_json(ckpt / "inputs.json").get("inputs") != train_inputs:
                    shutil.rmtree(ckpt)  # checkpoints of other inputs: stale
                atomic_write_json(ckpt / "inputs.json", {"inputs": train_inputs})
            models.barrier(world)
            self.ensure_model(k, stack_paths)
            models.for_training(self.model, self.backend)
            log_kw = {"report_to": list(cfg.report_to), "logging_dir": self.store.root / "logs" / f"round-{k}"}
            sft_done = ckpt / "sft-adapter"
            with _peak(summary, "train"):
                if (sft_done / "adapter_model.safetensors").exists():  # SFT finished before a crash: keep it
                    models.load_trainable_weights(self.model, sft_done, self.frozen)
                    sft_log = read_jsonl(ckpt / "sft_log.jsonl")
                else:
                    sft_log = training.train_sft(self.model, self.tokenizer, sft, sft_cfg, ckpt / "sft",
                                                 seed=cfg.seed + k, frozen=self.frozen, console=self.console,
                                                 desc=f"round {k} SFT", **log_kw)
                    if main:
                        training.write_log(ckpt / "sft_log.jsonl", sft_log)
                        models.save_adapter(self.model, sft_done)
                    models.barrier(world)
                dpo_log, ref = [], []
                if pairs:
                    dpo_log, ref = training.train_dpo(self.model, self.tokenizer, pairs, dpo_cfg,
                                                      ckpt / "dpo", seed=cfg.seed + k, frozen=self.frozen,
                                                      console=self.console, desc=f"round {k} DPO", **log_kw)
            if main:
                write_jsonl_atomic(rd / "ref_logps.jsonl", ref)
                training.write_log(rd / "sft_log.jsonl", sft_log)
                training.write_log(rd / "dpo_log.jsonl", dpo_log)
                models.save_adapter(self.model, adapter)
                atomic_write_json(done, {"inputs": train_inputs,
                                         "sft": training.summarize(sft_log), "dpo": training.summarize(dpo_log)})
            models.barrier(world)
        tr = read_json(done)
        if main:
            shutil.rmtree(rd / "checkpoints", ignore_errors=True)  # the adapter and train.json are committed
        summary["sft"], summary["dpo"] = tr["sft"], tr["dpo"]
        return adapter

    def planned(self, settings, stage: str):
        """On a GPU, the recipe's batch for `stage` shrunk (accumulation raised) to fit vram_gb by the planner."""
        import torch

        from .offline_models import resolve_model_path
        from .planner import fit_training_settings, load_model_config

        if not torch.cuda.is_available():
            return settings  # no VRAM budget to fit on a CPU
        name = self.cfg.model.name
        try:
            name = resolve_model_path(name)
            fitted = fit_training_settings(self.cfg, settings, stage, load_model_config(name))
        except UserError as e:
            self.console.log(f"planner: {e}; keeping the recipe's {stage} batch")
            return settings
        if fitted is not settings:
            self.console.log(f"planner: {stage} batch {settings.batch_size} x accumulation {settings.grad_accum} -> "
                             f"{fitted.batch_size} x {fitted.grad_accum} to fit vram_gb={self.cfg.vram_gb:g}")
        return fitted

    def stage_eval(self, k, stack_paths, stack_hash, adapter, summary) -> None:
        """The round's policy (base + adapters 1..k) on the held-out sets, against the previous round's answers."""
        from . import models
        from .store import atomic_write_json, content_hash, file_hash, read_json

        rd = self.store.round_dir(k)
        ev_path = rd / "eval.json"
        prev_path = self.store.root / "baseline-eval.json" if k == 1 else self.store.round_dir(k - 1) / "eval.json"
        previous = read_json(prev_path) if prev_path.exists() else None
        ev_inputs = content_hash({"adapter": file_hash(adapter / "adapter_model.safetensors"), "stack": stack_hash,
                                  "sets": self.eval_sets, "judge": self._judge_identity(), "eval": self._eval_settings(),
                                  "previous": content_hash(previous["samples"]) if previous else None})
        if self.eval_sets and not (ev_path.exists() and read_json(ev_path).get("inputs") == ev_inputs):
            self.worked = True
            if self.model is None:
                self.ensure_model(k, stack_paths)
                self.model.load_adapter(str(adapter), adapter_name="trained", is_trainable=False)
                models.set_active(self.model, self.frozen + ["trained"])
            with _peak(summary, "eval"):
                result = self._evaluate(k, stack_paths, previous)
            atomic_write_json(ev_path, {"inputs": ev_inputs, **result})
        if ev_path.exists():
            ev = read_json(ev_path)
            summary["eval"] = {k2: ev.get(k2) for k2 in ("harmful_compliance", "over_refusal", "n_harmful", "n_benign",
                                                         "detector", "heuristic_disagreement", "violation_rate",
                                                         "capability", "win_rate") if k2 in ev}

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
        if s.get("samples"):
            t.add_row("samples (best-of-N)", str(s["samples"]))
        if s.get("judge"):
            jd = s["judge"]
            pc = jd.get("position_consistency")
            t.add_row(f"judged comparisons ({self.cfg.judge.kind})",
                      f"{jd['comparisons']} ({jd['confident']} confident, {jd['garbled']} garbled"
                      + (f", {100 * pc:.0f}% position-consistent" if pc is not None else "") + ")")
        t.add_row("SFT records / pairs", f"{s['sft_records']} / {s['pairs']}")
        t.add_row("SFT loss", _fmt_span(s["sft"], "loss"))
        t.add_row("DPO loss", _fmt_span(s["dpo"], "loss"))
        t.add_row("DPO reward margin", _fmt_span(s["dpo"], "rewards/margins"))
        if "eval" in s:
            t.add_row("harmful compliance", _pct(s["eval"]["harmful_compliance"]))
            t.add_row("over-refusal", _pct(s["eval"]["over_refusal"]))
            if s["eval"].get("violation_rate") is not None:
                t.add_row("rule violations (held out)", _pct(s["eval"]["violation_rate"]))
            if s["eval"].get("win_rate"):
                t.add_row("win rate vs previous round", _pct(s["eval"]["win_rate"]["win_rate"]))
            if s["eval"].get("capability"):
                t.add_row("capability probe accuracy", _pct(s["eval"]["capability"]["accuracy"]))
        if s.get("quality") is not None:
            t.add_row("quality score", f"{s['quality']:.3f}")
        t.add_row("time", f"{s['seconds']} s")
        self.console.print(t)

    def print_before_after(self, m: dict) -> None:
        from .store import read_json

        base_path = self.store.root / "baseline-eval.json"
        stacked = [int(s.split("/")[0].split("-")[1]) for s in m.get("stack", [])]
        last = m["rounds"].get(str(stacked[-1]), {}).get("eval") if stacked else None
        if not base_path.exists() or not last:
            return
        base = read_json(base_path)
        self.console.print(
            f"[bold]before -> after[/]: harmful compliance {_pct(base['harmful_compliance'])} -> "
            f"{_pct(last['harmful_compliance'])}, over-refusal {_pct(base['over_refusal'])} -> "
            f"{_pct(last['over_refusal'])} (held out: {last['n_harmful']} harmful + {last['n_benign']} benign prompts, "
            f"{last['detector']}; policy = base + rounds 1..{stacked[-1]})")


@contextlib.contextmanager
def _peak(summary: dict, stage: str):
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


def _per_process(settings, world: int):
    """The recipe's effective batch split over `world` processes (grad_accum divided where it divides)."""
    if world > 1 and settings.grad_accum % world == 0:
        return settings.model_copy(update={"grad_accum": settings.grad_accum // world})
    return settings


def _file_or_none(path: str) -> str | None:
    from .store import file_hash

    return file_hash(path) if Path(path).is_file() else None


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


def _nearly_full(path: str) -> bool:
    """Less than 1 MiB free on the filesystem of the run directory."""
    import shutil

    try:
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False


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
    cfg = None
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
        run.stop_before_train = args.stop_before == "train"
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
        if full is None and cfg is not None and _nearly_full(cfg.output_dir):
            full = ""  # libraries that hit ENOSPC mid-file do not always say so (torch.save: "unexpected pos")
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
