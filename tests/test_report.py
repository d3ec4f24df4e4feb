"""The run report: built from a synthetic, schema-faithful two-round run directory (files written directly,
shaped like runs/smoke), its tables checked against the artifacts, its plots checked as real PNGs; plus the
one-line exit-2 error for a directory that is not a run, and (when present) the real smoke run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lora_cai.report import PLOTS, build_report, main

SMOKE = Path(__file__).resolve().parents[1] / "runs" / "smoke"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")


def _json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def _eval(hc: float, orr: float) -> dict:
    return {"inputs": "e" * 64, "harmful_compliance": hc, "over_refusal": orr, "n_harmful": 2, "n_benign": 2,
            "detector": "refusal-phrase heuristic",
            "samples": [{"id": "h1", "set": "harmful", "prompt": "p", "answer": "a", "refusal": False}]}


NO_CHANGE = "No changes needed. The response is accurate, directly useful and harmless."


def _round(rd: Path, k: int, *, with_pairs: bool, with_eval: bool) -> dict:
    """Write one round's files; return its manifest summary (what recipe.py would have recorded)."""
    rd.mkdir(parents=True)
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
    pairs = [{"id": ids[0], "prompt": prompts[ids[0]], "chosen": rev2, "rejected": initial[ids[0]],
              "source": "revision", "principle": "helpful", "p_chosen": 1.0, "judge": None}] if with_pairs else []
    _jsonl(rd / "pairs.jsonl", pairs)
    _jsonl(rd / "ref_logps.jsonl", [{"chosen_logp": -30.5, "id": ids[0], "rejected_logp": -31.25}] if with_pairs else [])
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
    summary = {"prompts": 4, "dropped_empty_prompts": 0, "dropped_duplicate_prompts": 0, "responses": 4,
               "skipped_too_long": 0, "critiques": len(statuses), "revisions": statuses.count("revise"),
               "no_change": statuses.count("no_change"), "copied_demonstration": statuses.count("copied_demonstration"),
               "copied_response": statuses.count("copied_response"), "empty": statuses.count("empty"),
               "sft_records": len(sft), "pairs": len(pairs), "sft": sft_sum, "dpo": dpo_sum}
    if with_eval:
        ev = _eval(0.5 - 0.25 * k, 0.25 * k)
        _json(rd / "eval.json", ev)
        summary["eval"] = {key: ev[key] for key in ("harmful_compliance", "over_refusal", "n_harmful", "n_benign",
                                                    "detector")}
    summary["seconds"] = 12.3 * k
    return summary


@pytest.fixture
def run_dir(tmp_path) -> Path:
    root = tmp_path / "run"
    root.mkdir()
    _json(root / "baseline-eval.json", _eval(0.75, 0.0))
    rounds = {"1": _round(root / "round-1", 1, with_pairs=True, with_eval=True),
              "2": _round(root / "round-2", 2, with_pairs=False, with_eval=False)}  # no pairs, eval disabled
    _json(root / "manifest.json", {
        "lora_cai": "0.1.0", "libraries": {"torch": "2.13.0+cpu"}, "stack": ["round-1/adapter", "round-2/adapter"],
        "rounds": rounds, "name": "synthetic",
        "model": {"name": "tiny", "backend": "transformers", "load_in_4bit": True, "dtype": "auto",
                  "max_seq_length": 2048, "trust_remote_code": False},
        "backend": "transformers", "constitution": {"name": "mine", "hash": "c" * 64}, "seed": 42})
    return root


def _table(md: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The Markdown table whose first header cell is `first_header`: (headers, rows)."""
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


def _num(cell: str):
    return None if cell == "n/a" else float(cell)


def _span(cell: str):
    if cell == "n/a":
        return None, None
    a, b = cell.split("→")
    return _num(a.strip()), _num(b.strip())


def _close(cell_value, artifact_value, tol: float = 5e-4) -> bool:
    if artifact_value is None:
        return cell_value is None
    return cell_value is not None and abs(cell_value - artifact_value) <= tol


def test_report_files_and_plots(run_dir):
    md = build_report(run_dir)
    assert md == run_dir / "report.md" and md.is_file()
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.lstrip().startswith("<!DOCTYPE html>")
    assert page.count("data:image/png;base64,") == len(PLOTS)  # self-contained
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


def test_summary_table_matches_artifacts(run_dir):
    md = build_report(run_dir).read_text(encoding="utf-8")
    headers, rows = _table(md, "round")
    col = {h: i for i, h in enumerate(headers)}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    base = json.loads((run_dir / "baseline-eval.json").read_text())
    by_round = {r[0]: r for r in rows}
    assert set(by_round) == {"0 (base)", "1", "2"}
    b = by_round["0 (base)"]
    assert _close(_num(b[col["harmful compliance"]]), base["harmful_compliance"])
    assert _close(_num(b[col["over-refusal"]]), base["over_refusal"])
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
        first, last = _span(row[col["DPO loss (first → last)"]])
        assert _close(first, train["dpo"].get("first_loss")) and _close(last, train["dpo"].get("last_loss"))
        first, last = _span(row[col["DPO margin (first → last)"]])
        assert _close(first, train["dpo"].get("first_rewards/margins"))
        assert _close(last, train["dpo"].get("last_rewards/margins"))
        ev = json.loads((rd / "eval.json").read_text()) if (rd / "eval.json").exists() else {}
        assert _close(_num(row[col["harmful compliance"]]), ev.get("harmful_compliance"))
        assert _close(_num(row[col["over-refusal"]]), ev.get("over_refusal"))
        assert _close(_num(row[col["seconds"]]), s["seconds"], tol=0.05)
    # round 2: eval disabled and no pairs -> n/a, not a crash
    r2 = by_round["2"]
    for header in ("harmful compliance", "over-refusal", "DPO loss (first → last)", "DPO margin (first → last)"):
        assert r2[col[header]] == "n/a", header
    assert by_round["1"][col["harmful compliance"]] != "n/a"


def test_principle_and_outcome_tables_match_critiques(run_dir):
    md = build_report(run_dir).read_text(encoding="utf-8")
    headers, rows = _table(md, "principle")
    col = {h: i for i, h in enumerate(headers)}
    crit = [json.loads(line) for p in sorted(run_dir.glob("round-*/critique-*.jsonl"))
            for line in p.read_text().splitlines()]
    sampled = Counter(c["principle"] for c in crit)
    no_change = Counter(c["principle"] for c in crit if c["status"] == "no_change")
    revisions = Counter(c["principle"] for c in crit if c["status"] == "revise")
    pairs = Counter(json.loads(line)["principle"] for p in run_dir.glob("round-*/pairs.jsonl")
                    for line in p.read_text().splitlines())
    table = {r[0]: r for r in rows}
    assert set(table) == set(sampled)
    for name, row in table.items():
        assert int(row[col["sampled"]]) == sampled[name], name
        assert int(row[col["no change"]]) == no_change[name], name
        assert int(row[col["revisions"]]) == revisions[name], name
        assert int(row[col["pairs"]]) == pairs[name], name
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
