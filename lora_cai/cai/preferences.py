"""From judgments to training data: judgment statistics, agreement, and the pairs best-of-N and revisions give."""

from __future__ import annotations


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def judgment_stats(records: list[dict], *, confidence: float) -> dict:
    """Position consistency, label histogram, per-principle counts, garbled answers."""
    scored = [r for r in records if r["p_raw"] is not None]
    bins = [0] * 10
    for r in scored:
        bins[min(int(r["p_raw"] * 10), 9)] += 1
    per_principle: dict[str, dict] = {}
    for r in records:
        d = per_principle.setdefault(r["principle"] or "-", {"judged": 0, "confident": 0})
        d["judged"] += 1
        d["confident"] += int(r["p_raw"] is not None and max(r["p_raw"], 1 - r["p_raw"]) >= confidence)
    model_judged = [r for r in scored if r["judge"] != "rule"]
    return {
        "comparisons": len(records), "garbled": len(records) - len(scored),
        "position_consistency": (sum(bool(r["consistent"]) for r in model_judged) / len(model_judged)
                                 if model_judged else None),
        "confident": sum(max(r["p_raw"], 1 - r["p_raw"]) >= confidence for r in scored),
        "label_histogram": bins, "per_principle": per_principle,
    }


def agreement(a: list[dict], b: list[dict]) -> float | None:
    """How often two judges pick the same winner on the same comparisons (ties count as disagreement)."""
    both = [(x["p_raw"], y["p_raw"]) for x, y in zip(a, b) if x["p_raw"] is not None and y["p_raw"] is not None]
    if not both:
        return None
    return sum((x > 0.5 and y > 0.5) or (x < 0.5 and y < 0.5) for x, y in both) / len(both)


# --------------------------------------------------------------------------------------------------
# Pairs from judgments
# --------------------------------------------------------------------------------------------------

def best_of_n_pairs(samples: dict[str, dict], judgments: list[dict], *, confidence: float) -> tuple[list[dict], dict]:
    """Best vs worst sample per prompt by total soft wins; kept when the judge preferred best over worst
    with at least `confidence`. `samples`: id -> {prompt, responses}. Returns (pairs, drop counts)."""
    by_id: dict[str, list[dict]] = {}
    for j in judgments:
        by_id.setdefault(j["id"], []).append(j)
    pairs, dropped = [], {"garbled": 0, "tie": 0, "low_confidence": 0, "identical": 0}
    for pid, s in samples.items():
        texts = s["responses"]
        js = [j for j in by_id.get(pid, []) if j["p_raw"] is not None]
        if not js:
            dropped["identical" if pid not in by_id else "garbled"] += 1
            continue
        wins: dict[str, float] = {}
        for j in js:
            wins[j["a"]] = wins.get(j["a"], 0.0) + j["p_raw"]
            wins[j["b"]] = wins.get(j["b"], 0.0) + 1 - j["p_raw"]
        order = [t for t in dict.fromkeys(texts) if t in wins]
        best = max(order, key=lambda t: wins[t])
        worst = min(order, key=lambda t: wins[t])
        j = next((j for j in js if {j["a"], j["b"]} == {best, worst}), None)
        if best == worst or j is None:
            dropped["tie"] += 1
            continue
        p_raw = j["p_raw"] if j["a"] == best else 1 - j["p_raw"]
        p = j["p_first"] if j["a"] == best else 1 - j["p_first"]
        if p_raw == 0.5:
            dropped["tie"] += 1
        elif p_raw < confidence:
            dropped["low_confidence"] += 1
        else:
            pairs.append({"id": pid, "prompt": s["prompt"], "chosen": best, "rejected": worst, "source": "best_of_n",
                          "principle": j["principle"], "p_chosen": p, "p_raw": p_raw, "judge": j["judge"]})
    return pairs, dropped


def judged_revision_pairs(pairs: list[dict], judgments: list[dict], *, confidence: float) -> tuple[list[dict], dict]:
    """Revision pairs relabelled by the judge (a = chosen = revision); kept at `confidence` or above."""
    by_id = {j["id"]: j for j in judgments}
    kept, dropped = [], {"garbled": 0, "tie": 0, "low_confidence": 0}
    for p in pairs:
        j = by_id.get(p["id"])
        if j is None or j["p_raw"] is None:
            dropped["garbled"] += 1
        elif j["p_raw"] == 0.5:
            dropped["tie"] += 1
        elif j["p_raw"] < confidence:
            dropped["low_confidence"] += 1
        else:
            kept.append({**p, "p_chosen": j["p_first"], "p_raw": j["p_raw"], "judge": j["judge"],
                         "principle": j["principle"] or p["principle"]})
    return kept, dropped
