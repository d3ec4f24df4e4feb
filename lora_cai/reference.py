"""The recipe reference (docs/recipe-reference.md) rendered from the schema.

    python -m lora_cai.reference           # (re)write docs/recipe-reference.md
    python -m lora_cai.reference --check   # exit 1 when the file differs from the schema (CI, tests/test_docs.py)

Every row comes from `config.schema_keys()` (key, default, help text: written once, in lora_cai/config/schema.py);
the type column is read from the same pydantic fields, with their choices and bounds. Only the one-line
introductions of the sections are written here.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import typing
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "recipe-reference.md"

# One line per section, shown above its table. A section missing here still renders, without an introduction.
SECTION_INTROS = {
    "model": "The base chat model and how it is loaded (4-bit by default).",
    "data": "Training prompts and the held-out sets evaluated before the first round and after each.",
    "generation": "Initial responses, critiques and revisions: lengths, sampling, batching, or an "
                  "OpenAI-compatible server to generate on.",
    "critique": "The critique -> revision loop (CAI phase 1).",
    "judge": "Who compares two responses when pairs are judged (best-of-N, judged revisions, win rates).",
    "pairs": "How the round's preference pairs for DPO are built.",
    "eval": "Held-out evaluation after each round: answers, win rate against the previous round, the "
            "capability probe, the critic check and early stopping.",
    "lora": "The LoRA adapter each round trains (stacked on the adapters of earlier rounds).",
    "sft": "Supervised fine-tuning of the new adapter on the round's revisions (TRL SFTTrainer).",
    "dpo": "DPO of the new adapter on the round's pairs, against the round's starting policy (TRL DPOTrainer).",
}


def _field(key: str):
    """The pydantic FieldInfo of a dotted recipe key."""
    from lora_cai.config.schema import RecipeConfig

    model, field = RecipeConfig, None
    for part in key.split("."):
        field = model.model_fields[part]
        model = field.annotation
    return field


def _literal_values(ann) -> list | None:
    if typing.get_origin(ann) is typing.Literal:
        return list(typing.get_args(ann))
    return None


def _type_name(ann) -> str:
    values = _literal_values(ann)
    if values is not None:
        return "one of " + ", ".join(f"`{v}`" for v in values)
    origin = typing.get_origin(ann)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return inner + " or `null`" if len(args) < len(typing.get_args(ann)) else inner
    if origin is list:
        (item,) = typing.get_args(ann) or (typing.Any,)
        values = _literal_values(item)
        return "list of " + (", ".join(f"`{v}`" for v in values) if values is not None else _type_name(item))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(ann)[0])
    return getattr(ann, "__name__", str(ann).replace("typing.", ""))


def _bounds(field) -> str:
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >=", "max_length": "length <="}
    out = []
    for meta in field.metadata:
        for attr, sign in signs.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return ", ".join(out)


def type_text(key: str) -> str:
    field = _field(key)
    text = _type_name(field.annotation)
    bounds = _bounds(field)
    return f"{text}, {bounds}" if bounds else text


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def default_text(default: str) -> str:
    """schema_keys' default (a repr) as it would be written in YAML."""
    if default == "(required)":
        return "**required**"
    try:
        value = ast.literal_eval(default)
    except (ValueError, SyntaxError):
        return f"`{default}`"
    text = _yaml_value(value)
    return f"`{text}`" if text != "" else '`""`'


def _cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, and a tag-like `<` outside code spans (HTML would swallow `<name>`)."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):  # outside backticks
        parts[i] = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", parts[i])
    return "`".join(parts)


def _table(rows) -> list[str]:
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, _typ, default, help_ in rows:
        out.append(f"| `{key}` | {_cell(type_text(key))} | {_cell(default_text(default))} | {_cell(help_)} |")
    return out


def render() -> str:
    """docs/recipe-reference.md: every recipe key, grouped by section, with its type, default and meaning."""
    from lora_cai.config.schema import schema_keys

    rows = schema_keys()
    top = [r for r in rows if "." not in r[0]]
    sections: dict[str, list] = {}
    for r in rows:
        if "." in r[0]:
            sections.setdefault(r[0].split(".", 1)[0], []).append(r)
    lines = [
        "# Recipe reference",
        "",
        "<!-- Generated by `python -m lora_cai.reference` from lora_cai/config/schema.py; do not edit by hand. -->",
        "",
        "A recipe is a YAML file validated against one typed schema (lora_cai/config/schema.py): an unknown key, a wrong",
        "type or a value out of range stops the run before any model loads, with one line naming the key. Keys of",
        "a section nest under it (`model:` then `name:` indented), and any key can be overridden on the command",
        "line with its dotted name:",
        "",
        "```bash",
        "python -m lora_cai.recipe smoke --set rounds=3 --set sft.learning_rate=1e-4",
        "python -m lora_cai.recipe smoke --dry-run    # validate, print the memory plan, load nothing",
        "python -m lora_cai.recipe --help-keys                     # this table in the terminal",
        "```",
        "",
        "Relative paths in a recipe (prompt files, a constitution, judge rules) are read beside the recipe file",
        "when they exist there. The built-in recipes (`python -m lora_cai.recipe --list`, lora_cai/recipes/) are worked examples.",
        "",
        "Sections: " + ", ".join(["[top level](#top-level-keys)"] + [f"[`{s}`](#{s})" for s in sections]) + ".",
        "",
        "## Top-level keys",
        "",
        *_table(top),
    ]
    for name, section_rows in sections.items():
        lines += ["", f"## {name}", ""]
        if name in SECTION_INTROS:
            lines += [SECTION_INTROS[name], ""]
        lines += _table(section_rows)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_cai.reference",
                                description="Write docs/recipe-reference.md from the recipe schema.")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from the schema; write nothing")
    p.add_argument("--output", type=Path, default=DOC, help=f"where the reference goes (default {DOC})")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
        if current != text:
            print(f"{args.output}: out of date with lora_cai/config/schema.py; run python -m lora_cai.reference",
                  file=sys.stderr)
            return 1
        print(f"{args.output}: up to date")
        return 0
    from lora_cai.core.store import atomic_write_text

    atomic_write_text(args.output, text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
