"""lora_cai: parameter-efficient Constitutional AI on a single consumer GPU.

The public API (what the notebooks use); heavy libraries are imported inside the functions:

- `run(recipe, overrides=(), output_dir=None)`: run a recipe (a YAML path or a dict) and return its manifest;
- `load_policy(run_dir)`: a finished run's policy (4-bit base + every stacked adapter) and its tokenizer;
- `chat(run_dir_or_model_tokenizer, prompt, base=False)`: one greedy answer from a policy, or from its base;
- `build_report(run_dir)`: report.md, report.html and report/*.png for a run directory;
- `load_constitution(name_or_path)`: a built-in constitution or a YAML file, validated;
- `UserError`: every mistake a user can fix (bad recipe, constitution, path), with a one-line message.
"""

from __future__ import annotations

from lora_cai.errors import UserError
from lora_cai.version import __version__

# What errors call a recipe given as a dict. As a recipe's `source` it also resolves the dict's relative paths
# (prompts, constitution) against the current directory, as for a recipe file kept there.
_DICT_SOURCE = "recipe dict"


def run(recipe, *, overrides=(), output_dir=None) -> dict:
    """Run a recipe's CAI rounds and return the run's manifest (model, backend, adapter stack, per-round counts).

    `recipe` is a path to a YAML recipe or a dict with the same keys; `overrides` are `key.sub=value` strings
    (as `--set` on the command line); `output_dir` replaces the recipe's. Running the same recipe again
    resumes or skips finished work, like the CLI. A mistake raises `UserError` with a one-line message.
    """
    from rich.console import Console

    from lora_cai.config.schema import RecipeConfig
    from lora_cai.config.load import load_recipe, recipe_from_dict
    from lora_cai.loop.rounds import run as run_rounds

    if isinstance(recipe, (dict, RecipeConfig)):
        source = (recipe.source if isinstance(recipe, RecipeConfig) else None) or _DICT_SOURCE
        cfg = recipe_from_dict(recipe if isinstance(recipe, dict) else recipe.model_dump(), list(overrides),
                               output_dir, source=source, flag="override")
    else:
        cfg = load_recipe(recipe, list(overrides), None if output_dir is None else str(output_dir))
    return run_rounds(cfg, Console())


def load_policy(run_dir, **kwargs):
    """Load a finished run's policy: the 4-bit base model with every stacked adapter applied.

    Returns `(model, tokenizer)`. See `lora_cai.engine.models.load_policy` for the options (`upto=k`: round k's policy).
    """
    from lora_cai.engine.models import load_policy as _load_policy

    return _load_policy(run_dir, **kwargs)


def chat(run_dir_or_model_tokenizer, prompt, *, base: bool = False, max_new_tokens: int = 256,
         system: str | None = None) -> str:
    """One greedy answer to `prompt` (a string, or a list of chat messages) from a run's policy.

    The first argument is a run directory (the policy is loaded for this one call) or the `(model, tokenizer)`
    pair `load_policy` returned (reuse it for many prompts). `base=True` answers with every adapter switched
    off (PEFT's `model.disable_adapter()`): the base model the run started from, in the same memory.
    """
    import contextlib

    from lora_cai.engine.generation import generate, render_chat

    if isinstance(run_dir_or_model_tokenizer, tuple):
        model, tokenizer = run_dir_or_model_tokenizer
    else:
        model, tokenizer = load_policy(run_dir_or_model_tokenizer)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system:
        messages = [{"role": "system", "content": system}] + messages
    off = model.disable_adapter() if base and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with off:
        (text,) = generate(model, tokenizer, [render_chat(tokenizer, messages)], max_new_tokens=max_new_tokens,
                           temperature=0.0, on_too_long="truncate")
    return text or ""


def build_report(run_dir):
    """Write report.md, report.html and report/*.png (plots) into a run directory; return report.md's path."""
    from lora_cai.report.build import build_report as _build_report

    return _build_report(run_dir)


def load_constitution(name_or_path):
    """A built-in constitution (`default`, `harmless`) or a YAML file, validated; `UserError` names any mistake."""
    from lora_cai.cai.constitution import load_constitution as _load_constitution

    return _load_constitution(name_or_path)


__all__ = ["__version__", "UserError", "build_report", "chat", "load_constitution", "load_policy", "run"]
