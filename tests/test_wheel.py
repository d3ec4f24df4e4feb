"""The package as users install it: an sdist and a wheel that pass `twine check`, and a wheel that works on its own.

The wheel goes into a fresh virtual environment outside the checkout (its dependencies, torch and the rest,
come from this environment's site-packages through a path file: the checkout itself is not importable there),
and everything a user touches runs from another working directory: `--list`, a built-in recipe by name with
`--dry-run`, the rule-demo recipe on the tiny model end to end, and the report of that run.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sh(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: {proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    sh(sys.executable, "-m", "build", "--sdist", "--wheel", "--no-isolation", "--outdir", dist, ROOT, cwd=tmp)
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    sh(sys.executable, "-m", "twine", "check", "--strict", *wheels, *sdists)
    venv = tmp / "venv"
    sh(getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv)
    py = venv / "bin" / "python"
    sh(py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheels[0])
    deps = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
    venv_site = sh(py, "-c", "import site; print(site.getsitepackages()[0])").stdout.strip()
    Path(venv_site, "deps-of-the-test-environment.pth").write_text(deps + "\n")
    work = tmp / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return py, work, env, wheels[0]


def test_the_wheel_carries_recipes_rules_and_data(installed):
    import zipfile

    names = zipfile.ZipFile(installed[3]).namelist()
    for needed in ("lora_cai/recipes/smoke.yaml", "lora_cai/recipes/rules/refuse-harmful.yaml",
                   "lora_cai/recipes/rules/no-ful.yaml", "lora_cai/prompts/train.jsonl",
                   "lora_cai/constitutions/default.yaml"):
        assert needed in names, needed


def test_the_installed_package_runs_on_its_own(installed):
    py, work, env, _ = installed
    where = sh(py, "-c", "import lora_cai; print(lora_cai.__file__)", cwd=work, env=env).stdout.strip()
    assert str(ROOT) not in where and "site-packages" in where  # the wheel's copy, not the checkout
    listed = sh(py, "-m", "lora_cai.recipe", "--list", cwd=work, env=env).stdout
    assert "smoke" in listed and "rule-demo" in listed
    planned = sh(py, "-m", "lora_cai.recipe", "smoke", "--dry-run", cwd=work, env=env).stdout
    assert "memory plan" in planned
    sh(py, "-m", "lora_cai.tiny", "tiny-model", cwd=work, env=env)
    sh(py, "-m", "lora_cai.recipe", "rule-demo", "--set", "model.name=tiny-model", "--set", "rounds=1",
       "--set", "data.limit=12", "--set", "data.eval_limit=4", "--set", "pairs.n_samples=3",
       cwd=work, env={**env, "OMP_NUM_THREADS": "1"})
    run = work / "runs" / "rule-demo"
    assert (run / "round-1" / "adapter" / "adapter_model.safetensors").is_file()
    report = sh(py, "-m", "lora_cai.report", run, cwd=work, env=env).stdout.strip()
    assert Path(report).is_file() and (run / "report.html").is_file()
