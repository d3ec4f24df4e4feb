"""Prompt sources: local JSONL/CSV/Parquet files, built-in sets and Hub datasets, as clean prompt records."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

BUILTIN_DIR = Path(__file__).parent / "prompts"


def prompt_id(text: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of the sha256 of its text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class PromptSet:
    records: list[dict]  # {id, prompt, source, ...extra columns kept as metadata}
    source: str
    dropped_empty: int = 0
    dropped_duplicate: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.records]


# Files in prompts/ that are not prompt sets: the evaluation reads them (lora_cai/evaluation.py).
NOT_PROMPT_SETS = {"capability": "the multiple-choice set of the capability probe (eval.capability)",
                   "canary": "the critic check's canary prompts and answers"}


def builtin_sets() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl") if p.stem not in NOT_PROMPT_SETS)


# Sources ending like these are local files (read, or reported missing/unsupported right away), never Hub
# dataset ids: a typo such as `prompts.txt` must not wait on the Hub (import `datasets`, retry the network).
_FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv", ".yaml", ".yml", ".xml", ".html", ".md",
                  ".xlsx", ".xls", ".arrow", ".gz", ".bz2", ".xz", ".zip", ".tar"}


def _read_rows(source: str, where: str, split: str) -> list[dict]:
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        path = BUILTIN_DIR / f"{name}.jsonl"
        if name in NOT_PROMPT_SETS:
            raise UserError(f"{where}: builtin:{name} is {NOT_PROMPT_SETS[name]}, not a prompt set "
                            f"(prompt sets: {', '.join('builtin:' + n for n in builtin_sets())})")
        if not path.is_file():
            raise UserError(f"{where}: unknown built-in prompt set '{name}' (available: {', '.join(builtin_sets())})")
        return _read_file(path, where)
    path = Path(source).expanduser()
    if path.suffix.lower() in _FILE_SUFFIXES or path.exists() or source.startswith((".", "/", "~")):
        if not path.exists():
            raise UserError(f"{where}: prompt file '{source}' not found (give a .jsonl/.csv/.parquet path, "
                            f"a built-in set like builtin:smoke, or a Hub dataset id)")
        return _read_file(path, where)
    return _read_hub(source, where, split)


def _read_file(path: Path, where: str) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix in {".jsonl", ".json"}:
            text = path.read_text(encoding="utf-8")
            if suffix == ".json" and text.lstrip().startswith("["):
                rows = json.loads(text)
            else:
                rows = []
                for n, line in enumerate(text.splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{where}: {path}: line {n} is not valid JSON ({e.msg})") from None
            if not all(isinstance(r, dict) for r in rows):
                raise UserError(f"{where}: {path}: every line must be a JSON object like {{\"prompt\": \"...\"}}")
            return rows
        if suffix == ".csv":
            import csv

            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except UnicodeDecodeError:
        raise UserError(f"{where}: {path}: not a UTF-8 text file") from None
    except UserError:
        raise
    except Exception as e:  # pyarrow's and csv's own errors: the file is not what its name says
        raise UserError(f"{where}: {path}: cannot be read as {suffix[1:]} ({type(e).__name__}: {e})") from None
    raise UserError(f"{where}: {path}: unsupported file type '{suffix}' (use .jsonl, .csv or .parquet)")


def _read_hub(dataset_id: str, where: str, split: str) -> list[dict]:
    try:
        from datasets import load_dataset

        ds = load_dataset(dataset_id, split=split)
    except Exception as e:
        raise UserError(f"{where}: cannot load Hub dataset '{dataset_id}' split '{split}' "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"check the id, the network, or use a local file") from None
    return [dict(r) for r in ds]


def load_prompts(source: str, *, column: str = "prompt", split: str = "train", limit: int | None = None,
                 where: str = "data.prompts") -> PromptSet:
    """Read prompts, drop empty and duplicate ones (counted), keep the first `limit`.

    `where` names the recipe key in error messages.
    """
    rows = _read_rows(source, where, split)
    if not rows:
        raise UserError(f"{where}: '{source}' holds no prompts (add rows with a '{column}' field)")
    if column not in rows[0]:
        cols = ", ".join(sorted(rows[0].keys()))
        raise UserError(f"{where}: '{source}' has no column '{column}' (columns: {cols}); "
                        f"set data.prompt_column to the right one")
    records, seen, empty, dup = [], set(), 0, 0
    for row in rows:
        text = row.get(column)
        if not isinstance(text, str) or not text.strip():
            empty += 1
            continue
        text = text.strip()
        pid = prompt_id(text)
        if pid in seen:
            dup += 1
            continue
        seen.add(pid)
        meta = {k: v for k, v in row.items() if k != column and isinstance(v, (str, int, float, bool))}
        records.append({**meta, "id": pid, "prompt": text, "source": source})
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise UserError(f"{where}: every prompt in '{source}' is empty (column '{column}')")
    return PromptSet(records=records, source=source, dropped_empty=empty, dropped_duplicate=dup)
