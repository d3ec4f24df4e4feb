"""Reading a run directory for the report: manifest, rounds and their stage files."""

from __future__ import annotations

import json
from pathlib import Path

from lora_cai.core.layout import BASELINE_EVAL, CRITIC_CHECK, MANIFEST, round_dir, round_of
from lora_cai.errors import UserError


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
        "principles": _read_json(rd / "principles.json"),
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
