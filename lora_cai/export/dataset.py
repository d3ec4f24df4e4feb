"""A run's CAI data as a Hugging Face dataset: SFT, preference and held-out splits in one schema, with its card.

    python -m lora_cai.export RUN_DIR --dataset OUT [--push-to-hub REPO_ID]

The layout follows HuggingFaceH4's CAI datasets (`cai-conversation-harmless`): every split has the same
columns, conversations are lists of {role, content} messages, and the Parquet files sit under `data/` with the
split list in the card's YAML, so `datasets.load_dataset(OUT)` reads it and TRL's trainers take its splits as
they are (`train_sft` through `messages`, `train_prefs` through `prompt` / `chosen` / `rejected`).

- `train_sft`: each round's SFT records (`sft.jsonl`): the request and the answer trained on, with the critiques
  and revisions that led to it (`trajectories.jsonl`); `chosen` is that answer and `rejected` the one it replaced
  (its pair's loser, else the answer before revision), with the pair's judge, label and source where it is one.
- `train_prefs`: each round's preference pairs (`pairs.jsonl`), `p_chosen` the judge's probability (1.0 for an
  unjudged revision pair).
- `test_round_0` (the base model), `test_round_1`, ...: the held-out prompts' answers per policy, with the
  refusal verdict the evaluation gave each (`refused`) and the prompt's label (`label`); no `chosen`/`rejected`
  (null): these are records of what each policy said, not preferences.

Duplicates across rounds: a (prompt, answer) already in an earlier round's SFT split, or a (prompt, chosen,
rejected) already in an earlier round's pairs, is kept once, under the earliest round; the card says how many
were dropped. Rounds the early stop kept out of the final policy are flagged (`in_final_policy: false`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from lora_cai.errors import UserError
from lora_cai.core.layout import BASELINE_EVAL, round_dir

# One schema for every split (None where a field does not apply). The order is the card's.
COLUMNS = ("request", "prompt", "completion", "chosen", "rejected", "messages", "prompt_id", "p_chosen", "principle", "source", "judge",
           "critiques", "round", "in_final_policy", "label", "refused")
CONTENT_WARNING = ("Content warning: the rejected answers, the early answers and the held-out answers to harmful "
                   "prompts contain harmful text, kept on purpose as negative examples and evaluation records.")


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _conversation(prompt: str, answer: str | None) -> list[dict] | None:
    if answer is None:
        return None
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _said(answer: str | None) -> list[dict] | None:
    return None if answer is None else [{"role": "assistant", "content": answer}]


def _row(request: str, answer: str | None, **fields) -> dict:
    """One row: TRL's conversational prompt / completion (SFTTrainer) and prompt / chosen / rejected (DPOTrainer)
    formats side by side, the whole exchange as `messages`, and the request as plain text."""
    row = dict.fromkeys(COLUMNS)
    row.update(request=request, prompt=[{"role": "user", "content": request}], completion=_said(answer),
               messages=_conversation(request, answer))
    row.update(fields)
    return row


def _critiques(trajectory: dict | None) -> list[dict]:
    steps = (trajectory or {}).get("steps") or []
    return [{"principle": s.get("principle") or "", "critique": s.get("critique") or "",
             "revision": s.get("revision") or "", "status": s.get("status") or ""} for s in steps]


def collect(run_dir: Path) -> tuple[dict[str, list[dict]], dict]:
    """The splits' rows and what the card says of them."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{run_dir}: not a lora_cai run directory (no manifest.json); give the folder a recipe "
                        f"wrote (its output_dir)")
    manifest = json.loads(manifest_path.read_text())
    rounds = sorted(int(k) for k in manifest.get("rounds", {}))
    stacked = {int(re.match(r"round-(\d+)/", s).group(1)) for s in manifest.get("stack", [])}
    splits: dict[str, list[dict]] = {"train_sft": [], "train_prefs": []}
    seen_sft, seen_pairs = set(), set()
    dropped = {"train_sft": 0, "train_prefs": 0}
    for k in rounds:
        rd = run_dir / round_dir(k)
        pairs = _jsonl(rd / "pairs.jsonl")
        trajectories = {t["id"]: t for t in _jsonl(rd / "trajectories.jsonl")}
        winners = {(p["id"], p["chosen"]): p for p in pairs}
        for r in _jsonl(rd / "sft.jsonl"):
            key = (r["prompt"], r["completion"])
            if key in seen_sft:
                dropped["train_sft"] += 1
                continue
            seen_sft.add(key)
            pair = winners.get((r.get("id"), r["completion"]), {})
            trajectory = trajectories.get(r.get("id"))
            source = pair.get("source") or r.get("source") or ("revision" if trajectory else "sft")
            # As in H4's splits, an SFT row also carries the answer it replaced: its pair's loser, else the answer
            # before revision. (TRL tells a conversational dataset by any one of these columns: none may be null.)
            before = pair.get("rejected") or (trajectory or {}).get("initial")
            splits["train_sft"].append(_row(
                r["prompt"], r["completion"], chosen=_said(r["completion"]), rejected=_said(before),
                prompt_id=r.get("id"), principle=pair.get("principle"), source=source, judge=pair.get("judge"),
                p_chosen=pair.get("p_chosen"), critiques=_critiques(trajectory), round=k, in_final_policy=k in stacked))
        for p in pairs:
            key = (p["prompt"], p["chosen"], p["rejected"])
            if key in seen_pairs:
                dropped["train_prefs"] += 1
                continue
            seen_pairs.add(key)
            splits["train_prefs"].append(_row(
                p["prompt"], p["chosen"], chosen=_said(p["chosen"]), rejected=_said(p["rejected"]), prompt_id=p.get("id"),
                p_chosen=float(p.get("p_chosen", 1.0)), principle=p.get("principle"), source=p.get("source"),
                judge=p.get("judge"), critiques=_critiques(trajectories.get(p.get("id"))), round=k,
                in_final_policy=k in stacked))
    for k, samples in heldout_answers(run_dir, rounds).items():
        splits[f"test_round_{k}"] = [_row(
            s["prompt"], s.get("answer"), prompt_id=s.get("id"), label=s.get("set"), refused=s.get("refusal"), round=k, in_final_policy=k == 0 or k in stacked)
            for s in samples]
    facts = {"manifest": manifest, "rounds": rounds, "stacked": sorted(stacked), "dropped": dropped,
             "stopped_round": manifest.get("stopped_round")}
    return splits, facts


def heldout_answers(run_dir: Path, rounds: list[int]) -> dict[int, list[dict]]:
    """The held-out answers each policy gave (0: the base model), as the evaluations stored them: id, set, prompt,
    answer, refusal. Policies whose evaluation is missing are left out."""
    out = {}
    for k, path in [(0, Path(run_dir) / BASELINE_EVAL)] + [(k, Path(run_dir) / round_dir(k) / "eval.json")
                                                           for k in rounds]:
        if path.is_file():
            out[k] = json.loads(path.read_text()).get("samples") or []
    return out


def _features():
    from datasets import Features, Value

    message = [{"role": Value("string"), "content": Value("string")}]
    step = [{"principle": Value("string"), "critique": Value("string"), "revision": Value("string"),
             "status": Value("string")}]
    return Features({"request": Value("string"), "prompt": message, "completion": message, "chosen": message,
                     "rejected": message, "messages": message, "prompt_id": Value("string"), "p_chosen": Value("float64"),
                     "principle": Value("string"), "source": Value("string"), "judge": Value("string"),
                     "critiques": step, "round": Value("int64"), "in_final_policy": Value("bool"),
                     "label": Value("string"), "refused": Value("bool")})


def _model_licence(model_name: str) -> str:
    """The base model's licence as its own files state it, else 'unknown' (nothing is guessed): a pip-shipped model's
    package metadata, a GGUF file's `general.license`, a local checkpoint's README front matter."""
    from importlib import metadata

    if model_name.startswith("pip:"):
        try:
            meta = metadata.metadata(model_name[4:].strip())
        except metadata.PackageNotFoundError:
            return "unknown"
        return meta.get("License-Expression") or meta.get("License") or "unknown"
    if model_name.lower().endswith(".gguf") and Path(model_name).is_file():
        try:
            import gguf

            field = gguf.GGUFReader(model_name).fields.get("general.license")
            return bytes(field.parts[field.data[0]]).decode() if field is not None else "unknown"
        except Exception:  # an unreadable file says nothing about its licence
            return "unknown"
    readme = Path(model_name) / "README.md"
    if readme.is_file():
        m = re.search(r"^license:\s*(\S+)", readme.read_text(errors="replace"), re.MULTILINE)
        if m:
            return m.group(1)
    return "unknown"


def _principles(constitution: dict) -> list[str]:
    from lora_cai.cai.constitution import load_constitution

    try:
        c = load_constitution(constitution.get("name", ""))
    except UserError:
        return []
    return [p.name for p in c.principles] if c.hash() == constitution.get("hash") else []


def card(splits: dict[str, list[dict]], facts: dict) -> str:
    """README.md with YAML metadata: what the data is, how it was made, what it contains, and the warning."""
    m = facts["manifest"]
    model = m.get("model", {}).get("name", "unknown")
    licence = _model_licence(model)
    constitution = m.get("constitution", {})
    principles = _principles(constitution) or sorted({r["principle"] for rows in splits.values() for r in rows
                                                      if r["principle"]})
    judges = sorted({r["judge"] for r in splits["train_prefs"] if r["judge"]}) or ["none (revision pairs)"]
    yaml_splits = "".join(f"  - split: {name}\n    path: data/{name}-*.parquet\n" for name in splits)
    counts = "\n".join(f"| {name} | {len(rows)} |" for name, rows in splits.items())
    stopped = (f"Round {facts['stopped_round']} was stopped early and is not part of the final policy "
               f"(`in_final_policy: false`)." if facts["stopped_round"] else "No round was stopped early.")
    return f"""---
license: {licence.lower() if licence != "unknown" else "other"}
task_categories:
- text-generation
tags:
- constitutional-ai
- lora_cai
- preference
configs:
- config_name: default
  data_files:
{yaml_splits}---

# {m.get("name", "lora_cai run")}: Constitutional AI data made by lora_cai

{CONTENT_WARNING}

Made by lora_cai (parameter-efficient Constitutional AI) from one run: the 4-bit policy answered the training prompts, critiqued
and revised its answers against sampled principles of a constitution and/or sampled several answers, a judge
labelled preference pairs, and each round trained a LoRA adapter (SFT, then DPO) stacked on the earlier ones.

- Base model: `{model}` (licence: {licence}; this data inherits the base model's terms of use)
- Constitution: `{constitution.get("name", "unknown")}` (hash {constitution.get("hash", "unknown")[:16]}),
  principles: {", ".join(f"`{p}`" for p in principles) or "none recorded"}
- Judge: {", ".join(judges)}
- Rounds: {len(facts["rounds"])} ({", ".join(str(k) for k in facts["rounds"])}); final policy stacks rounds
  {", ".join(str(k) for k in facts["stacked"]) or "none"}. {stopped}

| split | rows |
|---|---|
{counts}

Splits: `train_sft` (the answers trained on, with the critiques and revisions behind them), `train_prefs`
(`chosen` / `rejected` pairs, `p_chosen` the judge's probability, 1.0 for unjudged revision pairs), and
`test_round_K` (answers to the held-out prompts by the base model, K = 0, and after each round, with the
evaluation's refusal verdict in `refused` and the prompt's label in `label`). One schema for all splits; a field
that does not apply is null. A record repeated in a later round is kept once, under its first round:
{facts["dropped"]["train_sft"]} SFT records and {facts["dropped"]["train_prefs"]} pairs were dropped so.

    from datasets import load_dataset
    ds = load_dataset("path/or/repo")   # ds["train_prefs"] goes to trl.DPOTrainer, ds["train_sft"] to SFTTrainer
"""


def check_target(out: Path) -> Path:
    """`--dataset OUT`: empty or new (export's check of `--out`), and somewhere this process can write."""
    from lora_cai.export.weights import _check_out

    out = _check_out(out, "--dataset")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    probe = parent / f".lora_cai-write-test-{hashlib.sha256(str(out).encode()).hexdigest()[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise UserError(f"--dataset {out}: cannot write there ({e.strerror}); choose a folder you can write to") from None
    return out


def write_dataset(run_dir: Path, out: Path) -> dict[str, int]:
    """Write the run's dataset (Parquet per split under data/, README.md card) into `out`; the split sizes."""
    import os
    import shutil
    import tempfile

    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    out = check_target(out)
    splits, facts = collect(run_dir)
    if not any(splits.values()):
        raise UserError(f"{run_dir}: the run has no data yet (no round's sft.jsonl, pairs.jsonl or evaluation); "
                        f"run the recipe first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "data").mkdir()
        features = _features()
        for name, rows in splits.items():
            Dataset.from_list(rows, features=features).to_parquet(str(tmp / "data" / f"{name}-00000-of-00001.parquet"))
        (tmp / "README.md").write_text(card(splits, facts))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {name: len(rows) for name, rows in splits.items()}
