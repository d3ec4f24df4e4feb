"""The recipe's data, loaded and validated once before any model loads: prompts, held-out sets, helpful data,
constitution, rule file, capability items and canaries, with the content hash of each (a stage's data inputs)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError


@dataclass
class RunData:
    constitution: object                      # constitution.Constitution
    prompts: object                           # data.PromptSet
    eval_sets: dict[str, list[dict]]          # {"harmful": [...], "benign": [...]} (empty when eval_limit is 0)
    helpful: list[dict]                       # SFT records mixed in (empty when none)
    rules: object | None                      # judge.RuleJudge for `judge.kind: rule`
    rules_text: str | None                    # the rule file's text (hashed: an edited file reruns its readers)
    capability: list[dict]                    # the capability probe's items (empty when skipped)
    canaries: list[dict]                      # the critic check's canary answers
    hashes: dict[str, str] = field(default_factory=dict)


def _src(cfg, src: str) -> str:
    return src if src.startswith("builtin:") or not Path(cfg.resolve(src)).exists() else cfg.resolve(src)


def load_constitution_of(cfg):
    """The recipe's constitution (built-in name or file beside the recipe); errors name the recipe."""
    from .constitution import load_constitution

    name = cfg.constitution
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        name = cfg.resolve(name)
    try:
        return load_constitution(name)
    except UserError as e:
        raise UserError(f"{cfg.source}: {e}") from None


def load_run_data(cfg) -> RunData:
    """Everything the stages read besides the recipe's settings, read once; a bad file fails now, not after hours."""
    from .data import load_helpful, load_prompts
    from .evaluation import load_canaries, load_capability
    from .store import content_hash

    constitution = load_constitution_of(cfg)
    d = cfg.data
    prompts = load_prompts(_src(cfg, d.prompts), column=d.prompt_column, split=d.split, limit=d.limit)
    eval_sets = {}
    if d.eval_limit:
        for key, src in (("harmful", d.eval_harmful), ("benign", d.eval_benign)):
            eval_sets[key] = load_prompts(_src(cfg, src), limit=d.eval_limit, where=f"data.eval_{key}").records
    sft = cfg.sft
    helpful = load_helpful(_src(cfg, sft.helpful_data), prompt_column=sft.helpful_prompt_column,
                           response_column=sft.helpful_response_column, split=sft.helpful_split,
                           exclude={r["id"] for v in eval_sets.values() for r in v}) \
        if sft.helpful_data and sft.helpful_fraction else []
    rules = rules_text = None
    if cfg.judge.kind == "rule":
        from .judge import RuleJudge

        path = cfg.resolve(cfg.judge.rules)
        try:
            rules = RuleJudge.from_file(path)
        except UserError as e:
            raise UserError(f"{cfg.source}: judge.rules: {e}") from None
        rules_text = Path(path).read_text(encoding="utf-8")
    e = cfg.eval
    capability = []
    if eval_sets and e.capability and e.capability_limit:
        capability = load_capability(e.capability if e.capability.startswith("builtin:") else cfg.resolve(e.capability),
                                     e.capability_limit)
    canaries = load_canaries() if e.critic_check and cfg.critique.steps else []
    data = RunData(constitution, prompts, eval_sets, helpful, rules, rules_text, capability, canaries)
    data.hashes = {"prompts": content_hash(prompts.records), "eval_sets": content_hash(eval_sets),
                   "helpful": content_hash(helpful), "constitution": constitution.hash(),
                   "rules": content_hash(rules_text), "capability": content_hash(capability),
                   "canaries": content_hash(canaries)}
    return data
