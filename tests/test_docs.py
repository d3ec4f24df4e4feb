"""The docs cannot drift from the code: the recipe reference is the schema rendered, every repository path the
docs mention exists, every `section.key` they name is a recipe key, and the worked constitution validates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_cai.config.schema import schema_keys

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
PATH = re.compile(r"(?<![\w./-])((?:recipes|lora_cai|docs|benchmarks|notebooks)/[\w.*/<>{}-]*)")
SPAN = re.compile(r"`([^`\n]+)`")
# `eval.json`, `sft.jsonl`: file names whose stem happens to be a section name
FILE_SUFFIXES = {"json", "jsonl", "py", "yaml", "yml", "md", "html", "png", "safetensors", "txt", "csv", "parquet",
                 "gguf", "ipynb"}
KEYS = {k for k, *_ in schema_keys()}
SECTIONS = {k.split(".", 1)[0] for k in KEYS if "." in k}


def test_recipe_reference_is_the_schema_rendered():
    from lora_cai.reference import DOC, render

    assert DOC == ROOT / "docs" / "recipe-reference.md"
    assert DOC.read_text(encoding="utf-8") == render(), "run: python -m lora_cai.reference"


def test_reference_lists_every_key_with_its_default():
    from lora_cai.reference import render

    text = render()
    for key, _typ, default, _help in schema_keys():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        if default == "(required)":
            assert "**required**" in row
    assert "| `model.name` |" in text and "| `dpo.soft_labels` |" in text and "## judge" in text


def test_reference_check_exits_1_when_stale(tmp_path):
    from lora_cai.reference import main

    out = tmp_path / "ref.md"
    assert main(["--check", "--output", str(out)]) == 1  # missing
    assert main(["--output", str(out)]) == 0
    assert main(["--check", "--output", str(out)]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    assert main(["--check", "--output", str(out)]) == 1


def mentioned_paths(text: str) -> set[str]:
    out = set()
    for m in PATH.finditer(text):
        path = m.group(1).rstrip(".")
        if not re.search(r"[<>{}]", path):  # runs/<name>-style placeholders are not paths
            out.add(path)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_repository_path_in_the_docs_exists(doc):
    missing = []
    for path in sorted(mentioned_paths(doc.read_text(encoding="utf-8"))):
        exists = any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()
        if not exists:
            missing.append(path)
    for link in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):  # relative Markdown links
        target = link.split("#", 1)[0]
        if target and not re.match(r"[a-z]+:", target) and not (doc.parent / target).exists():
            missing.append(link)
    assert not missing, f"{doc.name} mentions paths that do not exist: {missing}"


def mentioned_keys(text: str) -> set[str]:
    """Backticked `section.key` names (also inside `--set section.key=value` and `section.key: value`)."""
    out = set()
    for span in SPAN.findall(text):
        for token in span.split():
            if "(" in token:  # model.disable_adapter(): a call, not a key
                continue
            name = token.split("=", 1)[0].strip(":;,.")
            m = re.fullmatch(r"([a-z_]+)\.([a-z_][a-z0-9_.]*|\*)", name)
            if not m or m.group(1) not in SECTIONS or name.rsplit(".", 1)[-1] in FILE_SUFFIXES:
                continue
            if m.group(2) != "*":
                out.add(name)
    return out


def test_key_extraction_skips_files_and_calls():
    text = "`eval.json`, `sft.jsonl`, `model.disable_adapter()`, `generation.*`, `--set sft.batch_size=4`, " \
           "`judge.kind: teacher`, `lora_cai.load_policy`, `dpo.soft_labels`"
    assert mentioned_keys(text) == {"sft.batch_size", "judge.kind", "dpo.soft_labels"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_recipe_key_in_the_docs_exists(doc):
    unknown = sorted(mentioned_keys(doc.read_text(encoding="utf-8")) - KEYS)
    assert not unknown, f"{doc.name} names recipe keys the schema does not have: {unknown}"


def test_constitution_guide_example_validates(tmp_path):
    from lora_cai.cai.constitution import load_constitution

    text = (ROOT / "docs" / "constitutions.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if re.search(r"^principles:", b, re.M)]
    assert blocks, "docs/constitutions.md needs a worked example: a ```yaml block with principles:"
    for n, block in enumerate(blocks):
        path = tmp_path / f"example-{n}.yaml"
        path.write_text(block, encoding="utf-8")
        constitution = load_constitution(str(path))
        assert len(constitution.principles) >= 3
        names = {p.name for p in constitution.principles}
        assert "over_refusal" in names  # the guide's advice, followed by its own example
        assert any(constitution.is_no_change(d.critique) for d in constitution.demonstrations)
        assert any(not constitution.is_no_change(d.critique) for d in constitution.demonstrations)


def test_readme_is_read_in_five_minutes():
    """README is for users (#31): at most 250 lines; the details live in docs/."""
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
