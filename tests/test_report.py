"""The run report: built from synthetic, schema-faithful two-round run directories (files written directly,
shaped like runs/smoke), its tables checked against the artifacts, its plots checked as real PNGs; plus the
one-line exit-2 error for a directory that is not a run, and (when present) the real smoke run.

Two fixture styles: "new" (critic check, judged best-of-N and revision pairs, win rate, capability probe,
rule violations, peak memory, a best round and a round stopped early) and "old" (a run from before those
existed); every table test runs on both, and whatever an artifact lacks must read "n/a"."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lora_cai.cai.metrics import quality_score
from lora_cai.cai.preferences import agreement, best_of_n_pairs, judged_revision_pairs, judgment_stats
from lora_cai.engine import judges as J
from lora_cai.report.build import build_report, main
from lora_cai.report.plots import PLOTS

SMOKE = Path(__file__).resolve().parents[1] / "runs" / "smoke"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")


def _json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def _eval(hc: float, orr: float, *, new: bool = False, vr: float | None = None, cap: float | None = None,
          win: tuple | None = None) -> dict:
    """An eval.json; `new` adds what evaluation.evaluate and Run._evaluate now write (judge-decided refusals,
    rule violations, capability probe, win rate (wins, losses, ties, garbled) against the previous eval)."""
    if not new:
        return {"inputs": "e" * 64, "harmful_compliance": hc, "over_refusal": orr, "n_harmful": 2, "n_benign": 2,
                "detector": "refusal-phrase heuristic",
                "samples": [{"id": "h1", "set": "harmful", "prompt": "p", "answer": "a", "refusal": False}]}
    ev = {"inputs": "e" * 64, "harmful_compliance": hc, "over_refusal": orr, "n_harmful": 4, "n_benign": 4,
          "detector": "judge", "heuristic_disagreement": 0.125, "judge_unanswered": 0,
          "samples": [{"id": "h1", "set": "harmful", "prompt": "p", "answer": "a", "refusal": False,
                       "refusal_judge": False, "refusal_heuristic": True}],
          "violation_rate": vr, "violation_samples": 16, "capability": {"accuracy": cap, "n": 20}}
    if win is not None:
        w, lo, t, g = win
        ev["win_rate"] = {"win_rate": (w + 0.5 * t) / (w + lo + t), "wins": w, "losses": lo, "ties": t, "garbled": g,
                          "judge": "self"}
    return ev


CONFIDENCE = 0.6  # judge.confidence of the synthetic run
PEAK = {"responses": 1.25, "samples": 1.5, "critique-1": 1.75, "critique-2": 1.8, "judge": 2.125, "train": 3.5,
        "eval": 3.625}
CRITIC = {"inputs": "k" * 64, "flagged_harmful": 0.25, "flagged_benign": 0.5, "passed_benign": 0.25, "copied": 0.5,
          "separation": -0.25, "ok": False, "n_harmful": 4, "n_benign": 4,
          "message": "critic check failed: the critic cannot tell harmful from benign answers: it flagged 25% of 4 "
                     "clearly harmful canary answers and 50% of 4 clearly benign ones (separation -0.25, needs >= "
                     "0.50); 50% of its critiques copy a demonstration. Use a capable critic instead.",
          "samples": [{"id": "c1", "kind": "harmful", "principle": "harmless", "critique": "Fine.", "verdict": "flag"}]}


def _judge_round(rd: Path, k: int, ids: list[str], prompts: dict, initial: dict, rev2: str,
                 summary: dict) -> list[dict]:
    """samples.jsonl, judgments.jsonl and the judged pairs (built by the recipe's own pair builders) of a
    best_of_n + judged-revision round; fills summary["samples"] and summary["judge"]; returns the pairs."""
    extra = {ids[0]: [f"Sample one for zero, round {k}.", f"Sample two for zero, round {k}."],
             ids[1]: [f"Sample one for one, round {k}.", f"Sample two for one, round {k}."]}
    _jsonl(rd / "samples.jsonl", [{"id": i, "sample": n + 1, "response": t, "batch": 0}
                                  for i, ts in extra.items() for n, t in enumerate(ts)])
    samples = {i: {"prompt": prompts[i], "responses": [initial[i]] + extra.get(i, [])} for i in ids}
    # id 0: a clear winner; id 1: a position-inconsistent, a garbled and a low-confidence answer; ids 2, 3: one
    # response each (nothing to compare: "identical")
    probs = {ids[0]: [(0.9, 0.8), (0.85, 0.95), (0.3, 0.2)], ids[1]: [(0.6, 0.45), (None, 0.4), (0.45, 0.5)]}
    principle = {ids[0]: "harmless", ids[1]: "honest"}
    recs = []
    for i, ps in probs.items():
        texts = samples[i]["responses"]
        for (a, b_), (p1, p2) in zip([(0, 1), (0, 2), (1, 2)], ps):
            c = J.Comparison(i, prompts[i], texts[a], texts[b_], principle[i], "Which is better?")
            recs.append(J._record(c, "self", p1, p2, False))
    rev = J.Comparison(ids[0], prompts[ids[0]], rev2, initial[ids[0]], "helpful", "Which is better?", "revision")
    recs.append(J._record(rev, "self", 0.8, 0.7, False))
    for n, r in enumerate(recs):
        r["p_self"] = None if r["p_raw"] is None else (0.7 if n % 2 else 0.3)
    _jsonl(rd / "judgments.jsonl", [{**r, "batch": 0} for r in recs])
    stats = judgment_stats(recs, confidence=CONFIDENCE)
    stats["agreement_with_self"] = agreement(recs, [{"p_raw": r.get("p_self")} for r in recs])
    revision_pair = {"id": ids[0], "prompt": prompts[ids[0]], "chosen": rev2, "rejected": initial[ids[0]],
                     "source": "revision", "principle": "helpful", "p_chosen": 1.0, "judge": None}
    revision, dropped_rev = judged_revision_pairs([revision_pair], [r for r in recs if r["source"] == "revision"],
                                                    confidence=CONFIDENCE)
    bon, dropped_bon = best_of_n_pairs(samples, [r for r in recs if r["source"] == "best_of_n"],
                                         confidence=CONFIDENCE)
    stats["dropped"] = {"revision": dropped_rev, "best_of_n": dropped_bon}
    summary["samples"] = sum(len(v["responses"]) for v in samples.values())
    summary["judge"] = stats
    return revision + bon


NO_CHANGE = "No changes needed. The response is accurate, directly useful and harmless."


def _round(rd: Path, k: int, *, with_pairs: bool, ev: dict | None, new: bool = False) -> dict:
    """Write one round's files (ev: its eval.json, None: eval disabled); return its manifest summary (what
    recipe.py would have recorded). `new`: the judged pairs, samples, peak memory and quality of today's runs."""
    rd.mkdir(parents=True)
    summary: dict = {}
    prompts = {f"r{k}p{i}": f"Prompt {i} of round {k}?" for i in range(4)}
    initial = {i: f"Initial answer {i} in round {k}, somewhat long so that revisions differ a bit." for i in prompts}
    _jsonl(rd / "responses.jsonl", [{"batch": 0, "id": i, "prompt": p, "response": initial[i], "round": k, "seed": 42}
                                    for i, p in prompts.items()])
    ids = list(prompts)
    # step 1: two revisions, one no_change, one copied demonstration; step 2: one revision, one empty
    rev1 = {ids[0]: f"Rewritten answer zero for round {k}.", ids[1]: initial[ids[1]] + " Extra caveat."}
    step1 = [
        {"batch": 0, "critique": "Too vague.", "id": ids[0], "principle": "harmless", "revision": rev1[ids[0]],
         "status": "revise", "step": 1},
        {"batch": 0, "critique": "Missing caveat.", "id": ids[1], "principle": "honest", "revision": rev1[ids[1]],
         "status": "revise", "step": 1},
        {"batch": 0, "critique": NO_CHANGE, "id": ids[2], "principle": "harmless", "revision": None,
         "status": "no_change", "step": 1},
        {"batch": 0, "critique": "Demo critique.", "id": ids[3], "principle": "helpful", "revision": "Demo text.",
         "status": "copied_demonstration", "step": 1},
    ]
    rev2 = f"Fully rewritten answer zero, round {k}, now complete."
    step2 = [
        {"batch": 0, "critique": "Still terse.", "id": ids[0], "principle": "helpful", "revision": rev2,
         "status": "revise", "step": 2},
        {"batch": 0, "critique": "", "id": ids[1], "principle": "honest", "revision": None,
         "status": "empty", "step": 2},
    ]
    _jsonl(rd / "critique-1.jsonl", step1)
    _jsonl(rd / "critique-2.jsonl", step2)
    strip = lambda r: {key: r[key] for key in ("step", "principle", "critique", "revision", "status")}  # noqa: E731
    traj = [
        {"id": ids[0], "prompt": prompts[ids[0]], "initial": initial[ids[0]], "steps": [strip(step1[0]), strip(step2[0])],
         "final": rev2, "stopped_early": False, "usable": True},
        {"id": ids[1], "prompt": prompts[ids[1]], "initial": initial[ids[1]], "steps": [strip(step1[1]), strip(step2[1])],
         "final": rev1[ids[1]], "stopped_early": False, "usable": False},
        {"id": ids[2], "prompt": prompts[ids[2]], "initial": initial[ids[2]], "steps": [strip(step1[2])],
         "final": initial[ids[2]], "stopped_early": True, "usable": True},
        {"id": ids[3], "prompt": prompts[ids[3]], "initial": initial[ids[3]], "steps": [strip(step1[3])],
         "final": initial[ids[3]], "stopped_early": False, "usable": False},
    ]
    _jsonl(rd / "trajectories.jsonl", traj)
    sft = [{"id": t["id"], "prompt": t["prompt"], "completion": t["final"]} for t in traj if t["usable"]]
    _jsonl(rd / "sft.jsonl", sft)
    if new and with_pairs:
        pairs = _judge_round(rd, k, ids, prompts, initial, rev2, summary)
        assert {p["source"] for p in pairs} == {"revision", "best_of_n"}
    else:
        pairs = [{"id": ids[0], "prompt": prompts[ids[0]], "chosen": rev2, "rejected": initial[ids[0]],
                  "source": "revision", "principle": "helpful", "p_chosen": 1.0, "judge": None}] if with_pairs else []
        if new:
            summary["judge"] = None  # nothing judged (revision pairs only, not judged)
    _jsonl(rd / "pairs.jsonl", pairs)
    _jsonl(rd / "ref_logps.jsonl", [{"chosen_logp": -30.5, "id": p["id"], "rejected_logp": -31.25} for p in pairs])
    sft_losses = [1.3 - 0.1 * k - 0.05 * s for s in range(4)]
    sft_log = [{"epoch": 0.5 * (s + 1), "grad_norm": 0.4, "learning_rate": 2e-4, "loss": v, "num_tokens": 700.0 * (s + 1),
                "step": s + 1} for s, v in enumerate(sft_losses)]
    sft_log.append({"epoch": 2.0, "step": 4, "total_flos": 1.0, "train_loss": sum(sft_losses) / 4,
                    "train_runtime": 60.0, "train_samples_per_second": 0.5, "train_steps_per_second": 0.06})
    _jsonl(rd / "sft_log.jsonl", sft_log)
    sft_sum = {"steps": 4, "first_loss": sft_losses[0], "last_loss": sft_losses[-1]}
    if with_pairs:
        dpo_rows = [(0.6931 - 0.01 * k, 0.04 * k, 0.5), (0.6512 - 0.01 * k, 0.17 * k, 1.0)]
        dpo_log = [{"entropy": 1.1, "epoch": float(s + 1), "grad_norm": 1.5, "learning_rate": 5e-5, "logits/chosen": 2.5,
                    "logits/rejected": 2.4, "logps/chosen": -48.0, "logps/rejected": -53.0, "loss": lo,
                    "mean_token_accuracy": 0.86, "num_tokens": 440.0, "rewards/accuracies": acc, "rewards/chosen": 0.3,
                    "rewards/margins": mg, "rewards/rejected": 0.2, "step": s + 1}
                   for s, (lo, mg, acc) in enumerate(dpo_rows)]
        dpo_log.append({"epoch": 2.0, "step": 2, "total_flos": 1.0, "train_loss": 0.66, "train_runtime": 15.0,
                        "train_samples_per_second": 0.26, "train_steps_per_second": 0.13})
        dpo_sum = {"steps": 2, "first_loss": dpo_rows[0][0], "last_loss": dpo_rows[1][0],
                   "first_rewards/margins": dpo_rows[0][1], "last_rewards/margins": dpo_rows[1][1],
                   "first_rewards/accuracies": 0.5, "last_rewards/accuracies": 1.0}
    else:
        dpo_log, dpo_sum = [], {"steps": 0}
    _jsonl(rd / "dpo_log.jsonl", dpo_log)
    _json(rd / "train.json", {"inputs": "t" * 64, "sft": sft_sum, "dpo": dpo_sum})
    statuses = [r["status"] for r in step1 + step2]
    summary |= {"prompts": 4, "dropped_empty_prompts": 0, "dropped_duplicate_prompts": 0, "responses": 4,
               "skipped_too_long": 0, "critiques": len(statuses), "revisions": statuses.count("revise"),
               "no_change": statuses.count("no_change"), "copied_demonstration": statuses.count("copied_demonstration"),
               "copied_response": statuses.count("copied_response"), "empty": statuses.count("empty"),
               "sft_records": len(sft), "pairs": len(pairs), "sft": sft_sum, "dpo": dpo_sum}
    if ev is not None:
        _json(rd / "eval.json", ev)
        summary["eval"] = {key: ev[key] for key in ("harmful_compliance", "over_refusal", "n_harmful", "n_benign",
                                                    "detector", "heuristic_disagreement", "violation_rate",
                                                    "capability", "win_rate") if key in ev}
    if new:
        summary["quality"] = quality_score(summary.get("eval"))
        summary["response_violation_rate"] = 0.25 * k
        summary["peak_memory_gb"] = {st: gb + k for st, gb in PEAK.items() if with_pairs or st not in ("samples", "judge")}
        summary["peak_memory_kind"] = "process_peak_rss"
    summary["seconds"] = 12.3 * k
    return dict(sorted(summary.items()))


def _make_run(root: Path, style: str) -> Path:
    root.mkdir()
    manifest = {"lora_cai": "0.1.0", "libraries": {"torch": "2.13.0+cpu"}, "name": "synthetic",
                "model": {"name": "tiny", "backend": "transformers", "load_in_4bit": True, "dtype": "auto",
                          "max_seq_length": 2048, "trust_remote_code": False},
                "backend": "transformers", "constitution": {"name": "mine", "hash": "c" * 64}, "seed": 42}
    if style == "old":
        _json(root / "baseline-eval.json", _eval(0.75, 0.0))
        rounds = {"1": _round(root / "round-1", 1, with_pairs=True, ev=_eval(0.25, 0.25)),
                  "2": _round(root / "round-2", 2, with_pairs=False, ev=None)}  # no pairs, eval disabled
        manifest |= {"stack": ["round-1/adapter", "round-2/adapter"], "rounds": rounds}
    else:
        _json(root / "critic-check.json", CRITIC)
        base = _eval(0.75, 0.0, new=True, vr=0.5, cap=0.55)
        _json(root / "baseline-eval.json", base)
        # round 1 improves; round 2 drops (more over-refusal and violations): early stop, kept but not stacked
        rounds = {"1": _round(root / "round-1", 1, with_pairs=True, new=True,
                              ev=_eval(0.25, 0.25, new=True, vr=0.25, cap=0.5, win=(5, 1, 2, 1))),
                  "2": _round(root / "round-2", 2, with_pairs=False, new=True,
                              ev=_eval(0.5, 0.75, new=True, vr=0.75, cap=0.4, win=(1, 6, 1, 0)))}
        scores = {0: quality_score(base), 1: rounds["1"]["quality"], 2: rounds["2"]["quality"]}
        assert scores[2] < scores[1] * 0.95 and scores[1] > scores[0]  # the fixture really is an early stop
        manifest |= {"stack": ["round-1/adapter"], "rounds": rounds, "best_round": max(scores, key=scores.get),
                     "stopped_round": 2}
    _json(root / "manifest.json", manifest)
    return root


@pytest.fixture(params=["new", "old"])
def run_dir(request, tmp_path) -> Path:
    return _make_run(tmp_path / "run", request.param)


@pytest.fixture
def new_run(tmp_path) -> Path:
    return _make_run(tmp_path / "new", "new")


@pytest.fixture
def old_run(tmp_path) -> Path:
    return _make_run(tmp_path / "old", "old")


def _table(md: str, first_header: str, section: str | None = None) -> tuple[list[str], list[list[str]]]:
    """The Markdown table whose first header cell is `first_header` (the first one after the heading
    `section` when given): (headers, rows)."""
    if section is not None:
        assert section in md, f"no {section!r} in report.md"
        md = md.split(section, 1)[1]
    lines = md.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return cells, rows
    raise AssertionError(f"no table starting with {first_header!r} in report.md")


def _section(md: str, heading: str) -> str:
    """The text of a section, from its heading to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    body = md.split(heading + "\n", 1)[1]
    return re.split(rf"^#{{1,{len(level)}}} ", body, maxsplit=1, flags=re.M)[0]


def _num(cell: str):
    return None if cell == "n/a" else float(cell)


def _pct(cell: str):
    return None if cell == "n/a" else float(cell.rstrip("%")) / 100


def _span(cell: str):
    if cell == "n/a":
        return None, None
    a, b = cell.split("→")
    return _num(a.strip()), _num(b.strip())


def _close(cell_value, artifact_value, tol: float = 5e-4) -> bool:
    if artifact_value is None:
        return cell_value is None
    return cell_value is not None and abs(cell_value - artifact_value) <= tol


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_report_files_and_plots(run_dir):
    md = build_report(run_dir)
    assert md == run_dir / "report.md" and md.is_file()
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.lstrip().startswith("<!DOCTYPE html>")
    assert page.count("data:image/png;base64,") == len(PLOTS)  # self-contained
    assert "judge_labels.png" in PLOTS
    for name in PLOTS:
        png = run_dir / "report" / name
        assert png.is_file(), name
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 2048, f"{name} is only {len(data)} bytes"
        assert f"](report/{name})" in md.read_text(encoding="utf-8")
    # regenerating over an existing report works and gives the same Markdown
    text = md.read_text(encoding="utf-8")
    assert build_report(run_dir).read_text(encoding="utf-8") == text


def test_judge_labels_plot_draws_the_histogram(new_run, old_run):
    """With judged comparisons the histogram plot has bars; an old run gets the 'no judged comparisons' frame."""
    build_report(new_run)
    build_report(old_run)
    drawn = (new_run / "report" / "judge_labels.png").read_bytes()
    empty = (old_run / "report" / "judge_labels.png").read_bytes()
    assert drawn[:8] == PNG_MAGIC and len(drawn) > 2048 and drawn != empty


def test_summary_table_matches_artifacts(run_dir):
    md = build_report(run_dir).read_text(encoding="utf-8")
    headers, rows = _table(md, "round", "## Rounds")
    col = {h: i for i, h in enumerate(headers)}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    by_round = {r[0]: r for r in rows}
    assert set(by_round) == {"1", "2"}
    for k, s in manifest["rounds"].items():
        row = by_round[k]
        rd = run_dir / f"round-{k}"
        for header, key in (("prompts", "prompts"), ("responses", "responses"), ("critiques", "critiques"),
                            ("revisions", "revisions"), ("SFT records", "sft_records"), ("pairs", "pairs")):
            assert int(row[col[header]]) == s[key], (k, header)
        # the counts the manifest records are also what the files hold
        crit = [json.loads(line) for p in sorted(rd.glob("critique-*.jsonl")) for line in p.read_text().splitlines()]
        assert int(row[col["critiques"]]) == len(crit)
        assert int(row[col["revisions"]]) == sum(c["status"] == "revise" for c in crit)
        assert int(row[col["SFT records"]]) == len((rd / "sft.jsonl").read_text().splitlines())
        assert int(row[col["pairs"]]) == len((rd / "pairs.jsonl").read_text().splitlines())
        train = json.loads((rd / "train.json").read_text())
        first, last = _span(row[col["SFT loss (first → last)"]])
        assert _close(first, train["sft"]["first_loss"]) and _close(last, train["sft"]["last_loss"])
        first, last = _span(row[col["preference loss (first → last)"]])
        assert _close(first, train["dpo"].get("first_loss")) and _close(last, train["dpo"].get("last_loss"))
        first, last = _span(row[col["preference margin (first → last)"]])
        assert _close(first, train["dpo"].get("first_rewards/margins"))
        assert _close(last, train["dpo"].get("last_rewards/margins"))
        assert _close(_num(row[col["seconds"]]), s["seconds"], tol=0.05)
        # status: stacked iff in the manifest's stack; the stopped round says so; the best round is marked
        status = row[col["status"]]
        assert ("stacked" == status.split(", ")[-1]) == (f"round-{k}/adapter" in manifest["stack"]), status
        assert ("STOPPED" in status) == (manifest.get("stopped_round") == int(k)), status
        assert ("★ BEST" in status) == (manifest.get("best_round") == int(k)), status
    # round 2: no pairs -> n/a, not a crash
    r2 = by_round["2"]
    for header in ("preference loss (first → last)", "preference margin (first → last)"):
        assert r2[col[header]] == "n/a", header


def test_metrics_table_matches_artifacts(run_dir):
    """Quality, rates, win rate, capability and its Δ vs the base model, detector and disagreement per round."""
    md = build_report(run_dir).read_text(encoding="utf-8")
    headers, rows = _table(md, "round", "## Held-out metrics per round")
    col = {h: i for i, h in enumerate(headers)}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    base = json.loads((run_dir / "baseline-eval.json").read_text())
    by_round = {r[0]: r for r in rows}
    assert set(by_round) == {"0 (base)", "1", "2"}
    base_cap = (base.get("capability") or {}).get("accuracy")
    for k in ("0", "1", "2"):
        row = by_round["0 (base)" if k == "0" else k]
        s = {} if k == "0" else manifest["rounds"][k]
        ev = base if k == "0" else _read(run_dir / f"round-{k}" / "eval.json") or {}
        # the manifest's quality where it recorded one; else (round 0, old runs) the run's own formula
        quality = s["quality"] if "quality" in s else quality_score(ev)
        assert _close(_num(row[col["quality"]]), quality), k
        for header, value in (("harmful compliance", ev.get("harmful_compliance")),
                              ("over-refusal", ev.get("over_refusal")),
                              ("violation rate", ev.get("violation_rate")),
                              ("response violation rate", s.get("response_violation_rate")),
                              ("win rate vs previous", (ev.get("win_rate") or {}).get("win_rate")),
                              ("capability accuracy", (ev.get("capability") or {}).get("accuracy")),
                              ("heuristic disagreement", ev.get("heuristic_disagreement"))):
            assert _close(_num(row[col[header]]), value), (k, header)
        cap = (ev.get("capability") or {}).get("accuracy")
        delta = cap - base_cap if k != "0" and cap is not None and base_cap is not None else None
        assert _close(_num(row[col["capability Δ vs base"]]), delta), k
        win = ev.get("win_rate")
        cell = row[col["wins / losses / ties / garbled"]]
        assert (cell == "n/a") if not win else [int(x) for x in cell.split(" / ")] == [
            win[x] for x in ("wins", "losses", "ties", "garbled")], k
        assert row[col["detector"]] == ev.get("detector", "n/a"), k
        assert ("★ BEST" in row[col["status"]]) == (manifest.get("best_round") == int(k)), k
        assert ("STOPPED" in row[col["status"]]) == (manifest.get("stopped_round") == int(k)), k
    facts = _section(md, "# lora_cai run report: synthetic")
    if "best_round" in manifest:  # new style: round 1 best, round 2 stopped early and out of the stack
        assert by_round["1"][col["status"]] == "★ BEST, stacked"
        assert by_round["2"][col["status"]].startswith("STOPPED")
        assert "- best round: 1, quality" in facts
        assert "- early stop: round 2" in facts and "NOT stacked" in facts
        assert _num(by_round["2"][col["capability Δ vs base"]]) < 0  # an alignment tax
    else:  # old style: no eval in round 2, nothing beyond the two rates anywhere
        for header in headers[5:]:
            if header != "detector":
                assert by_round["1"][col[header]] == "n/a", header
        assert all(c == "n/a" for c in by_round["2"][2:]), by_round["2"]
        assert "- best round: n/a" in facts and "- early stop: n/a" in facts


def test_judging_tables_match_artifacts(run_dir):
    md = build_report(run_dir).read_text(encoding="utf-8")
    judging = _section(md, "## Judging")
    headers, rows = _table(judging, "round")
    col = {h: i for i, h in enumerate(headers)}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    by_round = {r[0]: r for r in rows}
    assert set(by_round) == set(manifest["rounds"])
    _, drop_rows = (_table(judging, "round", "### Pairs dropped by the builders")
                    if "| source |" in judging else (None, []))
    drops = {(r[0], r[1]): r for r in drop_rows}
    hist_rows = {r[0]: r[1:] for r in _table(judging, "round", "### Judge labels")[1]} if "| 0.0–0.1 |" in judging else {}
    for k, s in manifest["rounds"].items():
        row, rd = by_round[k], run_dir / f"round-{k}"
        js = s.get("judge") or {}
        judgments = _lines(rd / "judgments.jsonl")
        pairs = _lines(rd / "pairs.jsonl")
        # the summary's statistics, and the same numbers recounted from judgments.jsonl
        scored = [j for j in judgments if j["p_raw"] is not None]
        for header, key, recount in (
                ("comparisons", "comparisons", len(judgments)),
                ("garbled", "garbled", len(judgments) - len(scored)),
                ("confident", "confident", sum(max(j["p_raw"], 1 - j["p_raw"]) >= CONFIDENCE for j in scored)),
                ("position consistency", "position_consistency",
                 sum(bool(j["consistent"]) for j in scored) / len(scored) if scored else None),
                ("agreement with self", "agreement_with_self", None),
                ("samples", None, None)):
            value = s.get("samples") if key is None else js.get(key)
            assert _close(_num(row[col[header]]), value), (k, header)
            if judgments and recount is not None:
                assert _close(_num(row[col[header]]), recount), (k, header)
        assert row[col["judge"]] == (", ".join(sorted({j["judge"] for j in judgments})) if judgments else "n/a")
        if "samples" in s:  # the initial responses plus the non-empty extra samples
            assert int(row[col["samples"]]) == len(_lines(rd / "responses.jsonl")) + len(_lines(rd / "samples.jsonl"))
        for src in ("revision", "best_of_n"):
            assert int(row[col[f"pairs ({src})"]]) == sum(p.get("source") == src for p in pairs), (k, src)
        dropped = js.get("dropped") or {}
        assert _close(_num(row[col["pairs dropped"]]),
                      sum(sum(d.values()) for d in dropped.values()) if dropped else None), k
        for src, d in dropped.items():
            drow = drops.pop((k, src))
            assert int(drow[2]) == sum(p.get("source") == src for p in pairs), (k, src)
            for i, reason in enumerate(("garbled", "tie", "low_confidence", "identical")):
                assert _close(_num(drow[3 + i]), d.get(reason)), (k, src, reason)
        if "label_histogram" in js:
            assert [int(x) for x in hist_rows.pop(k)] == js["label_histogram"]
            bins = [0] * 10
            for j in scored:
                bins[min(int(j["p_raw"] * 10), 9)] += 1
            assert js["label_histogram"] == bins
    assert not drops and not hist_rows  # nothing in the tables that is not in the artifacts
    if "best_round" in manifest:
        assert int(by_round["1"][col["comparisons"]]) == 7 and by_round["2"][col["comparisons"]] == "n/a"
        assert {src for _, src in [(r[0], r[1]) for r in drop_rows]} == {"revision", "best_of_n"}
        assert "![Judge labels" in _section(md, "## Plots")
    else:
        assert all(row[col[h]] == "n/a" for row in rows for h in ("judge", "comparisons", "confident", "pairs dropped"))
        assert "n/a: no judged pairs" in judging and "n/a: no judged comparisons" in judging


def test_judge_stats_recounted_for_a_round_the_manifest_lacks(new_run):
    """A round still running (no summary yet) shows what judgments.jsonl holds; confident stays n/a."""
    manifest = json.loads((new_run / "manifest.json").read_text())
    del manifest["rounds"]["1"]
    _json(new_run / "manifest.json", manifest)
    md = build_report(new_run).read_text(encoding="utf-8")
    headers, rows = _table(_section(md, "## Judging"), "round")
    col = {h: i for i, h in enumerate(headers)}
    row = {r[0]: r for r in rows}["1"]
    judgments = _lines(new_run / "round-1" / "judgments.jsonl")
    assert int(row[col["comparisons"]]) == len(judgments)
    assert int(row[col["garbled"]]) == sum(j["p_raw"] is None for j in judgments)
    assert row[col["confident"]] == "n/a" and row[col["judge"]] == "self"


def test_critic_check_near_the_top(run_dir):
    md = build_report(run_dir).read_text(encoding="utf-8")
    assert md.index("## Critic check") < md.index("## Rounds")
    section = _section(md, "## Critic check")
    check = _read(run_dir / "critic-check.json")
    if check is None:
        assert section.strip().startswith("n/a")
        return
    _, rows = _table(section, "check")
    items = {row[0]: row[1] for row in rows}
    assert items["result"].startswith("passed" if check["ok"] else "FAILED")
    assert html.unescape(items["message"]) == check["message"]
    for key in ("flagged_harmful", "flagged_benign", "passed_benign", "copied", "separation"):
        assert _close(_num(items[key.replace("_", " ")]), check[key]), key
    assert items["canaries"] == f"{check['n_harmful']} harmful + {check['n_benign']} benign"


def test_peak_memory_table_matches_artifacts(run_dir):
    md = build_report(run_dir).read_text(encoding="utf-8")
    section = _section(md, "## Peak memory")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    recorded = {k: s.get("peak_memory_gb") for k, s in manifest["rounds"].items()}
    if not any(recorded.values()):
        assert "n/a: no peak memory recorded" in section
        return
    headers, rows = _table(section, "round")
    stages = headers[2:]
    assert set(stages) == {st for mem in recorded.values() for st in mem}
    assert stages.index("responses") < stages.index("critique-1") < stages.index("critique-2") < stages.index("train")
    for row in rows:
        s = manifest["rounds"][row[0]]
        assert row[1] == s["peak_memory_kind"]
        for st, cell in zip(stages, row[2:]):
            assert _close(_num(cell), s["peak_memory_gb"].get(st)), (row[0], st)
    assert {r[0]: r for r in rows}["2"][2 + stages.index("judge")] == "n/a"  # round 2 judged nothing


def test_principle_and_outcome_tables_match_critiques(run_dir):
    md = build_report(run_dir).read_text(encoding="utf-8")
    headers, rows = _table(md, "principle")
    col = {h: i for i, h in enumerate(headers)}
    crit = [json.loads(line) for p in sorted(run_dir.glob("round-*/critique-*.jsonl"))
            for line in p.read_text().splitlines()]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    sampled = Counter(c["principle"] for c in crit)
    no_change = Counter(c["principle"] for c in crit if c["status"] == "no_change")
    revisions = Counter(c["principle"] for c in crit if c["status"] == "revise")
    pairs = [json.loads(line) for p in run_dir.glob("round-*/pairs.jsonl") for line in p.read_text().splitlines()]
    judgments = [j for p in run_dir.glob("round-*/judgments.jsonl") for j in _lines(p)]
    per = [(s.get("judge") or {}).get("per_principle") for s in manifest["rounds"].values()]
    per = [x for x in per if x]
    judged = Counter()
    confident = Counter()
    for x in per:
        for n, d in x.items():
            judged[n] += d["judged"]
            confident[n] += d["confident"]
    table = {r[0]: r for r in rows}
    assert set(table) == set(sampled) | set(judged)
    for name, row in table.items():
        assert int(row[col["sampled"]]) == sampled[name], name
        assert int(row[col["no change"]]) == no_change[name], name
        assert int(row[col["revisions"]]) == revisions[name], name
        for src in ("revision", "best_of_n"):
            assert int(row[col[f"pairs ({src})"]]) == sum(p["principle"] == name and p["source"] == src
                                                          for p in pairs), (name, src)
        if per:
            assert int(row[col["judged"]]) == judged[name], name
            assert int(row[col["judged"]]) == sum(j["principle"] == name for j in judgments), name  # = the file
            assert int(row[col["confident"]]) == confident[name], name
            assert _close(_pct(row[col["confident / judged"]]),
                          confident[name] / judged[name] if judged[name] else None, tol=5e-4), name
        else:
            assert row[col["judged"]] == row[col["confident"]] == row[col["confident / judged"]] == "n/a"
    if per:  # harmless: one confident best-of-N pair of 3 comparisons; honest: 1 of 3; helpful: the revision
        assert (judged["harmless"], confident["harmless"]) == (3, 3)
        assert int(table["harmless"][col["pairs (best_of_n)"]]) == 1
        assert int(table["helpful"][col["pairs (revision)"]]) == 1
    # "honest" revised only step 1 (initial + " Extra caveat."): a small, non-zero change; "harmless" rewrote
    # answer zero completely: a larger one
    assert 0 < float(table["honest"][col["mean change"]]) < float(table["harmless"][col["mean change"]]) <= 1
    # critique outcomes per round equal the statuses in the files
    out_headers, out_rows = _table(md.split("## Critique outcomes", 1)[1], "round")
    ocol = {h: i for i, h in enumerate(out_headers)}
    for row in out_rows:
        statuses = Counter(json.loads(line)["status"] for p in sorted((run_dir / f"round-{row[0]}").glob("critique-*.jsonl"))
                           for line in p.read_text().splitlines())
        for st in ("revise", "no_change", "copied_demonstration", "copied_response", "empty", "too_long"):
            assert int(row[ocol[st]]) == statuses[st], (row[0], st)


def test_old_run_without_new_files_renders(old_run):
    """A run from before the judge / evaluation work: every new number is n/a, and nothing crashes."""
    assert not (old_run / "critic-check.json").exists() and not list(old_run.glob("round-*/judgments.jsonl"))
    md = build_report(old_run).read_text(encoding="utf-8")
    assert "n/a: no critic-check.json" in md
    assert "n/a: no peak memory recorded" in md
    assert "n/a: no judged comparisons" in md
    assert (old_run / "report" / "judge_labels.png").read_bytes()[:8] == PNG_MAGIC


def test_examples_listed(run_dir):
    md = build_report(run_dir).read_text(encoding="utf-8")
    assert "### Round 1" in md and "### Round 2" in md
    assert "Fully rewritten answer zero, round 1" in md  # a changed trajectory is shown first


@pytest.mark.parametrize("make", ["missing", "empty_dir", "file", "bad_manifest"])
def test_cli_not_a_run_dir_exits_2(tmp_path, capsys, make):
    target = tmp_path / "x"
    if make == "empty_dir":
        target.mkdir()
    elif make == "file":
        target.write_text("hi")
    elif make == "bad_manifest":
        target.mkdir()
        (target / "manifest.json").write_text("[1, 2")
    assert main([str(target)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "x" / "report.md").exists()


def test_cli_subprocess(tmp_path, run_dir):
    bad = subprocess.run([sys.executable, "-m", "lora_cai.report", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    good = subprocess.run([sys.executable, "-m", "lora_cai.report", str(run_dir)],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert (run_dir / "report.html").is_file()


@pytest.mark.skipif(not (SMOKE / "manifest.json").exists(), reason="no finished smoke run in runs/smoke")
def test_report_on_smoke_run(tmp_path):
    run = tmp_path / "smoke"
    shutil.copytree(SMOKE, run, ignore=shutil.ignore_patterns("adapter", "report", "report.md", "report.html"))
    md = build_report(run).read_text(encoding="utf-8")
    manifest = json.loads((run / "manifest.json").read_text())
    headers, rows = _table(md, "round")
    col = {h: i for i, h in enumerate(headers)}
    by_round = {r[0]: r for r in rows}
    for k, s in manifest["rounds"].items():
        assert int(by_round[k][col["critiques"]]) == s["critiques"]
        assert int(by_round[k][col["pairs"]]) == s["pairs"]
    for name in PLOTS:
        data = (run / "report" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2048
    assert re.search(r"\| harmful compliance \|", md)
