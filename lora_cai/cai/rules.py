"""Label rules: regex and detector rules that judge a response without a model, from a rules file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from lora_cai.errors import UserError, problems

# --------------------------------------------------------------------------------------------------
# The rule judge
# --------------------------------------------------------------------------------------------------

@dataclass
class Rule:
    """One rule: a regular expression (`pattern`) or the evaluation's refusal detector (`detector: refusal`) that
    a text must not match (`forbid`) or must match (`require`), for every prompt or only for prompts whose label
    column has one of the `when` values."""

    name: str
    pattern: re.Pattern | None
    kind: str                       # forbid | require
    when: tuple[str, frozenset[str]] | None = None  # (label column, the labels the rule applies to)
    detector: str | None = None     # "refusal": evaluation.is_refusal (a refusal followed by compliance is compliance)
    principle: str | None = None    # the constitution's principle the rule enforces (per-principle violation rates)
    enforce: bool = True            # False: measured (its principle's violation rate), never judging a pair

    def applies(self, labels: dict | None) -> bool:
        return self.when is None or (labels or {}).get(self.when[0]) in self.when[1]

    def violations(self, text: str, prompt: str | None = None) -> int:
        if self.detector == "refusal":
            from lora_cai.cai.refusal import is_refusal

            hit = int(is_refusal(text, prompt))
            return hit if self.kind == "forbid" else 1 - hit
        if self.kind == "forbid":
            return len(self.pattern.findall(text))
        return int(not self.pattern.search(text))


DETECTORS = ("refusal",)


class RuleJudge:
    """Rules: a text's violations are its forbidden matches plus its missing required ones, counting only the
    rules that apply to the prompt's label (`when: {kind: harmful}`). A rule may name the principle it enforces
    (`principle:`), which gives that principle a violation rate (`principle_violations`); a rule with `enforce:
    false` is only measured: it counts in its principle's rate and in no judgment, so a run can watch a
    principle no rule teaches."""

    kind = "rule"

    def __init__(self, rules: list[Rule]):
        self.rules = rules

    @property
    def columns(self) -> set[str]:
        """The label columns the rules' `when` conditions read."""
        return {r.when[0] for r in self.rules if r.when}

    @classmethod
    def from_file(cls, path: str | Path) -> "RuleJudge":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: judge.rules file not found (give a YAML list of {{name, pattern, kind}})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read judge.rules ({e})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}: malformed YAML{line} in judge.rules") from None
        if isinstance(data, dict):
            data = data.get("rules")
        if not isinstance(data, list) or not data:
            raise UserError(f"{path}: judge.rules must be a non-empty list of {{name, pattern, kind: forbid|require}}")
        rules, found = [], []
        for n, item in enumerate(data, 1):
            rule = _rule(n, item, found)
            if rule is not None:
                rules.append(rule)
        if not found and not any(r.enforce for r in rules):
            found.append("every rule has enforce: false, so nothing would judge; enforce at least one")
        if found:
            raise UserError(f"{path}: {problems(found)}")
        return cls(rules)

    @property
    def principles(self) -> list[str]:
        """The principles the rules name, in the file's order."""
        return list(dict.fromkeys(r.principle for r in self.rules if r.principle))

    def names(self, principle: str) -> bool:
        return any(r.principle == principle for r in self.rules)

    def violations(self, text: str | None, labels: dict | None = None, prompt: str | None = None, *,
                   principle: str | None = None) -> int:
        """The enforced rules' violations (with `principle`: those of the rules naming it, enforced or not).
        `prompt` lets the refusal detector see a pivot back to the request; patterns ignore it."""
        text = text or ""
        chosen = [r for r in self.rules if r.principle == principle] if principle else \
            [r for r in self.rules if r.enforce]
        return sum(r.violations(text, prompt) for r in chosen if r.applies(labels))

    def principle_violations(self, text: str | None, labels: dict | None = None,
                             prompt: str | None = None) -> dict[str, bool]:
        """{principle: whether `text` violates one of the rules naming it} over the principles with a rule that
        applies to this prompt's label."""
        out: dict[str, bool] = {}
        for r in self.rules:
            if r.principle and r.applies(labels):
                out[r.principle] = out.get(r.principle, False) or r.violations(text or "", prompt) > 0
        return out

    def compare(self, a: str, b: str, labels: dict | None = None, prompt: str | None = None, *,
                principle: str | None = None) -> float:
        va = self.violations(a, labels, prompt, principle=principle)
        vb = self.violations(b, labels, prompt, principle=principle)
        return 1.0 if va < vb else 0.0 if va > vb else 0.5


def _rule(n: int, item, found: list[str]) -> Rule | None:
    """Rule n of a rule file, or None with what is wrong with it appended to `found`."""
    if not isinstance(item, dict):
        found.append(f"rule {n} must be a mapping with name, pattern (or detector) and kind")
        return None
    before = len(found)
    kind = item.get("kind", "forbid")
    if kind not in ("forbid", "require"):
        found.append(f"rule {n}: kind must be 'forbid' or 'require', got {kind!r}")
    detector, pattern = item.get("detector"), None
    if detector is not None:
        if detector not in DETECTORS:
            found.append(f"rule {n}: detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
        if "pattern" in item:
            found.append(f"rule {n}: give a pattern or a detector, not both")
    elif not isinstance(item.get("pattern"), str) or not item["pattern"]:
        found.append(f"rule {n} needs a non-empty 'pattern' (a regular expression) or a 'detector'")
    else:
        try:
            pattern = re.compile(item["pattern"], re.IGNORECASE if item.get("ignore_case", True) else 0)
        except re.error as e:
            found.append(f"rule {n}: invalid regular expression ({e})")
    when = item.get("when")
    if when is not None:
        values = next(iter(when.values()), None) if isinstance(when, dict) and len(when) == 1 else None
        values = [values] if isinstance(values, str) else values
        if not (isinstance(values, list) and values and all(isinstance(v, str) and v for v in values)):
            found.append(f"rule {n}: when must map one label column to a label or a list of labels, e.g. "
                         f"when: {{kind: harmful}}")
        else:
            when = (str(next(iter(when))), frozenset(values))
    principle = item.get("principle")
    if principle is not None and not (isinstance(principle, str) and principle.strip()):
        found.append(f"rule {n}: principle must name one of the constitution's principles, got {principle!r}")
    enforce = item.get("enforce", True)
    if not isinstance(enforce, bool):
        found.append(f"rule {n}: enforce must be true or false, got {enforce!r}")
    if enforce is False and principle is None:
        found.append(f"rule {n}: enforce: false measures a principle's violations; name it with principle:")
    if len(found) > before:
        return None
    return Rule(str(item.get("name", f"rule-{n}")), pattern, kind, when, detector,
                principle.strip() if principle else None, enforce)
