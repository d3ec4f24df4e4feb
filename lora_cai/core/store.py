"""Run directory: atomic files, append-only JSONL stages committed per batch, manifests, content hashes.

A stage's JSONL file only grows. Each batch is appended, flushed and fsynced, and only then is the
stage's commit pointer (`<stage>.meta.json`: input hash, committed byte length, committed batches) moved
by an atomic rename. On reopen, bytes past the pointer (a batch cut off by a crash) are dropped, so a
kill -9 anywhere costs at most the batch in flight. A stage whose input hash changed starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from lora_cai.core.layout import MANIFEST, round_dir

if TYPE_CHECKING:
    from lora_cai.core.manifest import Manifest

_UMASK = os.umask(0)
os.umask(_UMASK)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def content_hash(obj: Any) -> str:
    """Stable sha256 of any JSON-able object (key order does not matter)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the user's usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
    return out


class JsonlStage:
    """One stage's append-only JSONL output, committed batch by batch.

    `done_batches` says which batches a resumed stage may skip; `complete` says the stage finished for
    exactly these inputs.
    """

    def __init__(self, path: str | Path, inputs_hash: str):
        self.path = Path(path)
        self.meta_path = self.path.with_name(self.path.name + ".meta.json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = read_json(self.meta_path) if self.meta_path.exists() else None
        if meta is None or meta.get("inputs") != inputs_hash:
            # New stage, or its inputs changed: whatever was there is stale.
            self.path.unlink(missing_ok=True)
            meta = {"inputs": inputs_hash, "committed_bytes": 0, "batches": [], "count": 0, "complete": False}
            self.path.touch()
            atomic_write_json(self.meta_path, meta)
        self.meta = meta
        size = self.path.stat().st_size if self.path.exists() else 0
        if size != meta["committed_bytes"]:
            # Bytes past the commit pointer belong to a batch a crash cut off.
            with open(self.path, "ab") as f:
                f.truncate(meta["committed_bytes"])

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def done_batches(self) -> set[int]:
        return set(self.meta["batches"])

    def records(self) -> list[dict]:
        return read_jsonl(self.path)

    def commit(self, records: Iterable[dict], batch: int) -> None:
        data = "".join(canonical_json(r) + "\n" for r in records).encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        meta = dict(self.meta)
        meta["committed_bytes"] = self.meta["committed_bytes"] + len(data)
        meta["batches"] = sorted(set(self.meta["batches"]) | {int(batch)})
        meta["count"] = self.meta["count"] + data.count(b"\n")
        atomic_write_json(self.meta_path, meta)
        self.meta = meta

    def pinned(self, key: str, value: Any) -> Any:
        """A setting of the stage's commit plan (a server's batch size), fixed at the stage's first run.

        Such settings change nothing a stage computes, so they are not inputs; but a resumed stage must cut
        its work into the same batches as before to skip the committed ones.
        """
        if key not in self.meta:
            meta = dict(self.meta, **{key: value})
            atomic_write_json(self.meta_path, meta)
            self.meta = meta
        return self.meta[key]

    def finish(self, **summary: Any) -> None:
        meta = dict(self.meta, complete=True, summary=summary)
        atomic_write_json(self.meta_path, meta)
        self.meta = meta


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(canonical_json(r) + "\n" for r in records))


class RunStore:
    """The run directory: `manifest.json` and one `round-<k>/` folder per round (names: `layout`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> "Manifest | None":
        return read_json(self.manifest_path) if self.manifest_path.exists() else None

    def write_manifest(self, manifest: "Manifest") -> None:
        """Only `loop.rundir` writes it (the ledger, and --restart-from)."""
        atomic_write_json(self.manifest_path, manifest)

    def round_dir(self, k: int) -> Path:
        d = self.root / round_dir(k)
        d.mkdir(parents=True, exist_ok=True)
        return d
