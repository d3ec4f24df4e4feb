"""Where the built-in recipes and rule files live, and finding a recipe by name or by path."""

from __future__ import annotations

from pathlib import Path

from lora_cai.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # the built-in recipes and their rule files
RULES_DIR = RECIPES_DIR / "rules"


def builtin_recipes() -> dict[str, Path]:
    """The recipes shipped inside the package, by name (`smoke` is lora_cai/recipes/smoke.yaml)."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_header(path: Path) -> dict[str, str]:
    """The `# Launch:`, `# Purpose:` and `# Hardware:` lines at the top of a recipe, by field."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line.lstrip("# ").partition(":")
        if key in ("Launch", "Purpose", "Hardware") and key not in out:
            out[key] = value.strip()
    return out


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: a file path runs the file; otherwise a built-in name runs the built-in (a folder that happens to
    share its name, such as the notebooks' `smoke/`, shadows nothing); a directory that is no built-in's name is the
    error."""
    path = Path(name_or_path)
    text = str(name_or_path)
    builtins = builtin_recipes()
    if path.is_file():
        return path
    if text in builtins:
        return builtins[text]
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a recipe file (give a built-in recipe name such as smoke, or "
                        f"the path to a YAML recipe)")
    if path.exists() or "/" in text or "\\" in text or path.suffix.lower() in (".yaml", ".yml"):
        raise UserError(f"{path}: recipe file not found (give a built-in recipe name such as smoke, or the path "
                        f"to a YAML recipe; python -m lora_cai.recipe --list shows the built-ins)")
    import difflib

    close = difflib.get_close_matches(text, list(builtins), n=1)
    raise UserError(f"{text}: no such built-in recipe{f' (did you mean {close[0]}?)' if close else ''} and no such "
                    f"file; built-ins: {', '.join(builtins)} (python -m lora_cai.recipe --list)")


def builtin_rules(source: str) -> Path:
    """`builtin:<name>` as a rule file shipped with the package (lora_cai/recipes/rules/<name>.yaml)."""
    name = source.split(":", 1)[1]
    path = RULES_DIR / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(f"builtin:{p.stem}" for p in sorted(RULES_DIR.glob("*.yaml")))
        raise UserError(f"judge.rules: no built-in rule file '{source}' (available: {available}); or give a path")
    return path
