"""Every user mistake: exit code 2, exactly one `error: ...` line on stderr naming the file and the key at
fault, no traceback, nothing on disk changed, and no heavy import (torch, transformers, ...) on the way.

The table below builds each malformed input under `tmp_path` and says which fragments the one error line
must contain (the file at fault and the key or culprit). Most cases run in-process through
`lora_cai.recipe.main` (fast); a few representative ones run as real `python -m lora_cai.recipe`
subprocesses with a time limit. Models are non-existent paths: every error must fire before a model loads.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from lora_cai.recipe import main

MODEL = "/nonexistent/lora-cai-test-model"
HEAVY = ("torch", "transformers", "datasets", "unsloth", "peft", "trl", "bitsandbytes", "accelerate")
DROP = object()  # a value meaning "remove this key from the base recipe"

GOOD_CONSTITUTION = """\
name: mine
principles:
  - name: harmless
    critique: Identify ways in which the last response is harmful.
    revision: Rewrite the response to remove the harmful content.
    judge: Which of these responses is less harmful?
"""


# --------------------------------------------------------------------------------------------------
# Builders for the malformed inputs


def base_recipe(tmp: Path) -> dict:
    return {
        "name": "cli-errors",
        "model": {"name": MODEL, "backend": "transformers"},
        "constitution": "default",
        "data": {"prompts": "builtin:smoke", "limit": 4, "eval_limit": 2},
        "rounds": 1,
        "output_dir": str(tmp / "run"),
    }


def write(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def recipe(tmp: Path, changes: dict | None = None, name: str = "recipe.yaml") -> str:
    """The base recipe with `changes` applied (dotted keys; DROP removes), written to `name`."""
    data = copy.deepcopy(base_recipe(tmp))
    for dotted, value in (changes or {}).items():
        *parents, last = dotted.split(".")
        node = data
        for k in parents:
            node = node.setdefault(k, {})
        if value is DROP:
            node.pop(last, None)
        else:
            node[last] = value
    return str(write(tmp, name, yaml.safe_dump(data, sort_keys=False)))


def raw_recipe(text: str | bytes, name: str = "recipe.yaml") -> Callable[[Path], list[str]]:
    return lambda t: [str(write(t, name, text))]


def with_recipe(changes: dict | None = None, *extra: str) -> Callable[[Path], list[str]]:
    return lambda t: [recipe(t, changes), *extra]


def with_constitution(text: str | bytes | None, name: str = "const.yaml") -> Callable[[Path], list[str]]:
    def build(t: Path) -> list[str]:
        path = t / name if text is None else write(t, name, text)
        return [recipe(t, {"constitution": str(path)})]
    return build


def with_prompts(content: str | bytes | None, name: str = "prompts.jsonl",
                 changes: dict | None = None) -> Callable[[Path], list[str]]:
    """A recipe whose data.prompts is the file `name` (absent when content is None) plus `changes`."""
    def build(t: Path) -> list[str]:
        path = t / name if content is None else write(t, name, content)
        return [recipe(t, {"data.prompts": str(path), **(changes or {})})]
    return build


def a_directory(name: str) -> Callable[[Path], list[str]]:
    def build(t: Path) -> list[str]:
        (t / name).mkdir()
        return [str(t / name)]
    return build


def run_dir(files: dict[str, str | bytes | None], *extra: str) -> Callable[[Path], list[str]]:
    """An existing run directory `run/` holding `files` (None makes a folder) beside a valid recipe."""
    def build(t: Path) -> list[str]:
        for rel, content in files.items():
            if content is None:
                (t / "run" / rel).mkdir(parents=True, exist_ok=True)
            else:
                write(t / "run", rel, content)
        return [recipe(t), *extra]
    return build


def manifest(model_name: str) -> str:
    return json.dumps({"lora_cai": "0.1.0", "name": "cli-errors", "model": {"name": model_name},
                       "stack": ["round-1/adapter"], "rounds": {"1": {"prompts": 4}}}, indent=2)


RUN_FILES = {  # what a half-finished run leaves behind
    "round-1/responses.jsonl": '{"id": "a", "prompt": "p", "response": "r"}\n',
    "round-1/responses.jsonl.meta.json": '{"inputs": "x", "committed_bytes": 44, "batches": [0], "count": 1}\n',
    "round-1/adapter/adapter_model.safetensors": b"\x00\x01 not really weights \xff",
    "baseline-eval.json": '{"inputs": "y", "harmful_compliance": 0.5}\n',
}


# --------------------------------------------------------------------------------------------------
# The table: (id, build argv from tmp_path, fragments the one error line must contain)


@dataclass
class Case:
    id: str
    argv: Callable[[Path], list[str]]
    must: tuple[str, ...]


def case(id: str, argv: Callable[[Path], list[str]], *must: str) -> Case:
    return Case(id, argv, must)


CASES = [
    # ---- the recipe file itself
    case("recipe-malformed-yaml", raw_recipe(f"model:\n  name: {MODEL}\ndata:\n  prompts: builtin:smoke\n"
                                             "  limit: [1, 2\nrounds: 1\n"),
         "recipe.yaml", "malformed YAML", "line 6"),
    case("recipe-tab-indent", raw_recipe(f"model:\n\tname: {MODEL}\n"), "recipe.yaml", "malformed YAML", "line 2"),
    case("recipe-unclosed-quote", raw_recipe(f'model:\n  name: "{MODEL}\ndata:\n  prompts: x\n'),
         "recipe.yaml", "malformed YAML", "line"),
    case("recipe-two-documents", raw_recipe("model: {name: a}\n---\ndata: {prompts: b}\n"),
         "recipe.yaml", "malformed YAML", "line 2"),
    case("recipe-is-a-list", raw_recipe("- model\n- data\n"), "recipe.yaml", "mapping", "list"),
    case("recipe-is-a-scalar", raw_recipe("just some text\n"), "recipe.yaml", "mapping", "str"),
    case("recipe-empty-file", raw_recipe(""), "recipe.yaml", "missing required key 'model'"),
    case("recipe-only-comments", raw_recipe("# nothing here yet\n"), "recipe.yaml", "missing required key 'model'"),
    case("recipe-not-utf8", raw_recipe("model:\n  name: caf\xe9\n".encode("latin-1")), "recipe.yaml", "UTF-8"),
    case("recipe-missing-file", lambda t: [str(t / "nope.yaml")], "nope.yaml", "not found"),
    case("recipe-is-a-directory", a_directory("recipes.yaml"), "recipes.yaml", "is a directory"),
    case("unknown-top-level-key", with_recipe({"rouns": 2}), "recipe.yaml", "unknown key 'rouns'"),
    case("unknown-nested-key-sft", with_recipe({"sft.lerning_rate": 1e-4}), "recipe.yaml",
         "unknown key 'sft.lerning_rate'"),
    case("unknown-nested-key-model", with_recipe({"model.bakend": "auto"}), "recipe.yaml",
         "unknown key 'model.bakend'"),
    case("type-rounds-string", with_recipe({"rounds": "two"}), "recipe.yaml", "'rounds'", "'two'"),
    case("type-rounds-float", with_recipe({"rounds": 1.5}), "recipe.yaml", "'rounds'", "1.5"),
    case("type-learning-rate", with_recipe({"sft.learning_rate": "fast"}), "recipe.yaml", "'sft.learning_rate'"),
    case("type-load-in-4bit", with_recipe({"model.load_in_4bit": "maybe"}), "recipe.yaml", "'model.load_in_4bit'"),
    case("type-target-modules", with_recipe({"lora.target_modules": 7}), "recipe.yaml", "'lora.target_modules'"),
    case("type-section-scalar", with_recipe({"generation": 5}), "recipe.yaml", "'generation'"),
    case("type-model-null", with_recipe({"model": None}), "recipe.yaml", "'model'"),
    case("type-output-dir-list", with_recipe({"output_dir": ["a", "b"]}), "recipe.yaml", "'output_dir'"),
    case("range-rounds-negative", with_recipe({"rounds": -1}), "recipe.yaml", "'rounds'", "-1"),
    case("range-rounds-zero", with_recipe({"rounds": 0}), "recipe.yaml", "'rounds'"),
    case("range-top-p", with_recipe({"generation.top_p": 1.5}), "recipe.yaml", "'generation.top_p'", "1.5"),
    case("range-lora-dropout", with_recipe({"lora.dropout": 1.0}), "recipe.yaml", "'lora.dropout'"),
    case("range-data-limit", with_recipe({"data.limit": 0}), "recipe.yaml", "'data.limit'"),
    case("range-critique-steps", with_recipe({"critique.steps": -1}), "recipe.yaml", "'critique.steps'"),
    case("no-critique-needs-best-of-n", with_recipe({"critique.steps": 0}), "recipe.yaml", "pairs.builder: best_of_n"),
    case("teacher-judge-needs-model", with_recipe({"judge.kind": "teacher"}), "recipe.yaml", "judge.model"),
    case("api-judge-needs-url", with_recipe({"judge.kind": "api", "judge.model": "m"}), "recipe.yaml",
         "judge.base_url"),
    case("rule-judge-needs-rules", with_recipe({"judge.kind": "rule"}), "recipe.yaml", "judge.rules"),
    case("teacher-critic-needs-teacher", with_recipe({"critic": "teacher"}), "recipe.yaml", "judge.kind: teacher"),
    case("api-critic-needs-api-judge", with_recipe({"critic": "api"}), "recipe.yaml", "judge.kind: api"),
    case("bad-judge-kind", with_recipe({"judge.kind": "oracle"}), "recipe.yaml", "'judge.kind'"),
    case("judge-confidence-range", with_recipe({"judge.confidence": 0.3}), "recipe.yaml", "'judge.confidence'"),
    case("bad-pairs-builder", with_recipe({"pairs.builder": "random"}), "recipe.yaml", "'pairs.builder'"),
    case("n-samples-too-few", with_recipe({"pairs.n_samples": 1}), "recipe.yaml", "'pairs.n_samples'"),
    case("bad-soft-labels", with_recipe({"dpo.soft_labels": "yes"}), "recipe.yaml", "'dpo.soft_labels'"),
    case("nothing-trains", with_recipe({"sft.epochs": 0, "dpo.epochs": 0}), "recipe.yaml",
         "sft.epochs and dpo.epochs are both 0"),
    case("orpo-without-its-stage", with_recipe({"dpo.loss": "orpo", "dpo.epochs": 0}), "recipe.yaml",
         "dpo.epochs 0 skips the preference stage, but dpo.loss orpo"),
    case("range-helpful-fraction-one", with_recipe({"sft.helpful_data": "builtin:helpful", "sft.helpful_fraction": 1.0}),
         "recipe.yaml", "'sft.helpful_fraction'", "1.0"),
    case("range-helpful-fraction-negative", with_recipe({"sft.helpful_fraction": -0.2}), "recipe.yaml",
         "'sft.helpful_fraction'", "-0.2"),
    case("blank-helpful-data", with_recipe({"sft.helpful_data": " "}), "recipe.yaml", "'sft.helpful_data'", "empty"),
    case("set-helpful-fraction-one", with_recipe(None, "--set", "sft.helpful_fraction=1"),
         "--set sft.helpful_fraction=1", "'sft.helpful_fraction'"),
    case("bad-report-to", with_recipe({"report_to": ["comet"]}), "recipe.yaml", "'report_to"),
    case("missing-model", with_recipe({"model": DROP}), "recipe.yaml", "missing required key 'model'"),
    case("missing-model-name", with_recipe({"model.name": DROP}), "recipe.yaml", "missing required key 'model.name'"),
    case("empty-model-name", with_recipe({"model.name": ""}), "recipe.yaml", "'model.name'", "empty"),
    case("missing-data", with_recipe({"data": DROP}), "recipe.yaml", "missing required key 'data'"),
    case("missing-data-prompts", with_recipe({"data.prompts": DROP}), "recipe.yaml",
         "missing required key 'data.prompts'"),
    case("blank-data-prompts", with_recipe({"data.prompts": "   "}), "recipe.yaml", "'data.prompts'", "empty"),
    case("empty-run-name", with_recipe({"name": ""}), "recipe.yaml", "'name'", "empty"),
    case("invalid-backend", with_recipe({"model.backend": "vllm"}), "recipe.yaml", "'model.backend'", "'vllm'"),
    case("invalid-dtype", with_recipe({"model.dtype": "fp8"}), "recipe.yaml", "'model.dtype'", "'fp8'"),
    # ---- the command line
    case("set-without-equals", with_recipe(None, "--set", "rounds"), "--set 'rounds'", "KEY=VALUE"),
    case("set-empty-key", with_recipe(None, "--set", "=3"), "--set =3", "empty key"),
    case("set-unknown-key", with_recipe(None, "--set", "sft.lerning_rate=1e-4"), "recipe.yaml",
         "--set sft.lerning_rate=1e-4", "unknown key 'sft.lerning_rate'"),
    case("set-out-of-range", with_recipe(None, "--set", "rounds=-2"), "recipe.yaml", "--set rounds=-2", "'rounds'"),
    case("set-wrong-type", with_recipe(None, "--set", "generation.top_p=high"), "--set generation.top_p=high",
         "'generation.top_p'"),
    case("set-into-a-scalar", with_recipe(None, "--set", "model.name.x=1"), "--set model.name.x=1",
         "'name' is not a section"),
    case("set-invalid-backend", with_recipe(None, "--set", "model.backend=vllm"), "--set model.backend=vllm",
         "'model.backend'"),
    case("set-missing-value", with_recipe(None, "--set"), "--set", "expected one argument"),
    case("unknown-option", with_recipe(None, "--bogus"), "--bogus", "--help"),
    case("no-recipe-given", lambda t: [], "give a recipe"),
    # ---- the constitution
    case("constitution-unknown-builtin", with_recipe({"constitution": "defualt"}), "recipe.yaml", "constitution",
         "'defualt'", "did you mean 'default'"),
    case("constitution-missing-file", with_constitution(None), "recipe.yaml", "const.yaml", "not found"),
    case("constitution-empty-file", with_constitution(""), "const.yaml", "empty"),
    case("constitution-no-principles", with_constitution("name: mine\nprinciples: []\n"), "const.yaml",
         "principles is empty"),
    case("constitution-principles-missing", with_constitution("name: mine\n"), "const.yaml", "'principles'"),
    case("constitution-principle-missing-judge",
         with_constitution(GOOD_CONSTITUTION.replace("    judge: Which of these responses is less harmful?\n", "")),
         "const.yaml", "principles[0]", "'judge'"),
    case("constitution-unknown-key", with_constitution(GOOD_CONSTITUTION + "descripton: typo\n"),
         "const.yaml", "unknown key 'descripton'"),
    case("constitution-malformed-yaml", with_constitution("name: mine\nprinciples:\n  - name: [a\n"),
         "const.yaml", "invalid YAML", "line"),
    case("constitution-not-utf8", with_constitution(GOOD_CONSTITUTION.replace("mine", "caf\xe9").encode("latin-1")),
         "const.yaml", "UTF-8"),
    # ---- the prompts
    case("prompts-missing-file", with_prompts(None), "data.prompts", "prompts.jsonl", "not found"),
    case("prompts-missing-relative-txt", with_recipe({"data.prompts": "no-such-prompts.txt"}),
         "data.prompts", "no-such-prompts.txt", "not found"),
    case("prompts-empty-file", with_prompts(""), "data.prompts", "prompts.jsonl", "no prompts"),
    case("prompts-blank-lines-only", with_prompts("\n  \n\n"), "data.prompts", "prompts.jsonl", "no prompts"),
    case("prompts-wrong-column", with_prompts('{"text": "hello"}\n{"text": "bye"}\n'), "data.prompts",
         "prompts.jsonl", "no column 'prompt'", "data.prompt_column"),
    case("prompts-prompt-column-typo", with_prompts('{"prompt": "hello"}\n', changes={"data.prompt_column": "promt"}),
         "data.prompts", "prompts.jsonl", "no column 'promt'"),
    case("prompts-all-empty", with_prompts('{"prompt": ""}\n{"prompt": "   "}\n{"prompt": null}\n'),
         "data.prompts", "prompts.jsonl", "empty"),
    case("prompts-malformed-jsonl-line", with_prompts('{"prompt": "ok"}\n{"prompt": "broken\n'), "data.prompts",
         "prompts.jsonl", "line 2", "not valid JSON"),
    case("prompts-line-not-an-object", with_prompts('{"prompt": "ok"}\n["a list"]\n'), "data.prompts",
         "prompts.jsonl", "JSON object"),
    case("prompts-unsupported-txt", with_prompts("one prompt per line\n", name="prompts.txt"), "data.prompts",
         "prompts.txt", "unsupported file type '.txt'"),
    case("prompts-unknown-builtin", with_recipe({"data.prompts": "builtin:nope"}), "data.prompts",
         "unknown built-in prompt set 'nope'"),
    case("prompts-csv-without-column", with_prompts("question,answer\nhi,there\n", name="prompts.csv"),
         "data.prompts", "prompts.csv", "no column 'prompt'"),
    case("prompts-csv-header-only", with_prompts("prompt\n", name="prompts.csv"), "data.prompts", "prompts.csv",
         "no prompts"),
    case("prompts-not-utf8", with_prompts('{"prompt": "caf\xe9"}\n'.encode("latin-1")), "data.prompts",
         "prompts.jsonl", "UTF-8"),
    case("prompts-json-array-broken", with_prompts('[{"prompt": "a"},', name="prompts.json"), "data.prompts",
         "prompts.json"),
    case("eval-prompts-unknown-builtin", with_recipe({"data.eval_harmful": "builtin:nope"}), "data.eval_harmful",
         "'nope'"),
    # ---- an existing run directory
    case("rundir-other-base-model", run_dir({"manifest.json": manifest("other/base-model"), **RUN_FILES}),
         "manifest.json", "'other/base-model'", MODEL, "--output-dir"),
    case("rundir-other-base-model-via-flag",
         lambda t: run_dir({"elsewhere/manifest.json": manifest("other/base-model")},
                           "--output-dir", str(t / "run" / "elsewhere"))(t),
         "elsewhere/manifest.json", "'other/base-model'"),
    case("rundir-manifest-not-json", run_dir({"manifest.json": '{"model": {"name": ', **RUN_FILES}),
         "manifest.json", "--output-dir"),
    case("rundir-manifest-not-utf8", run_dir({"manifest.json": b'{"model": "\xff\xfe"}', **RUN_FILES}),
         "manifest.json", "--output-dir"),
    case("rundir-manifest-a-list", run_dir({"manifest.json": "[1, 2, 3]\n", **RUN_FILES}),
         "manifest.json", "--output-dir"),
    case("rundir-manifest-model-a-string", run_dir({"manifest.json": '{"model": "gpt2"}\n', **RUN_FILES}),
         "manifest.json", "--output-dir"),
    case("rundir-manifest-a-directory", run_dir({"manifest.json": None, **RUN_FILES}),
         "manifest.json", "--output-dir"),
    case("rundir-output-dir-is-a-file", lambda t: [recipe(t, {"output_dir": str(write(t, "run.txt", "x"))})],
         "run.txt", "not a directory"),
]


# --------------------------------------------------------------------------------------------------
# Helpers for the checks


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for folders)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def check_one_line(err: str, must: tuple[str, ...]) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert err.endswith("\n")
    assert line.startswith("error: ") and line[len("error: "):].strip(), line
    for fragment in must:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from tmp_path so relative paths (and any stray runs/ folder) stay inside it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_table_is_large_and_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 40


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_user_error_is_one_line_exit_2(c: Case, in_tmp: Path, capsys):
    argv = c.argv(in_tmp)
    capsys.readouterr()
    before = snapshot(in_tmp)
    heavy_before = {m for m in HEAVY if m in sys.modules}
    t = time.perf_counter()
    rc = main(argv)
    elapsed = time.perf_counter() - t
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    check_one_line(err, c.must)
    assert out == ""
    assert snapshot(in_tmp) == before, "the error path changed files on disk"
    newly = {m for m in HEAVY if m in sys.modules} - heavy_before
    assert not newly, f"imported {sorted(newly)} before reporting the error"
    assert elapsed < 2.0, f"took {elapsed:.2f}s"


# --------------------------------------------------------------------------------------------------
# As a user runs it: real subprocesses


def run_cli(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="120")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lora_cai.recipe", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=60)
    return proc, time.perf_counter() - t


SUBPROCESS_CASES = ["recipe-malformed-yaml", "set-unknown-key", "prompts-missing-relative-txt",
                    "rundir-manifest-not-json", "set-missing-value"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_subprocess_user_error(case_id: str, tmp_path: Path):
    c = next(c for c in CASES if c.id == case_id)
    argv = c.argv(tmp_path)
    before = snapshot(tmp_path)
    proc, elapsed = run_cli(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    check_one_line(proc.stderr, c.must)
    assert proc.stdout == ""
    assert snapshot(tmp_path) == before
    assert elapsed < 10, f"took {elapsed:.1f}s"


def test_subprocess_help_is_quick(tmp_path: Path):
    proc, elapsed = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "--set" in proc.stdout
    assert elapsed < 10, f"took {elapsed:.1f}s"


def test_cli_modules_do_not_import_torch():
    code = ("import sys, lora_cai.recipe, lora_cai.config.load, lora_cai.data.sources, lora_cai.cai.constitution; "
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_every_problem_of_a_file_at_once(tmp_path, capsys):
    """A recipe, a rule file and a capability file with several mistakes: all of them on one line, exit 2."""
    path = recipe(tmp_path, {"model.dtype": "f8", "data.limit": -1, "bogus": 1})
    assert main([path, "--set", "rounds=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {path}: 4 problems: "), err
    for part in ("key 'model.dtype'", "key 'data.limit'", "--set rounds=0: key 'rounds'", "unknown key 'bogus'"):
        assert part in err, part
    rules = write(tmp_path, "rules.yaml", "- {name: a, pattern: '(unclosed'}\n- {name: b}\n- {pattern: x, kind: maybe}\n")
    assert main([recipe(tmp_path, {"judge": {"kind": "rule", "rules": str(rules)}})]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "judge.rules" in err and "3 problems: rule 1: invalid regular expression" in err
    assert "rule 2 needs a non-empty 'pattern'" in err and "rule 3: kind must be 'forbid' or 'require'" in err
    cap = write(tmp_path, "cap.jsonl", '{"id": "1", "question": "", "choices": ["a", "b"], "answer": 0}\n'
                                       '{"id": "2", "question": "Q?", "choices": ["a"], "answer": 0}\n')
    assert main([recipe(tmp_path, {"eval": {"capability": str(cap)}})]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "2 problems: line 1: field 'question'" in err and "line 2: field 'choices'" in err
