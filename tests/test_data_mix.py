"""Helpful data mixed into SFT: `builtin:helpful`, `load_helpful` on every kind of source, `mix_helpful`'s counts
and determinism, and the `sft.helpful_*` recipe keys."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lora_cai.config.schema import RecipeConfig, SFTSettings
from lora_cai.data.sources import BUILTIN_DIR, builtin_sets, load_helpful, load_prompts, mix_helpful, prompt_id
from lora_cai.errors import UserError


def _sft(n: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"request {i}", "completion": f"revision {i}"} for i in range(n)]


def _helpful(n: int) -> list[dict]:
    return [{"id": f"h{i}", "prompt": f"question {i}", "completion": f"answer {i}"} for i in range(n)]


def _norm(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.casefold()).strip()


# --------------------------------------------------------------------------------------------------
# The built-in set


def test_builtin_helpful_loads():
    recs = load_helpful("builtin:helpful")
    assert 75 <= len(recs) <= 90
    assert all(set(r) == {"id", "prompt", "completion"} for r in recs)
    assert len({r["id"] for r in recs}) == len(recs)
    assert all(r["id"] == f"helpful-{prompt_id(r['prompt'])}" for r in recs)
    assert all(r["prompt"] and r["completion"] for r in recs)


def test_builtin_helpful_file_format():
    rows = [json.loads(line) for line in (BUILTIN_DIR / "helpful.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"id", "prompt", "response"} for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    cats = Counter(r["id"].rsplit("-", 1)[0] for r in rows)
    assert {"cooking", "coding", "writing", "science", "health", "travel", "safety_info"} <= set(cats)
    assert cats["safety_info"] >= 10  # benign requests that sound risky, answered
    for r in rows:
        assert r["prompt"] == r["prompt"].strip() != "" and r["response"] == r["response"].strip() != ""
        assert not re.match(r"(I'm sorry|I am sorry|I can't|I cannot|As an AI)", r["response"]), r["id"]
    assert len({_norm(r["prompt"]) for r in rows}) == len(rows)


def test_builtin_helpful_shares_no_prompt_with_other_builtin_files():
    helpful = {_norm(r["prompt"]) for r in load_helpful("builtin:helpful")}
    others = sorted(p for p in BUILTIN_DIR.glob("*.jsonl") if p.stem != "helpful")
    assert {"heldout_harmful", "heldout_benign", "train", "smoke", "canary"} <= {p.stem for p in others}
    for path in others:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            row = json.loads(line)
            text = row.get("prompt") or row.get("question")
            assert _norm(text) not in helpful, f"{path.name}:{i} is also in helpful.jsonl: {text!r}"


def test_builtin_helpful_is_not_a_prompt_set():
    assert "helpful" not in builtin_sets() and "smoke" in builtin_sets()
    with pytest.raises(UserError, match=r"^data.prompts: builtin:helpful is .*sft.helpful_data.*not a prompt set"):
        load_prompts("builtin:helpful")
    with pytest.raises(UserError) as e:
        load_prompts("builtin:nope")
    assert "helpful" not in str(e.value)


def test_exclude_drops_held_out_prompts():
    recs = load_helpful("builtin:helpful")
    gone = {prompt_id(recs[0]["prompt"]), prompt_id(recs[5]["prompt"])}
    kept = load_helpful("builtin:helpful", exclude=gone)
    assert len(kept) == len(recs) - 2 and not {prompt_id(r["prompt"]) for r in kept} & gone


# --------------------------------------------------------------------------------------------------
# Local files and the Hub


def test_local_jsonl_csv_parquet_and_columns(tmp_path):
    rows = [{"q": " What is 2+2? ", "a": "4."}, {"q": "Name a colour.", "a": "Blue."},
            {"q": "What is 2+2?", "a": "Four."},  # repeated prompt: first kept
            {"q": "", "a": "x"}, {"q": "Empty answer", "a": "  "}, {"q": "No answer"}]
    jl = tmp_path / "h.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    want = [{"id": f"helpful-{prompt_id('What is 2+2?')}", "prompt": "What is 2+2?", "completion": "4."},
            {"id": f"helpful-{prompt_id('Name a colour.')}", "prompt": "Name a colour.", "completion": "Blue."}]
    assert load_helpful(str(jl), prompt_column="q", response_column="a") == want

    csv = tmp_path / "h.csv"
    csv.write_text("q,a\nWhat is 2+2?,4.\nName a colour.,Blue.\n", encoding="utf-8")
    assert load_helpful(str(csv), prompt_column="q", response_column="a") == want

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "h.parquet")
    assert load_helpful(str(tmp_path / "h.parquet"), prompt_column="q", response_column="a") == want


def test_chat_message_columns(tmp_path):
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "More"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": msgs}) + "\n", encoding="utf-8")
    recs = load_helpful(str(path), prompt_column="messages", response_column="messages")
    assert [(r["prompt"], r["completion"]) for r in recs] == [("Hi?", "Hello!")]


def test_hub_dataset_goes_through_the_hub_reader(monkeypatch):
    import lora_cai.data.sources as data

    seen = {}

    def fake_hub(dataset_id, where, split, subset=None):
        seen.update(id=dataset_id, where=where, split=split)
        return [{"prompt": "p", "response": "r"}]

    monkeypatch.setattr(data, "_read_hub", fake_hub)
    recs = load_helpful("someone/helpful-chats", split="train_sft")
    assert seen == {"id": "someone/helpful-chats", "where": "sft.helpful_data", "split": "train_sft"}
    assert [(r["prompt"], r["completion"]) for r in recs] == [("p", "r")]


def _bad(tmp_path: Path, name: str, content: str | bytes | None) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    return str(path)


BAD = [  # (id, file name, content, load_helpful kwargs, fragments of the one error line)
    ("missing-file", "nope.jsonl", None, {}, ["sft.helpful_data", "nope.jsonl", "not found", "builtin:helpful"]),
    ("missing-relative-txt", None, "no-such-help.txt", {}, ["sft.helpful_data", "no-such-help.txt", "not found"]),
    ("empty-file", "h.jsonl", "", {}, ["sft.helpful_data", "h.jsonl", "no records", "'prompt'", "'response'"]),
    ("blank-lines", "h.jsonl", "\n \n", {}, ["h.jsonl", "no records"]),
    ("no-response-column", "h.jsonl", '{"prompt": "a", "answer": "b"}\n', {},
     ["h.jsonl", "no column 'response'", "columns: answer, prompt", "sft.helpful_response_column"]),
    ("no-prompt-column", "h.csv", "question,response\nq,r\n", {},
     ["h.csv", "no column 'prompt'", "sft.helpful_prompt_column"]),
    ("column-typo", "h.jsonl", '{"prompt": "a", "response": "b"}\n', {"prompt_column": "promt"},
     ["no column 'promt'", "sft.helpful_prompt_column"]),
    ("all-empty", "h.jsonl", '{"prompt": "", "response": "b"}\n{"prompt": "a", "response": null}\n', {},
     ["h.jsonl", "no usable record", "empty 'prompt' or 'response'"]),
    ("bad-json", "h.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": \n', {}, ["h.jsonl", "line 2", "not valid JSON"]),
    ("not-utf8", "h.jsonl", '{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"), {}, ["h.jsonl", "UTF-8"]),
    ("unsupported", "h.txt", "a prompt\n", {}, ["h.txt", "unsupported file type '.txt'"]),
    ("unknown-builtin", None, "builtin:smoke", {}, ["sft.helpful_data", "'smoke'", "builtin:helpful"]),
]


@pytest.mark.parametrize("name,content,kwargs,must", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_sources_give_one_line(tmp_path, monkeypatch, name, content, kwargs, must):
    monkeypatch.chdir(tmp_path)
    source = content if name is None else _bad(tmp_path, name, content)
    with pytest.raises(UserError) as e:
        load_helpful(source, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    for fragment in must:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_where_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"^recipe.yaml: sft.helpful_data: .*not found"):
        load_helpful(str(tmp_path / "x.jsonl"), where="recipe.yaml: sft.helpful_data")


# --------------------------------------------------------------------------------------------------
# Mixing


@pytest.mark.parametrize("n_sft,fraction,n_helpful,expect_drawn", [
    (30, 0.25, 100, 10),   # 30 * 0.25 / 0.75
    (30, 0.5, 100, 30),
    (10, 0.2, 100, round(10 * 0.2 / 0.8)),
    (100, 0.1, 100, round(100 * 0.1 / 0.9)),  # 11
    (90, 0.75, 100, 100),  # wants 270: all 100 helpful records
    (7, 0.25, 3, 2),       # round(2.33)
    (1, 0.25, 5, 0),       # round(0.33): none
])
def test_counts(n_sft, fraction, n_helpful, expect_drawn):
    sft, helpful = _sft(n_sft), _helpful(n_helpful)
    mixed = mix_helpful(sft, helpful, fraction, seed=1)
    src = Counter(r["source"] for r in mixed)
    assert src["revision"] == n_sft and src["helpful"] == expect_drawn and len(mixed) == n_sft + expect_drawn
    drawn = [r for r in mixed if r["source"] == "helpful"]
    assert len({r["id"] for r in drawn}) == expect_drawn  # without replacement
    assert all({k: v for k, v in r.items() if k != "source"} in helpful for r in drawn)
    assert sorted((r for r in mixed if r["source"] == "revision"), key=lambda r: int(r["id"][1:])) == \
        [{**r, "source": "revision"} for r in sft]


def test_fraction_close_to_target():
    mixed = mix_helpful(_sft(300), _helpful(500), 0.25, seed=0)
    assert sum(r["source"] == "helpful" for r in mixed) / len(mixed) == pytest.approx(0.25, abs=0.005)


def test_deterministic_and_seed_dependent():
    sft, helpful = _sft(40), _helpful(60)
    a = mix_helpful(sft, helpful, 0.3, seed=7)
    assert a == mix_helpful(sft, helpful, 0.3, seed=7)
    assert a == mix_helpful([dict(r) for r in sft], [dict(r) for r in helpful], 0.3, seed=7)
    b = mix_helpful(sft, helpful, 0.3, seed=8)
    assert a != b
    assert {r["id"] for r in a if r["source"] == "helpful"} != {r["id"] for r in b if r["source"] == "helpful"}
    assert [r["id"] for r in a][:40] != [r["id"] for r in sft]  # interleaved, not appended


def test_inputs_not_modified_and_existing_source_kept():
    sft = _sft(8) + [{"id": "w", "prompt": "p", "completion": "c", "source": "best_of_n"}]
    helpful = _helpful(10)
    before = (json.dumps(sft), json.dumps(helpful))
    mixed = mix_helpful(sft, helpful, 0.5, seed=3)
    assert (json.dumps(sft), json.dumps(helpful)) == before
    assert next(r for r in mixed if r["id"] == "w")["source"] == "best_of_n"


@pytest.mark.parametrize("helpful,fraction", [(_helpful(10), 0.0), ([], 0.25), (None, 0.25)])
def test_nothing_to_mix_returns_input_unchanged(helpful, fraction):
    sft = _sft(12)
    assert mix_helpful(sft, helpful, fraction, seed=0) == sft


def test_empty_sft_stays_empty():
    assert mix_helpful([], _helpful(10), 0.25, seed=0) == []


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        mix_helpful(_sft(4), _helpful(4), fraction, seed=0)


def test_mix_with_builtin():
    helpful = load_helpful("builtin:helpful")
    mixed = mix_helpful(_sft(60), helpful, 0.25, seed=42)
    assert Counter(r["source"] for r in mixed) == {"revision": 60, "helpful": 20}


# --------------------------------------------------------------------------------------------------
# Recipe keys


def test_settings_defaults_and_bounds():
    s = SFTSettings()
    assert (s.helpful_data, s.helpful_fraction, s.helpful_prompt_column, s.helpful_response_column,
            s.helpful_split) == (None, 0.25, "prompt", "response", "train")
    SFTSettings(helpful_data="builtin:helpful", helpful_fraction=0.0)
    SFTSettings(helpful_fraction=0.99)
    for bad in ({"helpful_fraction": 1.0}, {"helpful_fraction": -0.01}, {"helpful_data": "  "},
                {"helpful_frac": 0.2}):
        with pytest.raises(Exception):
            SFTSettings(**bad)
    cfg = RecipeConfig.model_validate({"model": {"name": "m"}, "data": {"prompts": "builtin:smoke"},
                                       "sft": {"helpful_data": "builtin:helpful", "helpful_fraction": 0.4}})
    assert cfg.sft.helpful_data == "builtin:helpful" and cfg.sft.helpful_fraction == 0.4


def test_keys_have_help_text():
    from lora_cai.config.schema import schema_keys

    rows = {k: h for k, _, _, h in schema_keys()}
    for key in ("sft.helpful_data", "sft.helpful_fraction", "sft.helpful_prompt_column",
                "sft.helpful_response_column", "sft.helpful_split"):
        assert len(rows[key]) > 30, key
    assert "builtin:helpful" in rows["sft.helpful_data"] and "null" in rows["sft.helpful_data"]
