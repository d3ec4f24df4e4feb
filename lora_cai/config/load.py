"""Recipe files: finding built-in recipes and rules, YAML loading, `--set` overrides, every problem in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lora_cai.config.builtin import find_recipe
from lora_cai.config.schema import RecipeConfig
from lora_cai.errors import UserError, problems


def _set_key(data: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    if not all(k.strip() for k in keys):
        raise UserError(f"{where}: empty key name; expected KEY=VALUE, e.g. --set rounds=2 or --set sft.learning_rate=1e-4")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UserError(f"{where}: cannot set '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def _blame(loc: tuple[str, ...], set_keys: list[tuple[tuple[str, ...], str]], flag: str) -> str:
    """'--set KEY=VALUE: ' when the error's key (or a section around it) was given on the command line."""
    for key, item in reversed(set_keys):
        n = min(len(key), len(loc))
        if n and key[:n] == loc[:n]:
            return f"{flag} {item}: "
    return ""


def _format_error(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if not key:  # a cross-key rule (model validator): its message names the keys
        return err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return f"unknown key '{key}' (check its spelling; `python -m lora_cai.recipe --help-keys` lists all keys)"
    if kind == "missing":
        return f"missing required key '{key}' (add it; `python -m lora_cai.recipe --help-keys` lists all keys)"
    given = err.get("input")
    shown = repr(given) if not isinstance(given, (dict, list)) else type(given).__name__
    return f"key '{key}': {err['msg'].removeprefix('Value error, ')} (got {shown})"


def load_recipe(path: str | Path, overrides: list[str] = (), output_dir: str | None = None) -> RecipeConfig:
    """Read and validate a recipe (a built-in name or a YAML path); `overrides` are `key.sub=value` strings (values
    parsed as YAML)."""
    path = find_recipe(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: malformed YAML{line}: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of keys (model:, data:, ...), got {type(data).__name__}")
    return recipe_from_dict(data, overrides, output_dir, source=str(path))


def recipe_from_dict(data: dict, overrides: list[str] = (), output_dir: str | None = None, *,
                     source: str = "recipe dict", flag: str = "--set") -> RecipeConfig:
    """Validate a recipe's keys (a parsed YAML file or a dict from the API) with `key.sub=value` overrides.

    Errors name `source`, or the override that caused them (`{flag} key=value`); relative paths in the
    recipe resolve against `source`'s folder when it is a file, else the current directory.
    """
    import copy

    data = copy.deepcopy(data)
    set_keys: list[tuple[tuple[str, ...], str]] = []  # (key path, the --set argument) to blame in errors
    for item in overrides:
        if "=" not in item:
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} rounds=2")
        key, raw = item.split("=", 1)
        set_keys.append((tuple(k.strip() for k in key.split(".")), item))
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        _set_key(data, key.strip(), value, f"{flag} {item}")
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    try:
        cfg = RecipeConfig.model_validate(data)
    except ValidationError as e:
        # every problem of the file at once, each blamed on its --set when it came from one
        found = [_blame(tuple(str(p) for p in err["loc"]), set_keys, flag) + _format_error(err) for err in e.errors()]
        raise UserError(f"{source}: {problems(found)}") from None
    object.__setattr__(cfg, "source", source)
    return cfg
