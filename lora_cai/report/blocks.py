"""The report's content in order: summary, tables, plots, examples and side-by-side answers, as blocks."""

from __future__ import annotations

from lora_cai.core.layout import stack_entry
from lora_cai.report.effects import effect_blocks, set_lines
from lora_cai.report.tables import (
    DROP_HEADERS,
    DROP_REASONS,
    HIST_HEADERS,
    JUDGE_HEADERS,
    METRIC_HEADERS,
    NA,
    PRINCIPLE_HEADERS,
    STATUSES,
    SUMMARY_HEADERS,
    _dict,
    _fmt,
    _int,
    _number,
    _rate,
    _span,
    judge_kinds,
    judge_row,
    judge_stats,
    label_histogram,
    metrics_row,
    pairs_by_source,
    memory_rows,
    principle_stats,
    round_status,
    stacked_rounds,
    ledger_time_rows,
    status_counts,
    summary_row,
)

EXAMPLES_PER_ROUND = 3
TRUNCATE = 280


# ------------------------------------------------------------------ document
def _truncate(text, n: int = TRUNCATE) -> str:
    if text is None:
        return NA
    text = str(text)
    return text if len(text) <= n else text[:n].rstrip() + " …"


def _examples(r: dict) -> list[dict]:
    """A few trajectories of the round, those whose final text differs from the initial one first."""
    ts = [t for t in r["trajectories"] if isinstance(t, dict)]
    changed = [t for t in ts if t.get("final") != t.get("initial")]
    rest = [t for t in ts if t.get("final") == t.get("initial")]
    return (changed + rest)[:EXAMPLES_PER_ROUND]


def _critic_blocks(run: dict) -> list[tuple]:
    c = run["critic"]
    b: list[tuple] = [("h2", "Critic check")]
    if c is None:
        b.append(("p", "n/a: no critic-check.json (the check was off, critique.steps was 0, or the run predates it)."))
        return b
    ok = c.get("ok")
    verdict = NA if not isinstance(ok, bool) else ("passed" if ok else "FAILED: the critic cannot tell harmful "
                                                                         "from benign answers")
    facts = [("result", verdict), ("message", c.get("message")),
             ("flagged harmful", _number(c.get("flagged_harmful"))), ("flagged benign", _number(c.get("flagged_benign"))),
             ("passed benign", _number(c.get("passed_benign"))), ("copied", _number(c.get("copied"))),
             ("separation", _number(c.get("separation"))),
             ("canaries", f"{_fmt(_number(c.get('n_harmful')))} harmful + {_fmt(_number(c.get('n_benign')))} benign")]
    b.append(("table", ["check", "value"], [[k, _fmt(v)] for k, v in facts]))
    return b


def _compare_blocks(run: dict) -> list[tuple]:
    policies, groups = compare_groups(run)
    b: list[tuple] = [("h2", "Answers side by side")]
    if not groups:
        return b + [("p", "n/a: no held-out answers in this run (evaluation off, or no round evaluated yet).")]
    b.append(("note", "Each held-out prompt with the answer of the base model (round 0) and of every round, from "
                      "baseline-eval.json and round-k/eval.json: the refusal verdict the evaluation gave it, and the "
                      "win-rate judge's verdict against the previous policy's answer (P(better), 0.5 for an identical "
                      "answer; n/a in runs made before per-answer verdicts were stored). Changed: the answer or its "
                      "refusal verdict differs between policies."))
    b.append(("compare", policies, groups))
    return b


# ------------------------------------------------------------------ the answer first
SUMMARY_RATES = (("harmful_compliance", "harmful compliance", "lower is better"),
                 ("over_refusal", "over-refusal", "lower is better"))
COMPARE_MD_ROWS = 8  # report.md shows this many prompts per held-out set; report.html shows them all


def final_round(run: dict) -> int | None:
    """The round whose policy the run ends with: the last one in the manifest's stack."""
    stacked = stacked_rounds(run)
    return max(stacked) if stacked else None


def summary(run: dict, metrics: list[dict]) -> tuple[list[tuple], list[str]]:
    """The page's opening: (label, base, final, change) figures, and one line each on the checks, time and memory."""
    from lora_cai.cai.metrics import paired_change

    by_round = {row["round"]: row for row in metrics}
    k = final_round(run)
    after_eval = next((r["eval"] for r in run["rounds"] if r["k"] == k), None) if k else None
    figures = []
    for key, label, _ in SUMMARY_RATES:
        before, after = by_round.get(0, {}).get(key), by_round.get(k, {}).get(key) if k else None
        c = paired_change(run["baseline"], after_eval, key) if run["baseline"] and after_eval else None
        change = NA if c is None else (f"{100 * c['change']:+.0f} pts (95% CI {100 * c['low']:+.0f} to "
                                       f"{100 * c['high']:+.0f}, {c['n']} prompts)")
        figures.append((label, _pct(before), _pct(after), change))
    cap_b, cap_a = by_round.get(0, {}).get("capability"), by_round.get(k, {}).get("capability") if k else None
    figures.append(("capability probe", _pct(cap_b), _pct(cap_a),
                    NA if cap_b is None or cap_a is None else f"{100 * (cap_a - cap_b):+.0f} pts"))
    lines = [f"final policy: {'round ' + str(k) if k else 'the base model (no round stacked)'}; best round by "
             f"quality: {_fmt(run['manifest'].get('best_round'))}"]
    c = run["critic"]
    if c is None:
        lines.append("critic check: not run (critique off, or the check disabled)")
    elif c.get("ok"):
        lines.append(f"critic check: passed (separation {_fmt(_number(c.get('separation')), 2)})")
    else:
        lines.append(f"critic check: FAILED (separation {_fmt(_number(c.get('separation')), 2)}): its critiques are "
                     f"noise; use `critic: teacher` or `critic: api` with a capable model")
    lines.append(_judge_check(run))
    lines += _detector_lines(run, k)
    lines += set_lines(run, k)
    seconds = [_number(r["summary"].get("seconds")) for r in run["rounds"]]
    peaks = [v for _, _, mem in memory_rows(run)[1] for v in mem.values() if _number(v) is not None]
    lines.append(f"time: {_fmt(sum(x for x in seconds if x) / 60, 1)} minutes over {len(run['rounds'])} round(s); "
                 f"peak memory: {_fmt(max(peaks) if peaks else None, 2)} GB")
    return figures, lines


def _detector_lines(run: dict, k: int | None) -> list[str]:
    """What decided the held-out refusals of the base model and the final policy (a judge that fell back names how
    many answers did), whether the final win rate is absent, and every stage whose server calls failed."""
    from lora_cai.engine.calls import failed_calls

    after = next((r["eval"] for r in run["rounds"] if r["k"] == k), None) if k else None
    found = {name: ev.get("detector") for name, ev in (("base", run["baseline"]), ("final", after))
             if isinstance(ev, dict) and isinstance(ev.get("detector"), str)}
    lines = []
    if found:
        lines.append("refusals decided by: " + ("; ".join(f"{name}: {d}" for name, d in found.items())
                                                 if len(set(found.values())) > 1 else next(iter(found.values()))))
    win = _dict((after or {}).get("win_rate"))
    if win.get("absent"):
        lines.append(f"win rate vs previous round: absent ({win['absent']})")
    counted = [(f"{name} ({purpose.replace('_', ' ')})", calls, "judge")
               for name, ev in [("baseline eval", run["baseline"])] + [(f"round {r['k']} eval", r["eval"])
                                                                       for r in run["rounds"]]
               for purpose, calls in _dict(_dict(ev).get("judge_calls")).items()]
    for r in run["rounds"]:
        counted += [(f"round {r['k']} judge", judge_stats(r).get("calls"), "judge"),
                    (f"round {r['k']} critique", r["summary"].get("critic_calls"), "critic")]
    counted.append(("critic check", _dict(run["critic"]).get("critic_calls"), "critic"))
    failures = [name + said for name, calls, who in counted if (said := failed_calls(_dict(calls), who, ": "))]
    if failures:
        lines.append("server calls that failed (counted, below judge.max_failures): " + "; ".join(failures))
    return lines


def _pct(v) -> str:
    return NA if _number(v) is None else f"{100 * v:.0f}%"


def _judge_check(run: dict) -> str:
    stats = [judge_stats(r) for r in run["rounds"]]
    kinds = {judge_kinds(r) for r in run["rounds"]} - {None}
    consistent = [(_number(s.get("position_consistency")), _number(s.get("comparisons"))) for s in stats]
    consistent = [(pc, n) for pc, n in consistent if pc is not None and n]
    if not consistent:
        return ("judge check: rule judge (right by construction)" if kinds <= {"rule"} and kinds else
                "judge check: nothing judged by a model")
    pc = sum(pc * n for pc, n in consistent) / sum(n for _, n in consistent)
    if pc >= 0.5:
        return f"judge check: passed ({100 * pc:.0f}% of comparisons prefer the same answer in both orders)"
    return (f"judge check: FAILED (only {100 * pc:.0f}% of comparisons prefer the same answer in both orders: the "
            f"judge follows position); use `judge.kind: teacher` or `api` with a capable model")


def compare_groups(run: dict) -> tuple[list[int], list[tuple[str, list[dict]]]]:
    """`side_by_side` of the run's evaluations as the report loaded them (round 0: baseline-eval.json)."""
    evals = [(0, run["baseline"])] + [(r["k"], r["eval"]) for r in run["rounds"]]
    return side_by_side({k: e["samples"] for k, e in evals if isinstance(e, dict) and isinstance(e.get("samples"), list)})


def side_by_side(answers: dict[int, list[dict]]) -> tuple[list[int], list[tuple[str, list[dict]]]]:
    """The policies evaluated (0: base) and, per held-out set (harmful first), each prompt with every policy's answer,
    refusal verdict and win verdict against the previous policy (None where not stored: runs made before it was),
    and whether the answer or its verdict changed between policies. `answers`: each policy's eval.json samples.
    The report's section and `chat --compare` both show this."""
    policies = sorted(answers)
    rows: dict[tuple, dict] = {}
    for k in policies:
        for smp in answers[k]:
            if not isinstance(smp, dict):
                continue
            row = rows.setdefault((smp.get("set"), smp.get("id")), {"prompt": smp.get("prompt"), "set": smp.get("set"),
                                                                    "cells": {}})
            row["cells"][k] = {"answer": smp.get("answer"), "refused": smp.get("refusal"),
                               "win": _number(smp.get("win_vs_previous")) if "win_vs_previous" in smp else None,
                               "win_stored": "win_vs_previous" in smp}
    for row in rows.values():
        cells = [row["cells"].get(k, {}) for k in policies]
        row["changed"] = len({(c.get("answer"), c.get("refused")) for c in cells}) > 1
    groups = [(title, [r for r in rows.values() if r["set"] == name])
              for name, title in (("harmful", "held-out harmful prompts"), ("benign", "held-out benign prompts"))]
    return policies, [(t, rs) for t, rs in groups if rs]


def win_label(cell: dict, k: int) -> str:
    if k == 0:
        return "win rate: (base)"
    if not cell.get("win_stored"):
        return "vs previous: n/a"
    w = cell.get("win")
    if w is None:
        return "vs previous: not judged"
    return f"vs previous: {'win' if w > 0.5 else 'loss' if w < 0.5 else 'tie'} ({w:.2f})"


def refusal_label(cell: dict) -> str:
    return {True: "refused", False: "answered"}.get(cell.get("refused"), "n/a")


def _trajectory_text(t: dict) -> str:
    steps = [st for st in (t.get("steps") or []) if isinstance(st, dict)]
    if not steps:
        return "no critique steps"
    return "\n\n".join(f"[{st.get('principle') or NA}] critique: {_truncate(st.get('critique'))}\n"
                        f"→ {st.get('status') or NA}: {_truncate(st.get('revision'))}" for st in steps)


def _blocks(run: dict) -> list[tuple]:
    """The report as a list of blocks, rendered once as Markdown and once as HTML."""
    m, root = run["manifest"], run["root"]
    model = m.get("model") if isinstance(m.get("model"), dict) else {}
    const = m.get("constitution") if isinstance(m.get("constitution"), dict) else {}
    stack = m.get("stack") if isinstance(m.get("stack"), list) else []
    best, stopped = _int(m.get("best_round")), _int(m.get("stopped_round"))
    metrics = [metrics_row(run, None)] + [metrics_row(run, r) for r in run["rounds"]]
    quality = {row["round"]: row["quality"] for row in metrics}
    b: list[tuple] = [("h1", f"lora_cai run report: {m.get('name') or root.name}")]
    if stopped is not None:
        early = (f"round {stopped} (quality {_fmt(quality.get(stopped), 3)} after round {stopped - 1}'s "
                 f"{_fmt(quality.get(stopped - 1), 3)}): its adapter is kept in {stack_entry(stopped)} but NOT stacked")
    else:
        early = "none" if "best_round" in m else None
    facts = [("run directory", str(root)), ("base model", model.get("name")), ("backend", m.get("backend")),
             ("constitution", f"{const.get('name', NA)} ({str(const.get('hash', NA))[:12]})"),
             ("seed", m.get("seed")), ("rounds", len(run["rounds"])),
             ("adapter stack", ", ".join(map(str, stack)) or NA),
             ("best round", None if best is None else
              f"{'0 (base model)' if best == 0 else best}, quality {_fmt(quality.get(best), 3)}"),
             ("early stop", early)]
    figures, lines = summary(run, metrics)
    b.append(("summary", figures, lines))
    b.append(("h2", "Plots"))
    b += [("img", name) for name in ("eval.png", "judge_labels.png", "critique_outcomes.png", "sft_loss.png", "dpo.png")]
    b += _compare_blocks(run)
    b.append(("h2", "The run"))
    b.append(("list", [f"{k}: {_fmt(v)}" for k, v in facts]))
    b += _critic_blocks(run)

    b.append(("h2", "Rounds"))
    b.append(("note", "Counts, first → last training values and seconds are the run's own per-round summaries "
                   "(manifest.json). status: stacked (the adapter is in the manifest's stack), STOPPED early (quality "
                   "dropped: the adapter is kept but not stacked), ★ BEST (the manifest's best_round). n/a: not in the "
                   "artifacts (no pairs to train DPO on, or the round has not finished)."))
    rows = []
    for r in run["rounds"]:
        s = summary_row(r)
        rows.append([str(s["round"]), round_status(run, r["k"]), _fmt(s["prompts"]), _fmt(s["responses"]),
                     _fmt(s["critiques"]), _fmt(s["revisions"]), _fmt(s["sft_records"]), _fmt(s["pairs"]),
                     _span(s["sft_loss"]), _span(s["dpo_loss"]), _span(s["dpo_margin"]), _fmt(s["seconds"], 1)])
    b.append(("table", SUMMARY_HEADERS, rows))

    b.append(("h2", "Held-out metrics per round"))
    b.append(("note", "From baseline-eval.json (round 0, the base model) and round-k/eval.json. quality: the manifest's "
                   "score (mean of 1 - harmful compliance, 1 - over-refusal and, with a rule judge, 1 - violation "
                   "rate; round 0 computed the same way). violation rate: sampled held-out answers breaking a rule; "
                   "response violation rate: the round's training responses breaking one. win rate: this round's "
                   "answers against the previous eval's, judged in both orders (ties count half). capability Δ vs "
                   "base: the alignment tax (negative = capability lost). detector: what decided refusals; heuristic "
                   "disagreement: share of answers where the judge and the refusal-phrase heuristic differ. n/a: not "
                   "measured in this run."))
    rows = []
    for row in metrics:
        if row["round"] == 0 and run["baseline"] is None:
            continue
        wltg = row["wins_losses_ties_garbled"]
        rows.append(["0 (base)" if row["round"] == 0 else str(row["round"]), row["status"], _fmt(row["quality"]),
                     _fmt(row["harmful_compliance"]), _fmt(row["over_refusal"]), _fmt(row["violation_rate"]),
                     _fmt(row["response_violation_rate"]),
                     f"absent: {row['win_absent']}" if row["win_absent"] else _fmt(row["win_rate"]),
                     NA if wltg is None else " / ".join(_fmt(v) for v in wltg), _fmt(row["capability"]),
                     NA if row["capability_delta"] is None else f"{row['capability_delta']:+.4f}",
                     _fmt(row["detector"]), _fmt(row["heuristic_disagreement"])])
    b.append(("table", METRIC_HEADERS, rows) if rows else ("p", "n/a: no evaluation in this run."))
    b += effect_blocks(run, final_round(run))

    b.append(("h2", "Judging"))
    b.append(("note", "From each round's summary (manifest.json: judge, samples) and pairs.jsonl (pairs by source). "
                   "comparisons: judged pairs of responses (both orders each); confident: the judge's preference "
                   "reached judge.confidence; garbled: no usable answer; position consistency: both orders prefer "
                   "the same response; agreement with self: with judge.cross_check_self, how often the policy "
                   "picks the judge's winner; pairs dropped: by the pair builders, detailed below. n/a: nothing "
                   "was judged (revision pairs without pairs.judge_revisions) or the run predates judging."))
    b.append(("table", JUDGE_HEADERS, [
        [str(j["round"]), _fmt(j["judge"]), _fmt(j["samples"]), _fmt(j["comparisons"]), _fmt(j["confident"]),
         _fmt(j["garbled"]), _fmt(j["position_consistency"]), _fmt(j["agreement_with_self"]), _fmt(j["pairs_revision"]),
         _fmt(j["pairs_best_of_n"]), _fmt(j["dropped"])]
        for j in (judge_row(r) for r in run["rounds"])]))
    rows = []
    for r in run["rounds"]:
        by_src = pairs_by_source(r) or {}
        for src, d in _dict(judge_stats(r).get("dropped")).items():
            d = _dict(d)
            rows.append([str(r["k"]), str(src), _fmt(by_src.get(src))] + [_fmt(_number(d.get(x))) for x in DROP_REASONS])
    b.append(("h3", "Pairs dropped by the builders"))
    b.append(("table", DROP_HEADERS, rows) if rows else ("p", "n/a: no judged pairs in this run."))
    b.append(("h3", "Judge labels"))
    b.append(("note", "Comparisons per tenth of P(a better) (p_raw, the mean of both orders), from the summary's "
                   "label_histogram."))
    rows = [[str(r["k"])] + [str(x) for x in h] for r in run["rounds"] if (h := label_histogram(r)) is not None]
    b.append(("table", HIST_HEADERS, rows) if rows else ("p", "n/a: no judged comparisons in this run."))

    b.append(("h2", "Critique outcomes"))
    b.append(("note", "Statuses of the records in round-k/critique-*.jsonl."))
    rows = []
    for r in run["rounds"]:
        c = status_counts(r)
        rows.append([str(r["k"])] + [str(c[st]) for st in STATUSES] + [str(sum(c.values()))])
    b.append(("table", ["round", *STATUSES, "total"], rows))

    b.append(("h2", "Principles"))
    b.append(("note", "Over all rounds. sampled: critique records naming the principle; no change: of those, "
                   "status no_change; revisions: status revise; mean change: mean of 1 - difflib ratio between "
                   "a revise step's input (step 1: the initial response; step s: step s-1's revision, from "
                   "trajectories.jsonl) and its revision; pairs: pairs.jsonl records naming the principle, by "
                   "source; judged / confident: comparisons the judge answered with the principle's question, and "
                   "those it answered confidently (the round summaries' judge.per_principle), so confident / judged "
                   "is how often the pairs it judged won."))
    rows = [[name, str(e["sampled"]), str(e["no_change"]), _rate(e["no_change"], e["sampled"]),
             str(e["revisions"]), _fmt(e["mean_change"], 3), str(e["pairs_by_source"]["revision"]),
             str(e["pairs_by_source"]["best_of_n"]), _fmt(e["judged"]), _fmt(e["confident"]),
             _rate(e["confident"], e["judged"]) if e["judged"] is not None else NA]
            for name, e in principle_stats(run).items()]
    b.append(("table", PRINCIPLE_HEADERS, rows) if rows else ("p", "No critique records."))

    b.append(("h2", "Peak memory"))
    stages, mem_rows = memory_rows(run)
    kinds = sorted({kind for _, kind, _ in mem_rows if kind})
    b.append(("note", "GB per stage, from each round's summary (peak_memory_gb). cuda_max_allocated: the GPU's peak "
                   "allocation during the stage; process_peak_rss: the process's peak resident memory so far (on "
                   "a CPU Linux reports no per-stage peak, so it only grows). Stages that did not run (resumed) "
                   "are n/a." + (f" Measured here: {', '.join(kinds)}." if kinds else "")))
    if stages:
        b.append(("table", ["round", "measure", *stages],
                  [[str(k), _fmt(kind)] + [_fmt(mem.get(st), 3) for st in stages] for k, kind, mem in mem_rows]))
    else:
        b.append(("note", "n/a: no peak memory recorded in this run."))

    b.append(("h2", "Where the time went"))
    b.append(("note", "Seconds per stage (and generated tokens or optimizer steps per second), from the manifest's "
                   "ledger of stages (`stages`: the run that did the work; a rerun that skipped a stage keeps its "
                   "figures). The critic check and the baseline evaluation run once, before round 1."))
    rows = ledger_time_rows(run)
    b.append(("table", ["stage", "seconds", "rate"], rows) if rows else ("p", "n/a: no stage timing recorded."))

    b.append(("h2", "Example trajectories"))
    b.append(("note", f"Up to {EXAMPLES_PER_ROUND} per round from trajectories.jsonl (changed ones first): the "
                      f"initial answer, then each critique with its principle and the revision it led to (status "
                      f"revise or no_change), texts truncated to {TRUNCATE} characters."))
    for r in run["rounds"]:
        b.append(("h3", f"Round {r['k']}"))
        ex = _examples(r)
        if not ex:
            b.append(("p", "No trajectories."))
            continue
        rows = [[_truncate(t.get("prompt")), _truncate(t.get("initial")), _trajectory_text(t)] for t in ex]
        b.append(("table", ["prompt", "initial answer", "critiques and revisions"], rows))
    return b
