"""Constitutions (built-ins, validation, hashing, loading errors) and the built-in prompt sets."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_cai.cai.constitution import Constitution, Demonstration, Principle, builtin_constitutions, load_constitution
from lora_cai.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "lora_cai"
PROMPTS = PACKAGE / "prompts"
CONSTITUTIONS = PACKAGE / "constitutions"

MIN_PRINCIPLES = {"default": 12, "harmless": 6}


# --------------------------------------------------------------------------------------------------
# Built-ins


def test_builtins_listed():
    names = builtin_constitutions()
    assert {"default", "harmless"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", sorted(MIN_PRINCIPLES))
def test_builtin_loads_and_is_complete(name):
    c = load_constitution(name)
    assert isinstance(c, Constitution)
    assert c.name == name  # the file name and the `name:` key agree
    assert c.description.strip()
    assert len(c.principles) >= MIN_PRINCIPLES[name]
    for p in c.principles:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", p.name), p.name
        for field in ("critique", "revision", "judge"):
            assert getattr(p, field).strip(), (p.name, field)
        assert p.judge.startswith("Which of these"), p.name
        assert p.judge.rstrip().endswith("?"), p.name
        assert c.demos_for(p), p.name  # every principle has few-shot demonstrations to use
    assert len(c.demonstrations) >= 4
    assert any(d.critique.startswith(c.no_change_marker) for d in c.demonstrations)


@pytest.mark.parametrize("name", sorted(MIN_PRINCIPLES))
def test_builtin_demonstrations_follow_the_format(name):
    c = load_constitution(name)
    for d in c.demonstrations:
        for field in ("prompt", "response", "critique", "revision"):
            text = getattr(d, field)
            assert text.strip()
            assert len(text.split()) <= 60, (field, text)  # prepended to every prompt: stay short
        assert not re.match(r"(?i)\s*critique\s*:", d.critique)
        assert not re.match(r"(?i)\s*(revision\s*:|here is|here's|sure, here)", d.revision)
        if c.is_no_change(d.critique):
            assert d.critique.startswith(c.no_change_marker)
            assert d.revision == d.response
        else:
            assert d.revision != d.response


def test_default_demonstrations_cover_refusals_and_over_refusal():
    c = load_constitution("default")
    demos = c.demonstrations
    refusals = [d for d in demos if re.match(r"I can't|I can’t|I won't", d.revision)]
    assert len(refusals) >= 2  # harmful requests: a brief refusal ...
    assert all(len(d.revision.split()) >= 20 for d in refusals)  # ... that offers an alternative
    over_refusals = [d for d in demos if re.search(r"(?i)\b(can't|cannot) help", d.response)]
    assert over_refusals and not any(re.match(r"I can", d.revision) for d in over_refusals)
    names = {p.name for p in c.principles}
    assert {"over_refusal", "no_preaching", "calibration", "factual_accuracy"} <= names


@pytest.mark.parametrize("name", sorted(MIN_PRINCIPLES))
def test_builtin_yaml_starts_with_a_comment_saying_how_to_select_it(name):
    text = (CONSTITUTIONS / f"{name}.yaml").read_text(encoding="utf-8")
    header = text.split("\n\n")[0]
    assert text.startswith("#")
    assert f"constitution: {name}" in header


# --------------------------------------------------------------------------------------------------
# Model behaviour


def _tiny(**overrides) -> Constitution:
    data = {
        "name": "tiny",
        "principles": [
            {"name": "a", "critique": "Critique A.", "revision": "Revise A.", "judge": "Which A?"},
            {"name": "b", "critique": "Critique B.", "revision": "Revise B.", "judge": "Which B?"},
        ],
    }
    data.update(overrides)
    return Constitution.model_validate(data)


def test_hash_is_stable_and_sensitive():
    a, b = load_constitution("default"), load_constitution("default")
    assert a.hash() == b.hash()
    assert re.fullmatch(r"[0-9a-f]{64}", a.hash())
    assert a.hash() != load_constitution("harmless").hash()

    principles = [p.model_copy() for p in a.principles]
    principles[3] = principles[3].model_copy(update={"judge": principles[3].judge + " Explain."})
    changed = a.model_copy(update={"principles": principles})
    assert changed.hash() != a.hash()
    assert a.hash() == b.hash()  # the original is untouched


def test_hash_is_stable_across_processes():
    code = "from lora_cai.cai.constitution import load_constitution as l; print(l('default').hash())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    ).stdout.strip()
    assert out == load_constitution("default").hash()


def test_hash_ignores_yaml_quoting_style(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text(
        "name: t\nprinciples:\n  - {name: a, critique: Critique A., revision: Revise A., judge: 'Which A?'}\n"
    )
    block = tmp_path / "block.yaml"
    block.write_text(
        "name: t\nprinciples:\n  - name: a\n    critique: |\n      Critique A.\n"
        "    revision: >\n      Revise A.\n    judge: \"Which A?\"\n"
    )
    assert load_constitution(str(plain)).hash() == load_constitution(str(block)).hash()


def test_demos_for_prefers_principle_demos():
    shared = Demonstration(prompt="p", response="r", critique="c", revision="r2")
    own = Demonstration(prompt="p", response="r", critique="No changes needed.", revision="r")
    c = _tiny(demonstrations=[shared.model_dump()])
    c.principles[1] = Principle(
        name="b", critique="C", revision="R", judge="J", demonstrations=[own]
    )
    assert c.demos_for(c.principle("a")) == [shared]
    assert c.demos_for(c.principle("b")) == [own]


def test_principle_lookup():
    c = _tiny()
    assert c.principle("b").critique == "Critique B."
    with pytest.raises(UserError) as exc:
        c.principle("nope")
    assert "nope" in str(exc.value) and "a, b" in str(exc.value)


def test_no_change_marker_detection():
    c = _tiny()
    assert c.is_no_change("No changes needed. The answer is fine.")
    assert c.is_no_change("  \nno changes needed: fine")
    assert c.is_no_change("The response is fine - no changes needed.")
    assert not c.is_no_change("The response is harmful.\nNo changes needed elsewhere.")
    assert not c.is_no_change("")
    custom = _tiny(no_change_marker="LGTM")
    assert custom.is_no_change("lgtm") and not custom.is_no_change("No changes needed")


def test_texts_are_stripped():
    c = _tiny(name="  tiny \n")
    assert c.name == "tiny"


def test_constitution_module_imports_no_heavy_libraries():
    code = (
        "import sys, lora_cai.cai.constitution as c; c.load_constitution('default');"
        "bad = [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


# --------------------------------------------------------------------------------------------------
# User mistakes: one line, naming the file and the key

_P = "name: {n}\n    critique: Find problems.\n    revision: Fix them.\n    judge: Which is better?\n"
GOOD_PRINCIPLE = "  - " + _P.format(n="a")
SECOND_PRINCIPLE = "  - " + _P.format(n="b")


def _doc(principles: str = GOOD_PRINCIPLE, head: str = "name: mine\n", tail: str = "") -> str:
    return f"{head}principles:\n{principles}{tail}"


MALFORMED = [
    # (id, file text, substrings the message must contain)
    ("empty_file", "", ["empty", "principles"]),
    ("only_comments", "# nothing here\n", ["empty", "principles"]),
    ("top_level_list", "- name: a\n- name: b\n", ["top level", "mapping", "got a list"]),
    ("bad_yaml", "name: mine\nprinciples:\n  - name: a\n   critique: [unclosed\n", ["line ", "YAML"]),
    ("missing_principles", "name: mine\n", ["missing 'principles'"]),
    ("empty_principles", "name: mine\nprinciples: []\n", ["principles", "at least one"]),
    ("principles_null", "name: mine\nprinciples:\n", ["principles", "must be a list"]),
    ("principles_mapping", "name: mine\nprinciples:\n  a: {name: a}\n", ["principles", "list", "got a mapping"]),
    ("principle_is_string", _doc("  - be nice\n"), ["principles[0]", "mapping", "got a string"]),
    (
        "missing_judge",
        _doc(GOOD_PRINCIPLE + "  - name: b\n    critique: C.\n    revision: R.\n"),
        ["principles[1] is missing 'judge'", "comparing two responses"],
    ),
    (
        "empty_critique",
        _doc("  - name: a\n    critique: ''\n    revision: R.\n    judge: J?\n"),
        ["principles[0].critique", "empty"],
    ),
    (
        "blank_revision",
        _doc("  - name: a\n    critique: C.\n    revision: '   '\n    judge: J?\n"),
        ["principles[0].revision", "empty"],
    ),
    (
        "null_judge",
        _doc("  - name: a\n    critique: C.\n    revision: R.\n    judge:\n"),
        ["principles[0].judge", "empty"],
    ),
    (
        "duplicate_names",
        _doc(GOOD_PRINCIPLE + SECOND_PRINCIPLE + GOOD_PRINCIPLE),
        ["principles[2].name", "duplicates principles[0].name", "unique"],
    ),
    ("unknown_top_level_key", _doc(tail="principals: []\n"), ["unknown key 'principals'", "principles"]),
    (
        "unknown_principle_key",
        _doc(GOOD_PRINCIPLE + "    jugde: Which?\n"),
        ["unknown key 'jugde'", "principles[0]", "did you mean 'judge'"],
    ),
    (
        "name_is_number",
        _doc("  - name: 42\n    critique: C.\n    revision: R.\n    judge: J?\n"),
        ["principles[0].name", "must be a string", "quote"],
    ),
    ("constitution_name_is_bool", _doc(head="name: yes\n"), ["name", "must be a string", "boolean"]),
    ("empty_marker", _doc(tail="no_change_marker: ''\n"), ["no_change_marker", "empty"]),
    (
        "demo_missing_revision",
        _doc(tail="demonstrations:\n  - {prompt: P, response: R, critique: C}\n"),
        ["demonstrations[0] is missing 'revision'"],
    ),
    (
        "principle_demo_wrong_type",
        _doc(GOOD_PRINCIPLE + "    demonstrations: [just a string]\n"),
        ["principles[0].demonstrations[0]", "mapping"],
    ),
    (
        "demonstrations_not_a_list",
        _doc(tail="demonstrations: {prompt: P}\n"),
        ["demonstrations", "must be a list", "prompt, response, critique, revision"],
    ),
    (
        "no_change_demo_with_different_revision",
        _doc(tail="demonstrations:\n  - {prompt: P, response: R, critique: No changes needed., revision: X}\n"),
        ["demonstrations[0].revision", "identical to the response"],
    ),
    (
        "duplicate_yaml_key",
        _doc("  - name: a\n    critique: C.\n    revision: R.\n    judge: J?\n    judge: K?\n"),
        ["duplicate key 'judge'", "line 7", "keep only one"],
    ),
    ("tab_indentation", "name: mine\nprinciples:\n\t- name: a\n", ["line 3", "YAML", "spaces, not tabs"]),
]


@pytest.mark.parametrize("case_id, text, expected", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_constitutions_raise_one_line_user_error(tmp_path, case_id, text, expected):
    path = tmp_path / f"{case_id}.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as exc:
        load_constitution(str(path))
    message = str(exc.value)
    assert "\n" not in message
    assert f"{case_id}.yaml" in message  # names the file
    for part in expected:  # names the key and says what is wrong
        assert part in message, (part, message)
    assert "Traceback" not in message and "pydantic" not in message.lower()


def test_several_mistakes_are_all_named_on_one_line(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("name: mine\nprinciples:\n  - name: a\n  - name: b\n")
    with pytest.raises(UserError) as exc:
        load_constitution(str(path))
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"constitution {path}: 6 problems: principles[0] is missing 'critique'")
    for i in (0, 1):
        for key in ("critique", "revision", "judge"):
            assert f"principles[{i}] is missing '{key}'" in message


def test_a_constitution_without_a_name_is_called_after_its_file(tmp_path):
    path = tmp_path / "my-rules.yaml"
    path.write_text(_doc(head=""))
    assert load_constitution(str(path)).name == "my-rules"


def test_malformed_table_is_big_enough():
    assert len(MALFORMED) >= 12


def test_unknown_builtin_lists_available_names():
    with pytest.raises(UserError) as exc:
        load_constitution("defualt")
    message = str(exc.value)
    assert "\n" not in message
    assert "defualt" in message and "did you mean 'default'" in message
    for name in builtin_constitutions():
        assert name in message


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as exc:
        load_constitution(str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in str(exc.value) and "not found" in str(exc.value)
    with pytest.raises(UserError):
        load_constitution(str(tmp_path))  # a directory
    with pytest.raises(UserError):
        load_constitution("")


def test_non_utf8_file_is_a_user_error(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError) as exc:
        load_constitution(str(path))
    assert "latin.yaml" in str(exc.value) and "UTF-8" in str(exc.value)


def test_yaml_tags_are_not_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\nprinciples: []\n")
    with pytest.raises(UserError) as exc:
        load_constitution(str(path))
    assert "evil.yaml" in str(exc.value)


def test_user_file_loads_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(_doc(GOOD_PRINCIPLE + SECOND_PRINCIPLE, tail="description: mine\n"))
    c = load_constitution(path)  # a Path works as well as a str
    assert [p.name for p in c.principles] == ["a", "b"]
    assert c.no_change_marker == "No changes needed"
    assert c.demonstrations == [] and c.demos_for(c.principles[0]) == []
    assert load_constitution(str(path)) == c


# --------------------------------------------------------------------------------------------------
# Prompt sets

PROMPT_FILES = ["smoke.jsonl", "train.jsonl", "heldout_harmful.jsonl", "heldout_benign.jsonl"]
SOUNDS_HARMFUL = {"homonym", "safety_info", "safe_target", "definition", "fiction_games", "public_figure"}


def _rows(name: str) -> list[dict]:
    rows = []
    for i, line in enumerate((PROMPTS / name).read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{name}:{i} is blank"
        row = json.loads(line)
        assert set(row) == {"prompt", "category", "kind"}, f"{name}:{i}"
        assert isinstance(row["prompt"], str) and row["prompt"].strip() == row["prompt"] != ""
        assert re.fullmatch(r"[a-z][a-z_]*", row["category"]), f"{name}:{i}"
        assert row["kind"] in ("harmful", "benign"), f"{name}:{i}"
        rows.append(row)
    return rows


def _norm(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.casefold()).strip()


def _count(rows, **where):
    return sum(all(r[k] == v for k, v in where.items()) for r in rows)


@pytest.mark.parametrize("name", PROMPT_FILES)
def test_prompt_file_parses(name):
    assert _rows(name)


def test_prompt_counts():
    smoke = _rows("smoke.jsonl")
    assert len(smoke) == 24
    assert _count(smoke, kind="harmful") == _count(smoke, kind="benign") == 12
    assert all(len(r["prompt"].split()) < 25 for r in smoke)
    assert len({r["category"] for r in smoke if r["kind"] == "harmful"}) >= 6

    train = _rows("train.jsonl")
    assert len(train) == 276
    assert _count(train, kind="harmful") == 140 and _count(train, kind="benign") == 136
    # Benign requests that sound harmful, the kind the over-refusal set is made of: without them a policy
    # trained to refuse learns "refuse anything edgy" (#18). Recipes take a prefix (data.limit), so the first
    # 160 rows hold most of them.
    edgy = [r["kind"] == "benign" and r["category"] in SOUNDS_HARMFUL for r in train]
    assert sum(edgy) >= 30 and sum(edgy[:160]) >= 25 and sum(edgy[:96]) >= 15
    assert len({r["category"] for r in train if r["kind"] == "harmful"}) >= 8
    assert _count(train, kind="harmful", category="jailbreak") >= 10
    assert len({r["category"] for r in train if r["kind"] == "benign"}) >= 5

    harmful = _rows("heldout_harmful.jsonl")
    assert len(harmful) == 40 and _count(harmful, kind="harmful") == 40
    assert len({r["category"] for r in harmful}) >= 8
    assert _count(harmful, category="jailbreak") >= 8

    benign = _rows("heldout_benign.jsonl")
    assert len(benign) == 40 and _count(benign, kind="benign") == 40


def test_no_duplicate_prompts_within_or_across_files():
    seen: dict[str, str] = {}
    for name in PROMPT_FILES:
        for i, row in enumerate(_rows(name), 1):
            key = _norm(row["prompt"])
            assert key not in seen, f"{name}:{i} duplicates {seen[key]}: {row['prompt']!r}"
            seen[key] = f"{name}:{i}"


def test_prompt_readme_exists():
    text = (PROMPTS / "README.md").read_text(encoding="utf-8")
    assert "Apache-2.0" in text and "lora_cai authors" in text
