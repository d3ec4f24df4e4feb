"""Run report: tables and PNG plots across rounds, as Markdown and HTML, from a run directory's artifacts alone.

`python -m lora_cai.report DIR` (re)writes `DIR/report.md`, `DIR/report.html` (self-contained: the plots
are embedded as base64) and the plots under `DIR/report/`. Nothing is loaded but the run's files: no model,
no torch, no recipe.

Where each number comes from:

- per-round counts, first -> last training values and seconds: the round's summary in `manifest.json`
  (the file the run itself wrote); a round the manifest does not list yet falls back to its files
  (`responses.jsonl`, `critique-*.jsonl`, `sft.jsonl`, `pairs.jsonl`, `train.json`);
- held-out metrics: `baseline-eval.json` (shown as round 0) and `round-k/eval.json` (harmful compliance,
  over-refusal, rule violation rate, win rate against the previous round, capability-probe accuracy,
  detector and heuristic disagreement); the quality score is the manifest's `quality` (round 0 and rounds
  that lack it: `evaluation.quality_score` of the eval file, the same formula); the alignment tax is a
  round's capability accuracy minus the base model's; best and stopped rounds: the manifest's `best_round`,
  `stopped_round` and `stack`;
- judging: the round summary's `judge` statistics (a round the manifest does not list yet: comparisons,
  garbled, position consistency and label histogram recounted from `judgments.jsonl`), pairs by `source`
  from `pairs.jsonl`; the critic check: `critic-check.json`; peak memory: the summary's `peak_memory_gb`;
- curves: `sft_log.jsonl` and `dpo_log.jsonl` (rows that carry a `loss`);
- critique outcomes: the `status` of every record in `critique-*.jsonl`;
- the principle table, the one computed analysis: per principle, critique records (sampled), records with
  status `no_change`, records with status `revise`, the mean of `1 - difflib ratio` between a revise step's
  input text and its revision (inputs rebuilt from `trajectories.jsonl`: step 1's input is `initial`, step
  s's input is step s-1's revision), pairs in `pairs.jsonl` naming the principle (by source), and the
  judge's per-principle `judged` / `confident` counts summed over the rounds' summaries.

Anything absent (eval disabled, no pairs so no DPO steps, a round still running, a run from before these
files existed) renders as "n/a".
"""

from __future__ import annotations

import argparse
import base64
import difflib
import html
import json
import sys
from pathlib import Path
from typing import Any

from .errors import UserError
from .evaluation import quality_score  # the run's own formula; evaluation.py imports no torch at module level
from .layout import BASELINE_EVAL, CRITIC_CHECK, MANIFEST, ROUND_STAGES, round_dir, round_of, stack_entry

STATUSES = ("revise", "no_change", "copied_demonstration", "copied_response", "empty", "too_long", "failed")
NA = "n/a"
PLOTS = {  # file name under report/ -> title
    "sft_loss.png": "SFT loss per step",
    "dpo.png": "Preference-stage (dpo.loss) loss, reward margin and reward accuracy per step",
    "eval.png": "Held-out metrics per round (round 0 = base model)",
    "judge_labels.png": "Judge labels: histogram of P(a better) per round",
    "critique_outcomes.png": "Critique outcomes per round",
}
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
EXAMPLES_PER_ROUND = 3
TRUNCATE = 280


# ------------------------------------------------------------------ reading the run
def _read_json(path: Path) -> dict | None:
    """A JSON object, or None when the file is absent, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file ([] when absent); a stage's uncommitted tail (past its meta pointer) and
    unparsable lines are skipped, so a run that is still going reports what it has committed."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    meta = _read_json(path.with_name(path.name + ".meta.json"))
    committed = meta.get("committed_bytes") if meta else None
    if isinstance(committed, int) and 0 <= committed <= len(data):
        data = data[:committed]
    out = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _step_files(rd: Path) -> list[Path]:
    steps = []
    for p in rd.glob("critique-*.jsonl"):
        n = p.name[len("critique-"):-len(".jsonl")]
        if n.isdigit():
            steps.append((int(n), p))
    return [p for _, p in sorted(steps)]


def _load_round(root: Path, k: int, summary: dict) -> dict:
    rd = root / round_dir(k)
    return {
        "k": k,
        "dir": rd,
        "summary": summary if isinstance(summary, dict) else {},
        "has_dir": rd.is_dir(),
        "responses": _read_jsonl(rd / "responses.jsonl") if (rd / "responses.jsonl").exists() else None,
        "critiques": [_read_jsonl(p) for p in _step_files(rd)],
        "trajectories": _read_jsonl(rd / "trajectories.jsonl"),
        "sft": _read_jsonl(rd / "sft.jsonl") if (rd / "sft.jsonl").exists() else None,
        "pairs": _read_jsonl(rd / "pairs.jsonl") if (rd / "pairs.jsonl").exists() else None,
        "sft_log": [r for r in _read_jsonl(rd / "sft_log.jsonl") if "loss" in r],
        "dpo_log": [r for r in _read_jsonl(rd / "dpo_log.jsonl") if "loss" in r],
        "judgments": _read_jsonl(rd / "judgments.jsonl") if (rd / "judgments.jsonl").exists() else None,
        "train": _read_json(rd / "train.json"),
        "eval": _read_json(rd / "eval.json"),
    }


def load_run(run_dir: str | Path) -> dict:
    """Everything the report shows, read from the run directory; UserError when it is not one."""
    root = Path(run_dir)
    if not root.exists():
        raise UserError(f"{root}: no such directory; give a run directory (the output_dir of a lora_cai run)")
    if not root.is_dir():
        raise UserError(f"{root}: not a directory; give a run directory (the output_dir of a lora_cai run)")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{mpath}: missing, so {root} is not a lora_cai run directory; give the output_dir of a run")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{mpath}: not a readable run manifest ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{mpath}: not a run manifest (a JSON object was expected, got {type(manifest).__name__})")
    rounds_meta = manifest.get("rounds") if isinstance(manifest.get("rounds"), dict) else {}
    ks = {int(k) for k in rounds_meta if str(k).isdigit()}
    ks |= {round_of(d.name) for d in root.glob("round-*") if d.is_dir() and round_of(d.name) is not None}
    return {
        "root": root,
        "manifest": manifest,
        "baseline": _read_json(root / BASELINE_EVAL),
        "critic": _read_json(root / CRITIC_CHECK),
        "rounds": [_load_round(root, k, rounds_meta.get(str(k)) or {}) for k in sorted(ks)],
    }


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


def peak_memory(run: dict) -> tuple[list[str], list[tuple[int, str | None, dict]]]:
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


def stage_times(run: dict) -> list[list[str]]:
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


# ------------------------------------------------------------------ plots
def _figure(figsize):
    """A figure on the Agg canvas, without touching pyplot's global backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the run report needs matplotlib; install it with `pip install matplotlib`") from None
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")


def _curve_plot(ax, run: dict, log_key: str, metric: str, title: str) -> None:
    drawn = False
    for r in run["rounds"]:
        pts = [(h.get("step"), h.get(metric)) for h in r[log_key]]
        pts = [(x, y) for x, y in pts if isinstance(x, (int, float)) and isinstance(y, (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=f"round {r['k']}")
            drawn = True
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        _empty(ax, "no steps logged")


def plot_sft(run: dict, path: Path) -> None:
    fig = _figure((7, 4))
    ax = fig.add_subplot(1, 1, 1)
    _curve_plot(ax, run, "sft_log", "loss", "SFT loss")
    ax.set_ylabel("loss")
    _save(fig, path)


def plot_dpo(run: dict, path: Path) -> None:
    fig = _figure((13, 4))
    for i, (metric, title) in enumerate((("loss", "preference loss"), ("rewards/margins", "reward margin"),
                                         ("rewards/accuracies", "reward accuracy"))):
        ax = fig.add_subplot(1, 3, i + 1)
        _curve_plot(ax, run, "dpo_log", metric, title)
    _save(fig, path)


def plot_eval(run: dict, path: Path) -> None:
    fig = _figure((9, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    points = [metrics_row(run, None)] + [metrics_row(run, r) for r in run["rounds"]]
    drawn = False
    for key, label, marker in (("harmful_compliance", "harmful compliance", "o"),
                               ("over_refusal", "over-refusal", "s"),
                               ("violation_rate", "rule violation rate", "v"),
                               ("win_rate", "win rate vs previous round", "^"),
                               ("capability", "capability accuracy", "D"),
                               ("quality", "quality score", "*")):
        pts = [(row["round"], row[key]) for row in points if row[key] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker=marker, label=label, linestyle="--" if key == "quality" else "-")
            drawn = True
    m = run["manifest"]
    best, stopped = _int(m.get("best_round")), _int(m.get("stopped_round"))
    if best is not None:
        ax.axvline(best, color="green", linestyle=":", alpha=0.7, label=f"best round ({best})")
    if stopped is not None:
        ax.axvspan(stopped - 0.4, stopped + 0.4, color="red", alpha=0.12,
                   label=f"round {stopped} stopped (not stacked)")
    ax.set_xticks([row["round"] for row in points])
    ax.set_xticklabels(["base" if row["round"] == 0 else str(row["round"]) for row in points])
    ax.set_xlabel("round")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("held-out metrics")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        _empty(ax, "no evaluation in this run")
    _save(fig, path)


def plot_judge_labels(run: dict, path: Path) -> None:
    """Grouped bars: per round, how many judged comparisons fell in each tenth of P(a better)."""
    fig = _figure((9, 4))
    ax = fig.add_subplot(1, 1, 1)
    hists = [(r["k"], h) for r in run["rounds"] if (h := label_histogram(r)) is not None]
    width = 0.1 / (len(hists) + 1)
    for i, (k, h) in enumerate(hists):
        xs = [b / 10 + width * (i + 1) for b in range(10)]
        ax.bar(xs, h, width=width, label=f"round {k}")
    ax.set_xticks([b / 10 for b in range(11)])
    ax.set_xlim(0, 1)
    ax.set_xlabel("P(a better), averaged over both orders (p_raw)")
    ax.set_ylabel("comparisons")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("judge labels (0.5 = undecided; the edges are confident)")
    ax.grid(alpha=0.3, axis="y")
    if hists:
        ax.legend(fontsize="small")
    else:
        _empty(ax, "no judged comparisons")
    _save(fig, path)


def plot_critiques(run: dict, path: Path) -> None:
    fig = _figure((8, 4))
    ax = fig.add_subplot(1, 1, 1)
    ks = [r["k"] for r in run["rounds"]]
    counts = [status_counts(r) for r in run["rounds"]]
    bottom = [0] * len(ks)
    for st in STATUSES:
        vals = [c[st] for c in counts]
        ax.bar([str(k) for k in ks], vals, bottom=bottom, label=st)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("round")
    ax.set_ylabel("critique records")
    ax.set_title("critique outcomes")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if not any(bottom):
        _empty(ax, "no critique records")
    _save(fig, path)


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
    from .evaluation import paired_change

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
    seconds = [_number(r["summary"].get("seconds")) for r in run["rounds"]]
    peaks = [v for _, _, mem in peak_memory(run)[1] for v in mem.values() if _number(v) is not None]
    lines.append(f"time: {_fmt(sum(x for x in seconds if x) / 60, 1)} minutes over {len(run['rounds'])} round(s); "
                 f"peak memory: {_fmt(max(peaks) if peaks else None, 2)} GB")
    return figures, lines


def _detector_lines(run: dict, k: int | None) -> list[str]:
    """What decided the held-out refusals of the base model and the final policy (a judge that fell back names how
    many answers did), whether the final win rate is absent, and every stage whose server calls failed."""
    from .display import failed_calls

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
    stages, mem_rows = peak_memory(run)
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
    rows = stage_times(run)
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


def _md_cell(text: str) -> str:
    return (str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "")
            .replace("\n", " ↵ ").replace("<", "&lt;").replace(">", "&gt;"))


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + blk[1])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "list":
            out.append("\n".join(f"- {_md_cell(x)}" for x in blk[1]))
        elif kind == "table":
            _, headers, rows = blk
            lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{PLOTS[blk[1]]}](report/{blk[1]})")
        elif kind == "note":
            out.append(f"*What the columns mean:* {blk[1]}")
        elif kind == "summary":
            _, figures, lines = blk
            table = ["| held out | base | final policy | change |", "|---|---|---|---|"]
            table += [f"| {label} | {before} | {after} | {change} |" for label, before, after, change in figures]
            out.append("\n".join(table))
            out.append("\n".join(f"- {_md_cell(x)}" for x in lines))
        elif kind == "compare":
            _, policies, groups = blk
            for title, rows in groups:
                changed = [r for r in rows if r["changed"]]
                shown = (changed + [r for r in rows if not r["changed"]])[:COMPARE_MD_ROWS]
                out.append(f"### {title} ({len(rows)}, {len(changed)} changed)")
                head = ["prompt"] + ["base" if k == 0 else f"round {k}" for k in policies]
                lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
                for r in shown:
                    cells = [_md_cell(_truncate(r["prompt"], 120))]
                    for k in policies:
                        c = r["cells"].get(k, {})
                        cells.append(_md_cell(f"{refusal_label(c)}: {_truncate(c.get('answer'), 120)}"))
                    lines.append("| " + " | ".join(cells) + " |")
                out.append("\n".join(lines))
                if len(rows) > len(shown):
                    out.append(f"{len(rows) - len(shown)} more in report.html (changed prompts first here).")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;
vertical-align:top}th{background:#f3f3f3}td{white-space:pre-wrap}img{max-width:100%;display:block;margin:1em 0}
.summary{display:flex;flex-wrap:wrap;gap:1em;margin:1em 0}.fig{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;
min-width:14em}.fig .label{color:#555}.fig .big{font-size:2em;font-weight:600}.fig .change{font-size:.85em;color:#444}
details.note{margin:.5em 0;color:#444;font-size:.9em}details.note summary{cursor:pointer}
table.compare td{width:1%}table.compare .verdict{font-weight:600;font-size:.85em;color:#333;white-space:normal}
.filter{margin:.5em 0}@media print{.filter{display:none}details.note>p{display:block}}"""
# The side-by-side filter: a few lines of inline JavaScript, no library, no network. Without JavaScript every
# prompt shows; printing opens the column notes.
_SCRIPT = """<script>
(function () {
  var box = document.getElementById("only-changed"), count = document.getElementById("shown");
  function apply() {
    var rows = document.querySelectorAll("tr.cmp"), n = 0;
    rows.forEach(function (r) {
      var hide = box.checked && r.getAttribute("data-changed") !== "1";
      r.style.display = hide ? "none" : "";
      if (!hide) n += 1;
    });
    count.textContent = n + " of " + rows.length + " prompts shown";
  }
  if (box) { box.addEventListener("change", apply); apply(); }
  window.addEventListener("beforeprint", function () {
    document.querySelectorAll("details").forEach(function (d) { d.open = true; });
  });
})();
</script>"""


def render_html(blocks: list[tuple], plot_dir: Path) -> str:
    e = html.escape
    title = next((blk[1] for blk in blocks if blk[0] == "h1"), "lora_cai run report")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(blk[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(blk[1])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in blk[1]) + "</ul>")
        elif kind == "table":
            _, headers, rows = blk
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows]
            out.append("</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((plot_dir / blk[1]).read_bytes()).decode("ascii")
            out.append(f'<img alt="{e(PLOTS[blk[1]])}" src="data:image/png;base64,{data}">')
        elif kind == "note":
            out.append(f'<details class="note"><summary>What the columns mean</summary><p>{e(blk[1])}</p></details>')
        elif kind == "summary":
            _, figures, lines = blk
            out.append('<section class="summary">' + "".join(
                f'<div class="fig"><div class="label">{e(label)} (held out)</div><div class="big">{e(before)} → '
                f'{e(after)}</div><div class="change">{e(change)}</div></div>' for label, before, after, change in figures)
                + "</section>")
            out.append('<ul class="checks">' + "".join(f"<li>{e(x)}</li>" for x in lines) + "</ul>")
        elif kind == "compare":
            _, policies, groups = blk
            out.append('<div class="filter"><label><input type="checkbox" id="only-changed"> only prompts whose '
                       'answer or refusal verdict changed</label> <span id="shown"></span></div>')
            for title, rows in groups:
                out.append(f"<h3>{e(title)} ({len(rows)}, {sum(r['changed'] for r in rows)} changed)</h3>")
                out.append('<table class="compare"><thead><tr><th>prompt</th>' + "".join(
                    f"<th>{'base' if k == 0 else f'round {k}'}</th>" for k in policies) + "</tr></thead><tbody>")
                for r in rows:
                    cells = "".join(
                        f'<td><div class="verdict">{e(refusal_label(c))} · {e(win_label(c, k))}</div>'
                        f'{e(c.get("answer") or NA)}</td>'
                        for k, c in ((k, r["cells"].get(k, {})) for k in policies))
                    out.append(f'<tr class="cmp" data-changed="{int(r["changed"])}"><td>{e(r["prompt"] or NA)}</td>'
                               f"{cells}</tr>")
                out.append("</tbody></table>")
    out.append(_SCRIPT)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ entry points
def build_report(run_dir: str | Path) -> Path:
    """Write report.md, report.html and report/*.png into the run directory; return report.md's path."""
    from .store import atomic_write_text

    run = load_run(run_dir)
    root = run["root"]
    plot_dir = root / "report"
    plot_dir.mkdir(exist_ok=True)
    plot_sft(run, plot_dir / "sft_loss.png")
    plot_dpo(run, plot_dir / "dpo.png")
    plot_eval(run, plot_dir / "eval.png")
    plot_judge_labels(run, plot_dir / "judge_labels.png")
    plot_critiques(run, plot_dir / "critique_outcomes.png")
    blocks = _blocks(run)
    md = root / "report.md"
    atomic_write_text(md, render_markdown(blocks))
    atomic_write_text(root / "report.html", render_html(blocks, plot_dir))
    return md


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_cai.report",
        description="Write DIR/report.md, DIR/report.html and DIR/report/*.png from a run directory's artifacts.")
    parser.add_argument("run_dir", metavar="DIR", help="a run directory (the output_dir of a lora_cai run)")
    return parser


def _main(args) -> int:
    args.writes_to = args.run_dir
    print(build_report(args.run_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
