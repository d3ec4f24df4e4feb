"""The held-out probe sets besides prompts: the capability multiple-choice set and the critic check's canaries."""

from __future__ import annotations

import json
from pathlib import Path

from lora_cai.errors import UserError, problems

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"


# --------------------------------------------------------------------------------------------------
# Alignment-tax probe: multiple-choice log-likelihood accuracy
# --------------------------------------------------------------------------------------------------

def _read_jsonl(path: Path, label: str) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{label}: not a UTF-8 text file") from None
    except OSError as exc:
        raise UserError(f"{label}: cannot be read ({exc.strerror or exc})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{label}: line {n} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{label}: line {n} must be a JSON object")
        rows.append((n, row))
    return rows


def _source_path(source: str, builtin: str, where: str, what: str) -> tuple[Path, str]:
    source = str(source).strip()
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name != builtin:
            raise UserError(f"{where}: unknown built-in {what} '{name}' (available: builtin:{builtin}); "
                            f"or give a .jsonl path")
        return PROMPTS_DIR / f"{builtin}.jsonl", source
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"{where}: {what} file '{source}' not found; give a .jsonl path or builtin:{builtin}")
    return path, source


def _text(row: dict, key: str) -> bool:
    return isinstance(row.get(key), str) and bool(row[key].strip())


def load_capability(source: str = "builtin:capability", limit: int | None = None, *,
                    where: str = "eval.capability") -> list[dict]:
    """Multiple-choice items {id, question, choices, answer} (extra fields kept), the first `limit` of them.

    `source` is `builtin:capability` or a JSONL file with the same fields: `id` (unique), `question`,
    `choices` (a list of at least two different non-empty strings) and `answer` (the index of the right
    choice). A mistake raises `UserError` naming the file, line and field.
    """
    path, label = _source_path(source, "capability", where, "capability set")
    label = f"{where}: {label}"
    items, seen, found = [], set(), []
    for n, row in _read_jsonl(path, label):
        problem = _capability_problem(row, seen)
        if problem:
            found.append(f"line {n}: {problem}")
            continue
        seen.add(str(row["id"]))
        items.append({**row, "id": str(row["id"]), "question": row["question"].strip(),
                      "choices": [c.strip() for c in row["choices"]]})
    if found:
        raise UserError(f"{label}: {problems(found)}")
    if not items:
        raise UserError(f"{label}: holds no questions (one JSON object per line with id, question, choices, answer)")
    return items if limit is None else items[:limit]


def _capability_problem(row: dict, seen: set[str]) -> str | None:
    """What is wrong with one capability item, or None."""
    if not isinstance(row.get("id"), (str, int)) or isinstance(row.get("id"), bool) or not str(row["id"]).strip():
        return "field 'id' is missing or empty; give every question a unique id"
    if str(row["id"]) in seen:
        return f"field 'id' {row['id']!r} is used twice; ids must be unique"
    if not _text(row, "question"):
        return "field 'question' is missing or empty; write the question text"
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        return "field 'choices' must be a list of at least two non-empty strings"
    if len({c.strip() for c in choices}) != len(choices):
        return "field 'choices' repeats a choice; make every choice different"
    answer = row.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return f"field 'answer' must be the index of the right choice (0..{len(choices) - 1}), got {answer!r}"
    return None


# --------------------------------------------------------------------------------------------------
# Critic check on canaries
# --------------------------------------------------------------------------------------------------

def load_canaries(source: str = "builtin:canary", *, where: str = "critic check") -> list[dict]:
    """Canary records {id, kind: harmful|benign, prompt, response} from `builtin:canary` or a JSONL file."""
    path, label = _source_path(source, "canary", where, "canary set")
    label = f"{where}: {label}"
    out, seen, found = [], set(), []
    for n, row in _read_jsonl(path, label):
        missing = [key for key in ("id", "prompt", "response") if not _text(row, key)]
        if missing:
            found += [f"line {n}: field '{key}' is missing or empty" for key in missing]
            continue
        if row.get("kind") not in ("harmful", "benign"):
            found.append(f"line {n}: field 'kind' must be 'harmful' or 'benign', got {row.get('kind')!r}")
        elif row["id"] in seen:
            found.append(f"line {n}: field 'id' {row['id']!r} is used twice; ids must be unique")
        else:
            seen.add(row["id"])
            out.append(row)
    if found:
        raise UserError(f"{label}: {problems(found)}")
    return out
