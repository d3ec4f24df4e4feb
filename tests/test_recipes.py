"""Every recipe in recipes/ validates against the schema and opens with its launch command; the memory figures in
a recipe's header are what the planner computes for it today. No download, no model load, no heavy import.

Header lines checked (the figures are GiB, as `--dry-run` prints them, to one decimal):

    # Launch: python -m lora_cai.recipe <name>                    (optionally after a setup command and `&&`)
    # Purpose: <one line>
    # Hardware: <one line>
    # Planner estimate: peak 15.0 GB (stage sft) on vram_gb 24
    # Planner stages: generation 13.8 GB (batch 16x1), sft 15.0 GB (batch 16x1), dpo 15.0 GB (batch 8x1)
    # Teacher estimate: generation 12.1 GB (batch 16x1), ...      (recipes with a local teacher)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_cai.config.builtin import recipe_header
from lora_cai.config.load import load_recipe
from lora_cai.errors import UserError
from lora_cai.engine.planner import KNOWN, load_model_config, plan_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "lora_cai" / "recipes").glob("*.yaml"))
PEAK = re.compile(r"^# Planner estimate: peak (\d+\.\d) GB \(stage (\w+)\) on vram_gb (\d+(?:\.\d+)?)$", re.M)
STAGES = re.compile(r"^# Planner stages: (.*)$", re.M)
TEACHER = re.compile(r"^# Teacher estimate: (.*)$", re.M)
STAGE = re.compile(r"(\w+) (\d+\.\d) GB \(batch (\d+)x(\d+)\)")


def known_config(name: str) -> dict | None:
    """The planner's KNOWN architecture for a Hub name, also under a mirror's name
    (unsloth/Meta-Llama-3.1-8B-Instruct is llama-3.1-8b); None for any other model."""
    key = name.lower().rsplit("/", 1)[-1].removesuffix("-instruct")
    match = [k for k in KNOWN if key == k or key.endswith("-" + k)]
    return dict(KNOWN[match[0]]) if match else None


def planner_config(name: str) -> dict:
    """What the header's figures were computed from: a KNOWN architecture, else what --dry-run resolves."""
    return known_config(name) or load_model_config(name)


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"smoke.yaml", "llama-3.1-8b-24gb.yaml", "qwen2.5-7b-24gb.yaml", "qwen2.5-1.5b-t4.yaml",
            "teacher-distill.yaml", "teacher-api.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_opens_with_its_launch_command(path):
    from lora_cai.cai.constitution import load_constitution

    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    assert re.fullmatch(rf"# Launch: (?:\S.* && )?python -m lora_cai\.recipe {re.escape(path.stem)}", first), first
    header = recipe_header(path)
    assert header.get("Purpose") and header.get("Hardware"), f"{path.name}: needs '# Purpose:' and '# Hardware:'"
    cfg = load_recipe(path)
    name = cfg.constitution
    load_constitution(cfg.resolve(name) if name.endswith((".yaml", ".yml")) or "/" in name else name)
    if cfg.judge.rules:
        assert Path(cfg.rules_file()).is_file(), f"{path.name}: judge.rules file missing"


def test_recipes_write_to_their_own_run_directories():
    dirs = [load_recipe(p).output_dir for p in RECIPES]
    assert len(set(dirs)) == len(dirs)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_header_memory_figures_match_the_planner(path):
    text = path.read_text(encoding="utf-8")
    cfg = load_recipe(path)
    peak = PEAK.search(text)
    if peak is None:
        assert known_config(cfg.model.name) is None, \
            f"{path.name}: header needs '# Planner estimate: peak X GB (stage S) on vram_gb V'"
        pytest.skip(f"{cfg.model.name}: no planner estimate in the header (not a model the planner knows)")
    model_config = planner_config(cfg.model.name)
    estimates = plan_recipe(cfg, cfg.vram_gb, model_config=model_config, device="cuda")
    top = max(estimates, key=lambda e: e.total_gb)
    gb, stage, vram = float(peak.group(1)), peak.group(2), float(peak.group(3))
    assert vram == cfg.vram_gb
    assert abs(gb - top.total_gb) <= 0.1, f"{path.name}: header says {gb} GB, the planner {top.total_gb:.2f} GB"
    assert abs(next(e.total_gb for e in estimates if e.stage == stage) - top.total_gb) <= 0.1
    assert top.total_gb <= cfg.vram_gb
    stages = STAGES.search(text)
    assert stages, f"{path.name}: header needs '# Planner stages: ...'"
    found = {m.group(1): m for m in STAGE.finditer(stages.group(1))}
    assert set(found) == {e.stage for e in estimates}
    for e in estimates:
        m = found[e.stage]
        assert abs(float(m.group(2)) - e.total_gb) <= 0.1, f"{path.name}: {e.stage} {m.group(2)} vs {e.total_gb:.2f}"
        assert (int(m.group(3)), int(m.group(4))) == (e.batch_size, e.grad_accum)
        # the planner's batch is the recipe's own, so the estimate is for what will run
        if e.stage != "generation":
            settings = cfg.sft if e.stage == "sft" else cfg.dpo
            assert (settings.batch_size, settings.grad_accum) == (e.batch_size, e.grad_accum)
    teacher = TEACHER.search(text)
    if cfg.judge.kind == "teacher":
        assert teacher, f"{path.name}: a local teacher needs '# Teacher estimate: generation X GB (batch BxA)'"
        teacher_cfg = planner_config(cfg.judge.model)
        gen = plan_recipe(cfg, cfg.vram_gb, model_config=teacher_cfg, device="cuda")[0]
        m = STAGE.search(teacher.group(1))
        assert m and m.group(1) == "generation"
        assert abs(float(m.group(2)) - gen.total_gb) <= 0.1
        assert (int(m.group(3)), int(m.group(4))) == (gen.batch_size, gen.grad_accum)
        assert top.total_gb + gen.total_gb <= cfg.vram_gb  # the header says both fit together


@pytest.mark.parametrize("path", [p for p in RECIPES if PEAK.search(p.read_text(encoding="utf-8"))],
                         ids=lambda p: p.name)
def test_dry_run_prints_the_header_figures(path, capsys):
    """Where the planner resolves the model name itself, `--dry-run` prints the figures the header copied."""
    from lora_cai.recipe import main

    cfg = load_recipe(path)
    try:
        load_model_config(cfg.model.name)
    except UserError:
        pytest.skip(f"--dry-run cannot resolve {cfg.model.name} without a download")
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for m in STAGE.finditer(STAGES.search(path.read_text(encoding="utf-8")).group(1)):
        row = re.search(rf"^{m.group(1)}\s+{m.group(3)}\s+{m.group(4)}\s.*\s(\d+\.\d\d)$", out, re.M)
        assert row and abs(float(row.group(1)) - float(m.group(2))) <= 0.1, out


def test_built_in_recipes_by_name_list_and_copy(tmp_path, capsys, monkeypatch):
    from lora_cai.config.builtin import builtin_recipes
    from lora_cai.recipe import main

    monkeypatch.chdir(tmp_path)  # nothing of the checkout's recipes/ folder is in reach
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name, path in builtin_recipes().items():
        assert name in out and recipe_header(path)["Purpose"] in out
    assert main(["smoke", "--dry-run"]) == 0  # a name: the built-in recipe, planned without loading a model
    assert "recipe " in capsys.readouterr().out
    assert main(["rule-demo", "--copy", "mine.yaml"]) == 0
    capsys.readouterr()
    copy = load_recipe("mine.yaml")
    assert Path(copy.rules_file()).is_file() and copy.judge.rules == "builtin:no-ful"
    before = (tmp_path / "mine.yaml").read_bytes()
    assert main(["smoke", "--copy", "mine.yaml"]) == 2  # never overwrites
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and (tmp_path / "mine.yaml").read_bytes() == before
    assert main(["smok"]) == 2
    assert "did you mean smoke?" in capsys.readouterr().err


def test_a_copied_recipe_keeps_its_relative_files(tmp_path, capsys):
    from lora_cai.recipe import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "rules.yaml").write_text("- {pattern: ful, kind: forbid}\n")
    (src / "r.yaml").write_text("model: {name: m}\ndata: {prompts: builtin:smoke}\njudge: {kind: rule, rules: rules.yaml}\n")
    assert main([str(src / "r.yaml"), "--copy", str(tmp_path / "elsewhere" / "copy.yaml")]) == 0
    cfg = load_recipe(tmp_path / "elsewhere" / "copy.yaml")
    assert Path(cfg.rules_file()) == (src / "rules.yaml").resolve()
