"""Shared fixtures: a tiny random chat model built offline and loaded through from_pretrained."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny model's matmuls are too small for a thread pool: one OpenMP thread ran a tiny round 3x faster
# (13.5 s vs 42 s) on the 2-core CI machine. Tests of real models pass their own thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from lora_cai.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def tiny(tiny_model):
    """The tiny model loaded plainly (fp32, eval mode) with its tokenizer, shared by every test that needs one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny64(tiny_model):
    """The tiny model in float64, for tests that compare two computation orders of one function.

    In float32 such orders differ by a few machine epsilons (1.2e-7) times the reduction length, and which order a
    kernel sums in depends on the CPU's instruction set (oneDNN/MKL pick kernels by ISA: an Intel host with AMX
    differs from an AMD one). In float64 that noise is about 1e-15, while the bugs these tests guard against (a
    missing slice, a wrong scale, the wrong reference) are of order 1e-2: a bound of 1e-9 holds on any host and
    still sees them by seven orders of magnitude.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    return model, tokenizer


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m lora_cai.recipe ARGS` as a user would, capturing its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="120", **(env or {}))
    return subprocess.run([sys.executable, "-m", "lora_cai.recipe", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def write_recipe(path: Path, model: Path, out: Path, backend: str = "transformers", **extra: str) -> Path:
    """A two-round recipe small enough for CPU tests."""
    lines = [
        "name: test",
        "model:",
        f"  name: {model}",
        f"  backend: {backend}",
        "constitution: default",
        "data:",
        "  prompts: builtin:smoke",
        "  limit: 6",
        "  eval_limit: 2",
        "rounds: 2",
        "seed: 3",
        f"output_dir: {out}",
        "generation: {max_new_tokens: 16, critique_max_new_tokens: 12}",
        "critique: {steps: 2, demonstrations: 1}",
        "lora: {r: 8, alpha: 16}",
        "sft: {batch_size: 4, learning_rate: 0.005}",
        "dpo: {batch_size: 4, learning_rate: 0.005}",
    ]
    # A random model's quality score moves by chance: no early stop unless a test asks for it; a short probe.
    extra.setdefault("eval", "{early_stop_drop: null, capability_limit: 8}")
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
