"""The report's tables: one row per round for counts, metrics, judges, memory, time and principles."""

from __future__ import annotations

import difflib
from typing import Any

from lora_cai.cai.metrics import quality_score  # the run's own formula; evaluation.py imports no torch at module level
from lora_cai.core.layout import round_of
from lora_cai.stages.registry import ROUND_STAGE_NAMES as ROUND_STAGES

STATUSES = ("revise", "no_change", "copied_demonstration", "copied_response", "empty", "too_long", "failed")
NA = "n/a"
SOURCES = ("revision", "best_of_n")
DROP_REASONS = ("garbled", "tie", "low_confidence", "identical")
SUMMARY_HEADERS = ["round", "status", "prompts", "responses", "critiques", "revisions", "SFT records", "pairs",
                   "SFT loss (first → last)", "preference loss (first → last)", "preference margin (first → last)", "seconds"]
METRIC_HEADERS = ["round", "status", "quality", "harmful compliance", "over-refusal", "violation rate",
                  "response violation rate", "win rate vs previous", "wins / losses / ties / garbled",
                  "capability accuracy", "capability Δ vs base", "detector", "heuristic disagreement"]
JUDGE_HEADERS = ["round", "judge", "samples", "comparisons", "confident", "garbled", "position consistency",
                 "agreement with self", "pairs (revision)", "pairs (best_of_n)", "pairs dropped"]
DROP_HEADERS = ["round", "source", "kept", "garbled", "tie", "low confidence", "identical"]
HIST_HEADERS = ["round"] + [f"{i / 10:.1f}–{(i + 1) / 10:.1f}" for i in range(10)]
PRINCIPLE_HEADERS = ["principle", "sampled", "no change", "no-change rate", "revisions", "mean change",
                     "pairs (revision)", "pairs (best_of_n)", "judged", "confident", "confident / judged"]


# ------------------------------------------------------------------ numbers
def _number(v):
    """v when it is a real number (not a bool), else None."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    return int(v) if isinstance(v, str) and v.isdigit() else None


def _count_or(summary: dict, key: str, fallback):
    """The manifest's count when it has one, else the count from the round's files (None: unknown)."""
    v = summary.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v
    return fallback


def _training(r: dict, which: str) -> dict:
    s = r["summary"].get(which)
    if isinstance(s, dict):
        return s
    t = (r["train"] or {}).get(which)
    return t if isinstance(t, dict) else {}


def _eval(r: dict) -> dict:
    if r["eval"] is not None:
        return r["eval"]
    e = r["summary"].get("eval")
    return e if isinstance(e, dict) else {}


def status_counts(r: dict) -> dict[str, int]:
    """Critique outcomes of a round, from the `status` of every critique-*.jsonl record."""
    counts = dict.fromkeys(STATUSES, 0)
    for recs in r["critiques"]:
        for rec in recs:
            st = rec.get("status")
            if st in counts:
                counts[st] += 1
    return counts


def summary_row(r: dict) -> dict[str, Any]:
    """The per-round summary as raw values (None: not available)."""
    s = r["summary"]
    crit = [rec for recs in r["critiques"] for rec in recs]
    have_crit = bool(r["critiques"])
    sft, dpo = _training(r, "sft"), _training(r, "dpo")
    return {
        "round": r["k"],
        "prompts": _count_or(s, "prompts", None),
        "responses": _count_or(s, "responses", None if r["responses"] is None else
                               sum(1 for x in r["responses"] if x.get("response") is not None)),
        "critiques": _count_or(s, "critiques", len(crit) if have_crit else None),
        "revisions": _count_or(s, "revisions", sum(x.get("status") == "revise" for x in crit) if have_crit else None),
        "sft_records": _count_or(s, "sft_records", None if r["sft"] is None else len(r["sft"])),
        "pairs": _count_or(s, "pairs", None if r["pairs"] is None else len(r["pairs"])),
        "sft_loss": (sft.get("first_loss"), sft.get("last_loss")),
        "dpo_loss": (dpo.get("first_loss"), dpo.get("last_loss")),
        "dpo_margin": (dpo.get("first_rewards/margins"), dpo.get("last_rewards/margins")),
        "seconds": s.get("seconds"),
    }


def stacked_rounds(run: dict) -> set[int]:
    """Rounds whose adapter is in the manifest's stack."""
    stack = run["manifest"].get("stack")
    out = set()
    for entry in stack if isinstance(stack, list) else []:
        k = round_of(str(entry).split("/")[0])
        if k is not None:
            out.add(k)
    return out


def round_status(run: dict, k: int) -> str:
    """Stacked / stopped early (kept, not stacked) / not stacked / unfinished, and the best round marked."""
    m = run["manifest"]
    rounds_meta = _dict(m.get("rounds"))
    if k == 0:
        parts = ["base model"]
    elif _int(m.get("stopped_round")) == k:
        parts = ["STOPPED early: adapter kept, not stacked"]
    elif k in stacked_rounds(run):
        parts = ["stacked"]
    elif str(k) not in rounds_meta:
        parts = ["unfinished"]
    else:
        parts = ["not stacked"]
    if _int(m.get("best_round")) == k:
        parts.insert(0, "★ BEST")
    return ", ".join(parts)


def metrics_row(run: dict, r: dict | None) -> dict[str, Any]:
    """Held-out metrics of a round (r=None: the base model, round 0) as raw values (None: not available)."""
    base = run["baseline"] or {}
    if r is None:
        ev, summary, k = base, {}, 0
    else:
        ev, summary, k = _eval(r), r["summary"], r["k"]
    quality = _number(summary.get("quality"))
    if quality is None and ev:
        quality = quality_score(ev)
    win = _dict(ev.get("win_rate"))
    cap = _number(_dict(ev.get("capability")).get("accuracy"))
    base_cap = _number(_dict(base.get("capability")).get("accuracy"))
    return {
        "round": k,
        "status": round_status(run, k),
        "quality": quality,
        "harmful_compliance": _number(ev.get("harmful_compliance")),
        "over_refusal": _number(ev.get("over_refusal")),
        "violation_rate": _number(ev.get("violation_rate")),
        "response_violation_rate": _number(summary.get("response_violation_rate")),
        "win_rate": _number(win.get("win_rate")),
        "win_absent": win.get("absent") if isinstance(win.get("absent"), str) else None,
        "wins_losses_ties_garbled": tuple(_number(win.get(key)) for key in ("wins", "losses", "ties", "garbled"))
        if win else None,
        "capability": cap,
        "capability_delta": cap - base_cap if k and cap is not None and base_cap is not None else None,
        "detector": ev.get("detector") if isinstance(ev.get("detector"), str) else None,
        "heuristic_disagreement": _number(ev.get("heuristic_disagreement")),
    }


def judge_stats(r: dict) -> dict:
    """The round summary's judge statistics; a round without them (still running) recounts what it can from
    judgments.jsonl (confident counts need the configured threshold, so they stay unknown); {} when none."""
    js = r["summary"].get("judge")
    if isinstance(js, dict):
        return js
    recs = r["judgments"]
    if "judge" in r["summary"] or not recs:
        return {}
    scored = [x for x in recs if _number(x.get("p_raw")) is not None]
    bins = [0] * 10
    for x in scored:
        bins[min(max(int(x["p_raw"] * 10), 0), 9)] += 1
    model = [x for x in scored if x.get("judge") != "rule"]
    return {"comparisons": len(recs), "garbled": len(recs) - len(scored),
            "position_consistency": sum(bool(x.get("consistent")) for x in model) / len(model) if model else None,
            "label_histogram": bins}


def judge_kinds(r: dict) -> str | None:
    """The judge(s) named in judgments.jsonl, else in pairs.jsonl."""
    kinds = sorted({str(x["judge"]) for x in r["judgments"] or [] if x.get("judge")})
    if not kinds:
        kinds = sorted({str(p["judge"]) for p in r["pairs"] or [] if p.get("judge")})
    return ", ".join(kinds) or None


def pairs_by_source(r: dict) -> dict[str, int] | None:
    """pairs.jsonl records per `source` (None: no pairs.jsonl)."""
    if r["pairs"] is None:
        return None
    counts = dict.fromkeys(SOURCES, 0)
    for p in r["pairs"]:
        src = str(p.get("source") or "unknown")
        counts[src] = counts.get(src, 0) + 1
    return counts


def judge_row(r: dict) -> dict[str, Any]:
    """The round's judging statistics as raw values (None: not available)."""
    js = judge_stats(r)
    dropped = _dict(js.get("dropped"))
    drops = [_number(v) for d in dropped.values() for v in _dict(d).values()]
    by_src = pairs_by_source(r) or {}
    return {
        "round": r["k"],
        "judge": judge_kinds(r),
        "samples": _number(r["summary"].get("samples")),
        "comparisons": _number(js.get("comparisons")),
        "confident": _number(js.get("confident")),
        "garbled": _number(js.get("garbled")),
        "position_consistency": _number(js.get("position_consistency")),
        "agreement_with_self": _number(js.get("agreement_with_self")),
        "pairs_revision": by_src.get("revision"),
        "pairs_best_of_n": by_src.get("best_of_n"),
        "dropped": sum(d for d in drops if d is not None) if dropped else None,
    }


def label_histogram(r: dict) -> list[int] | None:
    h = judge_stats(r).get("label_histogram")
    if isinstance(h, list) and len(h) == 10 and all(_number(x) is not None for x in h):
        return h
    return None


def memory_rows(run: dict) -> tuple[list[str], list[tuple[int, str | None, dict]]]:
    """(stages in pipeline order, [(round, kind, {stage: GB})]) from the round summaries."""
    rows, stages = [], set()
    for r in run["rounds"]:
        mem = {str(st): _number(v) for st, v in _dict(r["summary"].get("peak_memory_gb")).items()}
        kind = r["summary"].get("peak_memory_kind")
        rows.append((r["k"], kind if isinstance(kind, str) else None, mem))
        stages |= set(mem)

    def order(st: str):
        head, _, tail = st.partition("-")
        rank = ROUND_STAGES.index(head) if head in ROUND_STAGES else len(ROUND_STAGES)
        return rank, int(tail) if tail.isdigit() else 0, st

    return sorted(stages, key=order), rows


def ledger_time_rows(run: dict) -> list[list[str]]:
    """[[stage, seconds, rate]] for every stage in the manifest's ledger, in run order, with a total."""
    ledger = _dict(run["manifest"].get("stages"))

    def order(key: str):
        rd, _, stage = key.rpartition("/")
        k = round_of(rd) if rd else 0
        return (k or 0, ROUND_STAGES.index(stage) if stage in ROUND_STAGES else -1, key)

    rows, total = [], 0.0
    for key in sorted(ledger, key=order):
        t = _dict(_dict(ledger[key]).get("timing"))
        sec = _number(t.get("seconds"))
        if sec is None:
            continue
        total += sec
        rate = [f"{t['tokens_per_s']:.0f} tokens/s"] if _number(t.get("tokens_per_s")) else []
        rate += [f"{n.upper()} {t[f'{n}_steps_per_s']:.2f} steps/s" for n in ("sft", "dpo")
                 if _number(t.get(f"{n}_steps_per_s"))]
        rows.append([key, f"{sec:.1f}", ", ".join(rate) or NA])
    if rows:
        rows.append(["all stages", f"{total:.1f}", ""])
    return rows


def principle_stats(run: dict) -> dict[str, dict]:
    """Per principle, over all rounds: sampled, no_change, revisions, mean change, pairs (in all and by source),
    and judged / confident from the judge's per-principle statistics (None: no round has them)."""
    stats: dict[str, dict] = {}

    def entry(name) -> dict:
        return stats.setdefault(str(name), {"sampled": 0, "no_change": 0, "revisions": 0, "changes": [], "pairs": 0,
                                            "pairs_by_source": dict.fromkeys(SOURCES, 0), "judged": None,
                                            "confident": None})

    judged_anywhere = False

    for r in run["rounds"]:
        for recs in r["critiques"]:
            for rec in recs:
                if rec.get("principle") is None:
                    continue
                e = entry(rec["principle"])
                e["sampled"] += 1
                e["no_change"] += rec.get("status") == "no_change"
                e["revisions"] += rec.get("status") == "revise"
        for t in r["trajectories"]:
            current = t.get("initial")
            steps = [s for s in t.get("steps") or [] if isinstance(s, dict)]
            for s in sorted(steps, key=lambda s: s.get("step") or 0):
                revision = s.get("revision")
                if s.get("status") != "revise" or not isinstance(revision, str) or not revision:
                    break  # the trajectory stops here; later steps (if any) saw nothing new
                if isinstance(current, str) and s.get("principle") is not None:
                    ratio = difflib.SequenceMatcher(None, current, revision).ratio()
                    entry(s["principle"])["changes"].append(1.0 - ratio)
                current = revision
        for p in r["pairs"] or []:
            if p.get("principle") is not None:
                e = entry(p["principle"])
                e["pairs"] += 1
                src = str(p.get("source") or "unknown")
                e["pairs_by_source"][src] = e["pairs_by_source"].get(src, 0) + 1
        per = judge_stats(r).get("per_principle")
        if isinstance(per, dict):
            judged_anywhere = True
            for name, d in per.items():
                e = entry(name)
                for key in ("judged", "confident"):
                    v = _number(_dict(d).get(key))
                    if v is not None:
                        e[key] = (e[key] or 0) + v
    for e in stats.values():
        if judged_anywhere:  # a principle the judge never saw was judged 0 times, not "unknown"
            e["judged"] = e["judged"] or 0
            e["confident"] = e["confident"] or 0
        e["mean_change"] = sum(e["changes"]) / len(e["changes"]) if e["changes"] else None
    return dict(sorted(stats.items(), key=lambda kv: (-kv[1]["sampled"], kv[0])))


def _fmt(v, digits: int = 4) -> str:
    if v is None or isinstance(v, bool):
        return NA
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _span(pair) -> str:
    a, b = pair
    if a is None and b is None:
        return NA
    return f"{_fmt(a)} → {_fmt(b)}"


def _rate(num, den) -> str:
    return f"{num / den:.1%}" if den else NA
