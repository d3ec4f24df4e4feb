"""The notebooks in notebooks/ run top to bottom in smoke mode (LORA_CAI_SMOKE=1: the tiny offline model, a
shrunken recipe) in a real Jupyter kernel, and use only the public API; plus `lora_cai.run` on dict recipes.

The kernel is the Python running these tests: the test writes its own kernel spec (argv = sys.executable) into
a temporary Jupyter data directory put first on JUPYTER_PATH, so no installed or user kernel spec can win.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

import lora_cai

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "lora-cai-test"
REPORT_FILES = ["report.md", "report.html", "report/sft_loss.png", "report/dpo.png", "report/eval.png",
                "report/critique_outcomes.png"]
# notebook -> (run directory relative to the notebook's working directory, expected adapter stack)
EXPECTED = {
    "colab_quickstart.ipynb": ("runs/quickstart-smoke", ["round-1/adapter"]),
    "local_24gb.ipynb": ("runs/local-24gb-smoke", ["round-1/adapter", "round-2/adapter"]),
    "write_your_constitution.ipynb": ("runs/my-constitution-smoke", ["round-1/adapter"]),
}
CELL_TIMEOUT = 600


def _read(name: str):
    import nbformat  # the dev extra: pip install -e ".[dev]"

    return nbformat.read(NOTEBOOKS / name, as_version=4)


def _code_cells(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_is_stored_clean_and_reads_smoke_switch_first(name):
    nb = _read(name)
    first = _code_cells(nb)[0]
    assert 'os.environ.get("LORA_CAI_SMOKE")' in first and "SMOKE =" in first
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: stored with outputs"
    # Every code cell comes right after a markdown cell that explains it, and cells stay short.
    for before, cell in zip([None] + nb.cells[:-1], nb.cells):
        if cell.cell_type == "code":
            assert before is not None and before.cell_type == "markdown", f"{name}: unexplained cell {cell.source[:60]!r}"
        assert len(cell.source.splitlines()) <= 60, f"{name}: a cell of {len(cell.source.splitlines())} lines"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_uses_public_api_only(name):
    """`lora_cai.X` only for names in lora_cai.__all__; the one private import is tiny.build_tiny_model (smoke)."""
    nb = _read(name)
    for src in _code_cells(nb):
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_cai"):
                assert node.module == "lora_cai.tiny" and [a.name for a in node.names] == ["build_tiny_model"], \
                    f"{name}: private import from {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name == "lora_cai" or not alias.name.startswith("lora_cai"), \
                        f"{name}: imports {alias.name}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lora_cai":
                assert node.attr in lora_cai.__all__, f"{name}: lora_cai.{node.attr} is not public API"


@pytest.mark.parametrize("name", ["colab_quickstart.ipynb", "local_24gb.ipynb"])
def test_the_install_cell_names_its_source_or_says_in_one_sentence_to_set_it(name, tmp_path, monkeypatch):
    """lora_cai is not on PyPI yet: the install cell installs from LORA_CAI_SOURCE (a git URL or a wheel), and
    without one stops with a sentence saying what to set, instead of a pip error."""
    cell = next(src for src in _code_cells(_read(name)) if "LORA_CAI_SOURCE =" in src)
    with pytest.raises(SystemExit) as e:
        exec(cell, {"SMOKE": False})
    assert "Set LORA_CAI_SOURCE" in str(e.value) and str(e.value).count(".") == 1
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args))  # what pip would be asked
    wheel = tmp_path / "lora_cai-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    exec(cell.replace('LORA_CAI_SOURCE = ""', f'LORA_CAI_SOURCE = "{wheel}"'), {"SMOKE": False})
    exec(cell.replace('LORA_CAI_SOURCE = ""', 'LORA_CAI_SOURCE = "git+https://example.org/lora_cai.git"'),
         {"SMOKE": False})
    assert calls[0][-1] == f"lora-cai[unsloth] @ {wheel.resolve().as_uri()}"
    assert calls[1][-1] == "lora-cai[unsloth] @ git+https://example.org/lora_cai.git"


# ------------------------------------------------------------------------------------------------ execution
@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """JUPYTER_PATH with a kernel spec that runs this very interpreter (the venv's python)."""
    import ipykernel  # noqa: F401  (the dev extra; the kernel below runs it)
    import nbclient  # noqa: F401

    data = tmp_path_factory.mktemp("jupyter")
    spec = data / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lora_cai tests", "language": "python"}))
    return {"JUPYTER_PATH": os.pathsep.join([str(data), os.environ.get("JUPYTER_PATH", "")]).rstrip(os.pathsep),
            "JUPYTER_RUNTIME_DIR": str(data / "runtime"), "IPYTHONDIR": str(data / "ipython"),  # no writes to ~
            "LORA_CAI_SMOKE": "1", "HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1",
            "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "agg", "COLUMNS": "120",
            # The tiny model's matmuls are too small to share: on a busy 2-core machine two OpenMP threads make a
            # smoke notebook 3x slower (measured), one thread is never slower.
            "OMP_NUM_THREADS": "1"}


def _execute(name: str, cwd: Path, env: dict, monkeypatch) -> float:
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    for k, v in env.items():
        monkeypatch.setenv(k, v)  # the kernel inherits the test process's environment
    nb = _read(name)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT, startup_timeout=120,
                            resources={"metadata": {"path": str(cwd)}})
    start = time.time()
    try:
        client.execute()
    except CellExecutionError as e:  # the failing cell, its traceback and output
        pytest.fail(f"{name}: a cell failed:\n{e}")
    seconds = time.time() - start
    (cwd / "executed.ipynb").write_text(json.dumps(nb, indent=1), encoding="utf-8")  # to inspect on failure
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return seconds


def _kernel_python(env, monkeypatch, cwd) -> str:
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_notebook

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = new_notebook(cells=[new_code_cell("import sys, os; print(sys.executable); print(os.getcwd()); "
                                           "print(os.environ.get('LORA_CAI_SMOKE'))")])
    NotebookClient(nb, kernel_name=KERNEL, timeout=60, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb.cells[0].outputs[0].text


def test_kernel_is_this_python(kernel_env, monkeypatch, tmp_path):
    out = _kernel_python(kernel_env, monkeypatch, tmp_path).split("\n")
    assert Path(out[0]).resolve() == Path(sys.executable).resolve()
    assert Path(out[1]).resolve() == tmp_path.resolve()
    assert out[2] == "1"


def _check_run(name: str, cwd: Path) -> None:
    rel, stack = EXPECTED[name]
    run_dir = cwd / rel
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["stack"] == stack
    assert sorted(manifest["rounds"]) == [str(k) for k in range(1, len(stack) + 1)]
    for adapter in stack:
        assert (run_dir / adapter / "adapter_model.safetensors").is_file()
    for f in REPORT_FILES:
        assert (run_dir / f).is_file() and (run_dir / f).stat().st_size > 0, f"{name}: {f} missing"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_in_smoke_mode(name, kernel_env, monkeypatch, tmp_path):
    seconds = _execute(name, tmp_path, kernel_env, monkeypatch)
    print(f"{name}: {seconds:.0f} s")
    _check_run(name, tmp_path)
    # scratch files (the tiny model, constitution files) go under the notebook's own folder, not the top
    assert {p.name for p in tmp_path.iterdir()} == {"runs", "notebook-files", "executed.ipynb"}
    if name == "write_your_constitution.ipynb":
        manifest = json.loads((tmp_path / EXPECTED[name][0] / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["constitution"]["name"] == "careful_helper"


# ------------------------------------------------------------------------------------------------ lora_cai.run
def _dict_recipe(model: Path, **extra) -> dict:
    return {"name": "api", "model": {"name": str(model), "backend": "transformers"},
            "data": {"prompts": "builtin:smoke", "limit": 4, "eval_limit": 0}, "rounds": 1,
            "generation": {"max_new_tokens": 12, "critique_max_new_tokens": 8},
            "critique": {"steps": 1, "demonstrations": 1}, "lora": {"r": 4, "alpha": 8},
            "sft": {"batch_size": 4}, "dpo": {"batch_size": 4},
            "eval": {"critic_check": False, "capability_limit": 0, "early_stop_drop": None}, **extra}


def test_run_dict_mistakes_are_one_line_user_errors(tmp_path, monkeypatch):
    """Validation happens before any model loads: none of these needs a model on disk."""
    monkeypatch.chdir(tmp_path)
    recipe = _dict_recipe(tmp_path / "no-model")
    cases = [
        (dict(recipe, rounds=0), {}, r"^recipe dict: key 'rounds': .*greater than or equal to 1"),
        (recipe, {"overrides": ["sft.lr=3"]}, r"^recipe dict: override sft\.lr=3: unknown key 'sft\.lr'"),
        (recipe, {"overrides": ["rounds"]}, r"expected KEY=VALUE"),
        (dict(recipe, constitution="mine.yaml"), {}, r"^recipe dict: constitution mine\.yaml: file not found"),
    ]
    for rec, kw, pattern in cases:
        with pytest.raises(lora_cai.UserError) as e:
            lora_cai.run(rec, **kw)
        assert re.search(pattern, str(e.value)) and "\n" not in str(e.value), str(e.value)
    assert recipe["data"]["limit"] == 4  # the caller's dict is not modified by overrides


def test_run_dict_with_relative_paths_and_overrides(tiny_model, tmp_path, monkeypatch, request):
    """A dict recipe runs like a YAML one: relative constitution/prompt paths from the current directory,
    `overrides` and `output_dir` applied; the manifest comes back; chat answers from policy and base."""
    import shutil

    import torch

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: see kernel_env
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    shutil.copy(Path(lora_cai.__file__).parent / "constitutions" / "harmless.yaml", tmp_path / "mine.yaml")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                                    ["How do I bake bread?", "How do I pick a lock?",
                                                     "Tell me a joke.", "How do I make a bomb?"]))
    recipe = _dict_recipe(tiny_model, constitution="mine.yaml", data={"prompts": "prompts.jsonl", "eval_limit": 0})
    manifest = lora_cai.run(recipe, overrides=["lora.r=2"], output_dir="out")
    assert manifest["stack"] == ["round-1/adapter"]
    assert manifest["rounds"]["1"]["prompts"] == 4
    assert json.loads((tmp_path / "out" / "round-1" / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert manifest["constitution"]["name"] == lora_cai.load_constitution("mine.yaml").name
    policy = lora_cai.load_policy("out")
    assert isinstance(lora_cai.chat(policy, "Hello", max_new_tokens=4), str)
    assert isinstance(lora_cai.chat(policy, "Hello", base=True, max_new_tokens=4), str)
