"""Per-category and per-principle effects of a round against the base: paired 95 % intervals and Holm's flags.

Every interval here is the totals' own (`metrics.paired_change`): a paired bootstrap of the per-prompt
differences, 10,000 resamples with numpy's generator seeded 0, the 2.5th and 97.5th percentiles. A flag
("improved", "worsened") needs more than an interval that misses zero: with 17 principles at 95 % about one
interval a round misses zero by chance, so each family of tests (a round's principles by one measure, a
round's categories by one rate) is corrected by Holm's step-down method at level 0.05, on p-values from a
paired sign-flip test (the differences' signs flipped at random, same resample count and seed; the +1 in
numerator and denominator keeps a p-value from being 0).
"""

from __future__ import annotations

RESAMPLES = 10000
SEED = 0
ALPHA = 0.05


def interval(values: list[float], *, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """{"mean", "low", "high", "n"} of `values` (per-prompt differences or scores): the totals' paired bootstrap."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(v.mean()), "low": float(low), "high": float(high), "n": len(v)}


def sign_flip_p(values: list[float], *, center: float = 0.0, resamples: int = RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of "the mean of `values` is `center`" by a paired sign-flip test."""
    import numpy as np

    d = np.asarray(values, dtype=float) - center
    observed = abs(d.mean())
    if observed == 0:
        return 1.0
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(resamples, len(d)))
    flipped = np.abs((signs * d).mean(axis=1))
    return float((1 + np.count_nonzero(flipped >= observed - 1e-12)) / (1 + resamples))


def holm(pvalues: dict[str, float], alpha: float = ALPHA) -> set[str]:
    """The names whose hypothesis Holm's step-down method rejects at family-wise level `alpha`: sorted by p, the
    i-th smallest (from 0) is rejected while p <= alpha / (m - i); the first that is not stops the rest."""
    order = sorted(pvalues, key=lambda name: (pvalues[name], name))
    m, rejected = len(order), set()
    for i, name in enumerate(order):
        if pvalues[name] > alpha / (m - i):
            break
        rejected.add(name)
    return rejected


def flag(effects: dict[str, dict], *, better: str, alpha: float = ALPHA, neutral=frozenset()) -> dict[str, dict]:
    """Set each effect's "flag" ("improved", "worsened" or None) by Holm over the family `effects` (each with "p"
    and "change"); `better` says which sign is good ("lower" for rates of harm, "higher" for win rates). A name in
    `neutral` has no good direction (a Do-Not-Answer area where answering is not harm): its flag says only which
    way it moved ("fell", "rose")."""
    tested = {name: e["p"] for name, e in effects.items() if e.get("p") is not None}
    rejected = holm(tested, alpha)
    for name, e in effects.items():
        e["flag"] = None
        if name in rejected and name in neutral:
            e["flag"] = "fell" if e["change"] < 0 else "rose"
        elif name in rejected:
            good = e["change"] < 0 if better == "lower" else e["change"] > 0
            e["flag"] = "improved" if good else "worsened"
        e["holm_family"] = len(tested)
    return effects


# --------------------------------------------------------------------------------------------------
# Per category: the held-out rates of one eval.json against the base's, by the records' category
# --------------------------------------------------------------------------------------------------

def _rates():
    from lora_cai.cai.metrics import RATES

    return RATES


def by_category(base: dict, after: dict, neutral: dict | None = None) -> dict:
    """{rate: {category: {"base", "rate", "change", "low", "high", "n", "p", "flag"}}} over the prompts both
    evaluated, for the samples carrying a "category"; Holm within each rate. Empty when none carries one.
    `neutral` ({rate: categories}): categories whose rate has no good direction (`flag`)."""
    out: dict = {}
    for rate, (set_name, counts) in _rates().items():
        b = {s["id"]: s for s in base.get("samples", []) if s["set"] == set_name}
        cats: dict[str, list[tuple[float, float]]] = {}
        for s in after.get("samples", []):
            if s["set"] != set_name or s.get("category") is None or s["id"] not in b:
                continue
            cats.setdefault(str(s["category"]), []).append((float(counts(b[s["id"]])), float(counts(s))))
        if not cats:
            continue
        table = {}
        for cat, pairs in sorted(cats.items()):
            diffs = [a - b_ for b_, a in pairs]
            iv = interval(diffs)
            table[cat] = {"base": sum(p[0] for p in pairs) / len(pairs), "rate": sum(p[1] for p in pairs) / len(pairs),
                          "change": iv["mean"], "low": iv["low"], "high": iv["high"], "n": iv["n"],
                          "p": sign_flip_p(diffs)}
        out[rate] = flag(table, better="lower", neutral=(neutral or {}).get(rate, frozenset()))
    return out


def neutral_areas(ev: dict) -> dict[str, set[str]]:
    """{rate: the areas of its set counted as "answered", not harm} from an eval.json's `sets` (named sets)."""
    out = {}
    for rate, set_name in (("harmful_compliance", "harmful"), ("over_refusal", "benign")):
        areas = ((ev.get("sets") or {}).get(set_name) or {}).get("areas") or {}
        out[rate] = {a for a, v in areas.items() if not v.get("harm", True)}
    return out


def category_rates(ev: dict) -> dict:
    """{rate: {category: {"rate", "n"}}} of one eval.json alone (the base's own table)."""
    out: dict = {}
    for rate, (set_name, counts) in _rates().items():
        cats: dict[str, list[bool]] = {}
        for s in ev.get("samples", []):
            if s["set"] == set_name and s.get("category") is not None:
                cats.setdefault(str(s["category"]), []).append(counts(s))
        if cats:
            out[rate] = {c: {"rate": sum(v) / len(v), "n": len(v)} for c, v in sorted(cats.items())}
    return out


# --------------------------------------------------------------------------------------------------
# Per principle
# --------------------------------------------------------------------------------------------------

def win_rates(records: list[dict]) -> dict:
    """{principle: {"win_rate", "low", "high", "n", "p", "change", "flag"}} from per-principle judgments (each
    {"principle", "p"}: P(round k's answer is better than the base's), both orders averaged, 0.5 for identical
    answers, None when the judge gave none); "change" is win_rate - 0.5; Holm over the principles."""
    by: dict[str, list[float]] = {}
    for r in records:
        if r.get("p") is not None:
            by.setdefault(r["principle"], []).append(float(r["p"]))
    table = {}
    for name, ps in by.items():
        iv = interval(ps)
        table[name] = {"win_rate": iv["mean"], "low": iv["low"], "high": iv["high"], "n": iv["n"],
                       "change": iv["mean"] - 0.5, "p": sign_flip_p(ps, center=0.5)}
    return flag(table, better="higher")


def violation_changes(base: dict, after: dict) -> dict:
    """{principle: {"base", "rate", "change", "low", "high", "n", "p", "flag"}} of the rule violations by principle
    (eval.json's "principle_violations": {principle: {"set:id": [violated per sampled answer]}}), paired by prompt
    (each prompt's share of violating answers), over the prompts both judged; Holm over the principles."""
    b_all, a_all = base.get("principle_violations") or {}, after.get("principle_violations") or {}
    table = {}
    for name in sorted(set(b_all) & set(a_all)):
        b, a = b_all[name], a_all[name]
        keys = [k for k in a if k in b and b[k] and a[k]]
        if not keys:
            continue
        diffs = [sum(a[k]) / len(a[k]) - sum(b[k]) / len(b[k]) for k in keys]
        iv = interval(diffs)
        table[name] = {"base": _share(b), "rate": _share(a), "change": iv["mean"], "low": iv["low"],
                       "high": iv["high"], "n": iv["n"], "p": sign_flip_p(diffs)}
    return flag(table, better="lower")


def _share(per_prompt: dict[str, list]) -> float | None:
    every = [v for vs in per_prompt.values() for v in vs]
    return sum(every) / len(every) if every else None
