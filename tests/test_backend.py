"""`model.backend: auto` picks Unsloth where it imports, transformers where it does not, and says which."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = "from lora_cai.engine.models import resolve_backend; print(resolve_backend('auto'))"


def run(env_extra: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=300)


def test_auto_picks_unsloth_where_it_imports():
    proc = run({})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "unsloth"  # Unsloth prints its CPU banner to stdout
    assert "backend: unsloth (auto: Unsloth imports)" in proc.stderr


def test_auto_falls_back_to_transformers_and_says_why(tmp_path):
    (tmp_path / "unsloth.py").write_text("raise NotImplementedError('You need a GPU')\n")  # like unsloth<=2026.10.7
    proc = run({"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "transformers"
    assert "backend: transformers (Unsloth unavailable: NotImplementedError)" in proc.stderr


def test_explicit_unsloth_that_cannot_import_is_a_one_line_error(tmp_path):
    (tmp_path / "unsloth.py").write_text("raise ImportError('no module')\n")
    code = ("import sys\nfrom lora_cai.errors import UserError\nfrom lora_cai.engine.models import resolve_backend\n"
            "try:\n    resolve_backend('unsloth')\nexcept UserError as e:\n    print(e); sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=120)
    assert proc.returncode == 2
    assert proc.stdout.count("\n") == 1 and "model.backend: unsloth is not usable here" in proc.stdout
