"""The layer rules of .importlinter hold (`lint-imports`, as .ci/run runs it), and they catch a cycle when one is made."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_the_package_keeps_its_layers_and_has_no_cycles():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def test_an_import_from_core_into_the_loop_breaks_both_contracts(tmp_path):
    shutil.copytree(ROOT / "lora_cai", tmp_path / "lora_cai", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    with open(tmp_path / "lora_cai" / "core" / "store.py", "a") as f:  # inside a function: still an import
        f.write("\n\ndef _cycle():\n    from lora_cai.loop import rounds  # noqa: F401\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0
    assert "lora_cai.core is not allowed to import lora_cai.loop" in proc.stdout
    assert "No cycles are allowed in lora_cai." in proc.stdout and "Contracts: 0 kept, 2 broken." in proc.stdout


def _modules():
    return sorted(p for p in (ROOT / "lora_cai").rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_every_module_states_its_responsibility_in_its_first_docstring_line():
    import ast

    missing = [str(p.relative_to(ROOT)) for p in _modules()
               if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip().splitlines()[:1]]
    assert not missing, missing
