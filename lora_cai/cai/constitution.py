"""Constitutions: principles with critique, revision and judge requests; loading, validation, built-ins.

A constitution is a YAML file::

    name: my_constitution
    description: what it is for            # optional
    no_change_marker: No changes needed    # optional; a critique opening with it means "nothing to revise"
    principles:
      - name: harmless
        critique: Identify specific ways in which the assistant's last response is harmful ...
        revision: Please rewrite the assistant response to remove all harmful ... content.
        judge: Which of these responses is less harmful?
        demonstrations: []                 # optional, principle-specific few-shot examples
    demonstrations:                        # optional, shared few-shot examples
      - prompt: ...
        response: ...                      # the assistant's first answer
        critique: ...                      # plain prose, starting with the finding (or the marker)
        revision: ...                      # the rewritten answer itself, no preamble

`load_constitution("default")` loads a built-in (see `builtin_constitutions()`);
`load_constitution("path/to/file.yaml")` loads a user file. Every mistake in a file raises
`UserError` with one line naming the file, the offending key and the fix.

Only the standard library, pydantic and PyYAML are imported here, so config errors answer fast.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from lora_cai.errors import UserError, problems

__all__ = [
    "Demonstration",
    "Principle",
    "Constitution",
    "builtin_constitutions",
    "load_constitution",
]

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "constitutions"


def _non_empty(value: str) -> str:
    value = value.strip()
    if not value:
        raise PydanticCustomError("empty_text", "is empty")
    return value


# Leading/trailing whitespace is never meaningful in these texts (YAML block scalars add a trailing
# newline); stripping it keeps the hash independent of the YAML quoting style.
Text = Annotated[str, AfterValidator(_non_empty)]


class Demonstration(BaseModel):
    """One few-shot example of a full critique/revision exchange."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(description="the user's request")
    response: Text = Field(description="the assistant's first answer to the prompt")
    critique: Text = Field(
        description="the critique of the response: plain prose starting with the finding, "
        "or starting with the no-change marker when nothing needs revising"
    )
    revision: Text = Field(
        description="the rewritten response itself, with no preamble; "
        "identical to the response when the critique says no changes are needed"
    )


class Principle(BaseModel):
    """One constitutional principle: how to critique, how to revise, how to judge."""

    model_config = ConfigDict(extra="forbid")

    name: Text = Field(description="a short unique identifier such as 'harmless'")
    critique: Text = Field(
        description="the request asking the assistant to critique its last response"
    )
    revision: Text = Field(description="the request asking the assistant to rewrite its response")
    judge: Text = Field(description="the question a judge answers when comparing two responses")
    demonstrations: list[Demonstration] = Field(
        default=[],
        description="optional few-shot examples for this principle (each with prompt, response, "
        "critique, revision)",
    )


class Constitution(BaseModel):
    """A named set of principles plus shared few-shot demonstrations."""

    model_config = ConfigDict(extra="forbid")

    name: Text = Field(description="the constitution's name, e.g. 'default'")
    description: str = Field(default="", description="a free-text description")
    no_change_marker: Text = Field(
        default="No changes needed",
        description="the phrase a critique opens with when nothing needs revising",
    )
    principles: list[Principle] = Field(
        min_length=1,
        description="the list of principles, each with name, critique, revision, judge",
    )
    demonstrations: list[Demonstration] = Field(
        default=[],
        description="shared few-shot examples, used for principles that have none of their own",
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> "Constitution":
        seen: dict[str, int] = {}
        for i, principle in enumerate(self.principles):
            if principle.name in seen:
                raise PydanticCustomError(
                    "duplicate_principle",
                    "principles[{i}].name '{name}' duplicates principles[{j}].name: "
                    "give every principle a unique name",
                    {"i": i, "j": seen[principle.name], "name": principle.name},
                )
            seen[principle.name] = i
        demo_lists = [("demonstrations", self.demonstrations)] + [
            (f"principles[{i}].demonstrations", p.demonstrations)
            for i, p in enumerate(self.principles)
        ]
        for where, demos in demo_lists:
            for k, demo in enumerate(demos):
                if self.is_no_change(demo.critique) and demo.revision != demo.response:
                    raise PydanticCustomError(
                        "inconsistent_demonstration",
                        "{where}[{k}].revision differs from its response although its critique "
                        "says '{marker}': make the revision identical to the response, or write a "
                        "critique that names what to change",
                        {"where": where, "k": k, "marker": self.no_change_marker},
                    )
        return self

    def hash(self) -> str:
        """sha256 hex digest of a canonical JSON dump (sorted keys): stable across runs and machines."""
        canonical = json.dumps(
            self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def demos_for(self, principle: Principle) -> list[Demonstration]:
        """The few-shot demonstrations to prepend for `principle`: its own, else the shared ones."""
        return list(principle.demonstrations or self.demonstrations)

    def principle(self, name: str) -> Principle:
        """The principle called `name`; UserError listing the available names otherwise."""
        for principle in self.principles:
            if principle.name == name:
                return principle
        names = [p.name for p in self.principles]
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(
            f"constitution '{self.name}' has no principle '{name}'{hint}; "
            f"available: {', '.join(names)}"
        )

    def is_no_change(self, critique: str) -> bool:
        """True when `critique` says nothing needs revising: its first non-empty line contains the
        no-change marker (case-insensitively)."""
        for line in str(critique).splitlines():
            if line.strip():
                return self.no_change_marker.casefold() in line.casefold()
        return False


# --------------------------------------------------------------------------------------------------
# Loading


def builtin_constitutions() -> list[str]:
    """Names of the built-in constitutions (lora_cai/constitutions/*.yaml), sorted."""
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_constitution(name_or_path: str | os.PathLike) -> Constitution:
    """Load a built-in constitution by name, or a YAML file by path.

    A string that names an existing file, contains a path separator, or ends in .yaml/.yml is a
    path; anything else is a built-in name. Every mistake raises `UserError` (one line).
    """
    if isinstance(name_or_path, Constitution):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise UserError(
            f"constitution: expected a built-in name or a path to a YAML file, got {name_or_path!r}; "
            f"built-ins: {', '.join(builtin_constitutions()) or 'none'}"
        )
    text = os.fspath(name_or_path).strip()
    path = Path(text).expanduser()
    looks_like_path = (
        isinstance(name_or_path, os.PathLike)
        or path.is_file()
        or "/" in text
        or os.sep in text
        or path.suffix.lower() in (".yaml", ".yml")
    )
    builtins = builtin_constitutions()
    if not looks_like_path:
        if text in builtins:
            return _load_file(BUILTIN_DIR / f"{text}.yaml", label=f"{text}.yaml")
        close = difflib.get_close_matches(text, builtins, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(
            f"constitution: unknown built-in '{text}'{hint}; available built-ins: "
            f"{', '.join(builtins) or 'none'}; or give the path to your own YAML file"
        )
    if not path.exists():
        raise UserError(
            f"constitution {text}: file not found; give the path to an existing YAML file or a "
            f"built-in name ({', '.join(builtins) or 'none'})"
        )
    if not path.is_file():
        raise UserError(f"constitution {text}: is not a file; give the path to a YAML file")
    return _load_file(path, label=text)


class _SafeLoaderNoDuplicates(yaml.SafeLoader):
    """yaml.SafeLoader (no arbitrary objects) that also rejects duplicate keys in a mapping.

    Plain `yaml.safe_load` silently keeps the last of two equal keys, which would drop a principle's
    text without a word; this loader is otherwise exactly SafeLoader.
    """


def _construct_mapping_no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep=False):
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # the base constructor reports unhashable keys itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key '{key}' (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_SafeLoaderNoDuplicates.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_no_duplicates
)


def _load_file(path: Path, label: str) -> Constitution:
    prefix = f"constitution {label}:"
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{prefix} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{prefix} cannot be read ({exc.strerror or exc}); check the path") from None
    try:
        data = yaml.load(raw, Loader=_SafeLoaderNoDuplicates)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise UserError(f"{prefix} {_describe_yaml_error(exc)}") from None
    if isinstance(data, dict) and "name" not in data:
        data = {"name": path.stem, **data}  # a constitution without a name is called after its file
    return _parse(data, prefix)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if problem.startswith("duplicate key"):
        fix = "keep only one of them"
    elif "\\t" in problem:
        fix = "indent with spaces, not tabs"
    else:
        fix = "fix the syntax (check indentation, colons and quotes)"
    return f"invalid YAML{where}: {problem}; {fix}"


def _parse(data: Any, prefix: str) -> Constitution:
    if data is None:
        raise UserError(
            f"{prefix} the file is empty; it needs at least 'principles' "
            "(a list of principles, each with name, critique, revision, judge)"
        )
    if not isinstance(data, dict):
        raise UserError(
            f"{prefix} the top level must be a mapping with keys name, principles "
            f"(and optionally description, no_change_marker, demonstrations), got {_kind(data)}"
        )
    try:
        return Constitution.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{prefix} {problems([_describe_validation_error(e, data) for e in exc.errors()])}") from None



# --------------------------------------------------------------------------------------------------
# Turning pydantic errors into one actionable line


def _loc_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model class whose fields live at `loc` (a path to a mapping), if any."""
    model: type[BaseModel] | None = Constitution
    i = 0
    while i < len(loc):
        if model is None:
            return None
        field = loc[i]
        if field == "principles" and model is Constitution:
            model = Principle
        elif field == "demonstrations":
            model = Demonstration
        else:
            return None
        i += 1
        if i < len(loc) and isinstance(loc[i], int):
            i += 1
        else:
            return None  # a list itself, not one of its items
    return model


def _field_help(loc: tuple) -> str:
    model = _model_at(loc[:-1])
    if model is None or not loc or loc[-1] not in model.model_fields:
        return ""
    return model.model_fields[loc[-1]].description or ""


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _required_keys(model: type[BaseModel]) -> list[str]:
    return [name for name, f in model.model_fields.items() if f.is_required()]


def _describe_validation_error(err: dict, data: Any) -> str:
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    where = _loc_str(loc)
    value = err.get("input")
    help_text = _field_help(loc)
    help_suffix = f" ({help_text})" if help_text else ""

    if kind == "missing":
        parent = _loc_str(loc[:-1])
        subject = f"{parent} is missing" if parent else "missing"
        return f"{subject} '{loc[-1]}'{help_suffix}"

    if kind == "extra_forbidden":
        parent_loc = loc[:-1]
        model = _model_at(parent_loc)
        allowed = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        parent = _loc_str(parent_loc) or "the top level"
        return (
            f"unknown key '{loc[-1]}' in {parent}; {hint}allowed keys: {', '.join(allowed)}"
        )

    if kind == "empty_text" or (kind == "string_type" and value is None):
        what = help_text or "some text"
        return f"{where} is empty; write {what}"

    if kind == "string_type":
        hint = "; quote it in YAML" if isinstance(value, (bool, int, float)) else ""
        return f"{where} must be a string, got {_kind(value)}{hint}"

    if kind == "list_type":
        item_model = _model_at(loc + (0,))
        item = (
            f" of mappings, each with {', '.join(_required_keys(item_model))}"
            if item_model
            else ""
        )
        return f"{where} must be a list{item}; got {_kind(value)}"

    if kind in ("model_type", "model_attributes_type", "dict_type"):
        model = _model_at(loc)
        keys = f" with keys {', '.join(_required_keys(model))}" if model else ""
        return f"{where} must be a mapping{keys}; got {_kind(value)}"

    if kind == "too_short" and loc == ("principles",):
        return (
            "principles is empty; add at least one principle "
            "(each with name, critique, revision, judge)"
        )

    if kind in ("duplicate_principle", "inconsistent_demonstration"):
        return err["msg"] if not where else f"{where}: {err['msg']}"

    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return f"{where or 'the top level'}: {msg}"
