"""The recipe's data, loaded and validated once before any model loads: prompts, held-out sets, helpful data,
constitution, rule file, capability items and canaries, with the content hash of each (a stage's data inputs)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lora_cai.errors import UserError


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
    eval_info: dict[str, dict] = field(default_factory=dict)  # per held-out set: what was read (PromptSet.extra)


def _src(cfg, src: str) -> str:
    return src if src.startswith("builtin:") or not Path(cfg.resolve(src)).exists() else cfg.resolve(src)


def load_constitution_of(cfg):
    """The recipe's constitution (built-in name or file beside the recipe); errors name the recipe."""
    from lora_cai.cai.constitution import load_constitution

    name = cfg.constitution
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        name = cfg.resolve(name)
    try:
        return load_constitution(name)
    except UserError as e:
        raise UserError(f"{cfg.source}: {e}") from None


def load_run_data(cfg) -> RunData:
    """Everything the stages read besides the recipe's settings, read once; a bad file fails now, not after hours."""
    from lora_cai.data.sources import is_hub, load_helpful, load_prompts
    from lora_cai.cai.refusal import REFUSAL_DETECTOR_VERSION
    from lora_cai.data.heldout import load_canaries, load_capability
    from lora_cai.core.store import content_hash

    constitution = load_constitution_of(cfg)
    d = cfg.data
    prompts = load_prompts(_src(cfg, d.prompts), column=d.prompt_column, split=d.split, limit=d.limit)
    eval_sets = {}
    if d.dev:
        prompts, dev = dev_split(prompts, d.label_column, d.dev, cfg.seed)
        eval_sets = dev if d.eval_limit else {}
    eval_info: dict[str, dict] = {}
    if not d.dev and d.eval_limit:
        for key, src in (("harmful", d.eval_harmful), ("benign", d.eval_benign)):
            src = _src(cfg, src)
            hub = {"column": d.eval_column, "split": d.eval_split, "subset": d.eval_subset} if is_hub(src) else {}
            held = load_prompts(src, **hub, limit=d.eval_limit, seed=d.eval_seed, where=f"data.eval_{key}",
                                category_column=d.category_column, column_key="data.eval_column")
            if "set" in held.extra and d.label_column:  # a named set's prompts take the label of the set they fill
                held.records = [{**r, d.label_column: r.get(d.label_column, key)} for r in held.records]
            eval_sets[key], eval_info[key] = held.records, held.extra
    sft = cfg.sft
    helpful = load_helpful(_src(cfg, sft.helpful_data), prompt_column=sft.helpful_prompt_column,
                           response_column=sft.helpful_response_column, split=sft.helpful_split,
                           exclude={r["id"] for v in eval_sets.values() for r in v}) \
        if sft.helpful_data and sft.helpful_fraction else []
    rules = rules_text = None
    if cfg.judge.kind == "rule":
        from lora_cai.cai.rules import RuleJudge

        try:
            path = cfg.rules_file()
            rules = RuleJudge.from_file(path)
            for name in rules.principles:  # a rule's principle is one of the constitution's
                constitution.principle(name)
        except UserError as e:
            raise UserError(f"{cfg.source}: judge.rules: {e}") from None
        rules_text = Path(path).read_text(encoding="utf-8")
        check_rule_labels(cfg, rules, prompts.records, eval_sets)
    e = cfg.eval
    capability = []
    if eval_sets and e.capability and e.capability_limit:
        capability = load_capability(e.capability if e.capability.startswith("builtin:") else cfg.resolve(e.capability),
                                     e.capability_limit)
    canaries = load_canaries() if e.critic_check and cfg.critique.steps else []
    data = RunData(constitution, prompts, eval_sets, helpful, rules, rules_text, capability, canaries,
                   eval_info=eval_info)
    data.hashes = {"prompts": content_hash(prompts.records), "eval_sets": content_hash(eval_sets),
                   "eval_sources": content_hash({key: {k: v for k, v in i.items() if k in SOURCE_KEYS}
                                                 for key, i in eval_info.items()}),
                   "helpful": content_hash(helpful), "constitution": constitution.hash(),
                   "rules": content_hash(rules_text), "capability": content_hash(capability),
                   "canaries": content_hash(canaries), "refusal_detector": content_hash(REFUSAL_DETECTOR_VERSION)}
    return data


LABELS = ("harmful", "benign")
# What names a held-out set as an input of the evaluations: where it came from, a named set's package version, and
# which prompts were drawn (`data.sources.subset_hash`). The words describing a set's rates are not among them.
SOURCE_KEYS = ("source", "set", "package", "version", "total", "n", "seed", "subset")


def dev_split(prompts, column: str, n: int, seed: int):
    """(the training prompts without the dev set, {"harmful": [...], "benign": [...]}): `n` prompts of each label,
    drawn by a seeded shuffle of the prompt ids, so the same recipe carves the same dev set."""
    import hashlib
    from dataclasses import replace

    records = prompts.records
    missing = sorted({str(r.get(column)) for r in records} - set(LABELS))
    if any(column not in r for r in records) or missing:
        raise UserError(f"data.dev: every training prompt needs a '{column}' of {' or '.join(LABELS)} to split a dev "
                        f"set by (data.label_column); {prompts.source} has "
                        + (f"labels {', '.join(missing)}" if missing else f"prompts without '{column}'"))
    order = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    dev = {label: [r for r in order if r[column] == label][:n] for label in LABELS}
    short = [label for label in LABELS if len(dev[label]) < n]
    if short:
        raise UserError(f"data.dev: {prompts.source} has fewer than {n} '{short[0]}' prompts to hold out; lower data.dev")
    held = {r["id"] for v in dev.values() for r in v}
    rest = [r for r in records if r["id"] not in held]
    if not rest:
        raise UserError(f"data.dev: holding out {n} prompts of each label leaves no training prompt; lower data.dev")
    return replace(prompts, records=rest), dev


def check_rule_labels(cfg, rules, prompts: list[dict], eval_sets: dict) -> None:
    """Rules that apply to one label read the recipe's label column, and every prompt they judge must carry it:
    a `when` that could never match would silently judge nothing."""
    where = f"{cfg.source}: judge.rules"
    for column in sorted(rules.columns):
        if column != cfg.data.label_column:
            raise UserError(f"{where}: a rule's `when` names column '{column}' but data.label_column is "
                            f"{cfg.data.label_column!r}; set data.label_column: {column}")
        for name, records in (("data.prompts", prompts), *((f"data.eval_{k}", v) for k, v in eval_sets.items())):
            lacking = sum(column not in r for r in records)
            if lacking:
                raise UserError(f"{where}: a rule applies only when '{column}' matches, but {lacking} prompt(s) of "
                                f"{name} have no '{column}' column; add it to the file or drop the rule's `when`")


def labels_of(record: dict, column: str | None) -> dict | None:
    """A prompt's label as rules read it ({column: value}), or None without a label column."""
    return {column: record.get(column)} if column else None
