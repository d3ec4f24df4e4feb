"""Real reruns on the tiny model: a changed setting redoes the stages that read it and those after them, and
keeps the rest; --dry-run says so beforehand; a run directory of an older hash scheme is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_cai.core.inputs import HASH_SCHEME

ROOT = Path(__file__).resolve().parents[1]
ALL = {"critic_check", "baseline_eval", "round-1/responses", "round-1/samples", "round-1/critique", "round-1/judge",
       "round-1/train", "round-1/eval"}
AFTER_RESPONSES = {"round-1/responses", "round-1/samples", "round-1/critique", "round-1/judge", "round-1/train",
                   "round-1/eval"}
# (--set arguments, the stages that must rerun): every other stage must be skipped.
TABLE = [
    (["model.load_in_4bit=false"], ALL),
    (["model.dtype=float32"], ALL),
    (["seed=4"], ALL - {"baseline_eval"}),  # the baseline's answers are greedy: no seed in them without rules
    (["generation.temperature=0.5"], AFTER_RESPONSES),
    (["judge.kind=rule", f"judge.rules={ROOT / 'recipes' / 'rules' / 'no-ful.yaml'}"],
     {"baseline_eval", "round-1/judge", "round-1/train", "round-1/eval"}),
    (["dpo.beta=0.3"], {"round-1/train", "round-1/eval"}),
]


def recipe(tmp: Path, tiny_model: Path) -> Path:
    from conftest import write_recipe

    return write_recipe(tmp / "r.yaml", tiny_model, tmp / "run", rounds="1", pairs="{builder: mix, n_samples: 2}",
                        critique="{steps: 1, demonstrations: 1}", eval="{early_stop_drop: null, capability_limit: 4}")


def ledger(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"]


def main(*argv) -> int:
    from lora_cai.recipe import main as recipe_main

    return recipe_main([str(a) for a in argv])


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reruns")
    path = recipe(tmp, tiny_model)
    assert main(path) == 0
    return path, tmp / "run"


def test_changed_settings_rerun_exactly_the_stages_that_read_them(finished, capsys):
    path, run = finished
    applied: list[str] = []
    for sets, expected in TABLE:
        applied += sets
        args = [a for s in applied for a in ("--set", s)]
        before = ledger(run)
        assert main(path, "--dry-run", *args) == 0
        planned = {line.split(":")[0].strip() for line in capsys.readouterr().out.splitlines()
                   if line.startswith("  ")}
        assert planned == expected, (sets, sorted(planned ^ expected))
        assert main(path, *args) == 0
        err = capsys.readouterr().err
        after = ledger(run)
        reran = {k for k in after if after[k]["inputs"] != before[k]["inputs"]}
        assert reran == expected, (sets, sorted(reran ^ expected))
        for key in set(after) - expected:  # skipped: not even their timing was rewritten
            assert after[key] == before[key], key
        assert "inputs changed since the last run; redoing:" in err
        assert f"{sorted(expected)[0]}:" in err  # the run says which stages it redoes


def test_artifacts_follow_the_ledger(finished):
    _, run = finished
    stages = ledger(run)
    rd = run / "round-1"
    assert json.loads((rd / "responses.jsonl.meta.json").read_text())["inputs"] == stages["round-1/responses"]["inputs"]
    assert json.loads((rd / "train.json").read_text())["inputs"] == stages["round-1/train"]["inputs"]
    assert json.loads((rd / "eval.json").read_text())["inputs"] == stages["round-1/eval"]["inputs"]
    assert json.loads((run / "baseline-eval.json").read_text())["inputs"] == stages["baseline_eval"]["inputs"]
    for entry in stages.values():
        assert set(entry) == {"inputs", "by_input", "timing"}


def test_a_run_directory_of_an_older_scheme_is_refused_until_restarted(tiny_model, tmp_path, capsys):
    path = recipe(tmp_path, tiny_model)
    assert main(path) == 0
    manifest = tmp_path / "run" / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["hash_scheme"], m["stages"]  # as lora_cai wrote it before stages declared their inputs
    manifest.write_text(json.dumps(m))
    snapshot = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    capsys.readouterr()
    for extra in ([], ["--dry-run"]):
        assert main(path, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ") and "--restart-from responses --round 1" in err, err
    assert {p: p.read_bytes() for p in snapshot} == snapshot  # nothing touched
    assert main(path, "--restart-from", "responses", "--round", "1") == 0
    m = json.loads(manifest.read_text())
    assert m["hash_scheme"] == HASH_SCHEME and set(m["stages"]) == ALL
    assert list((tmp_path / "run").glob("superseded-*/round-1/responses.jsonl"))


def test_a_scheme_2_run_directory_continues_redoing_judge_train_and_eval(tiny_model, tmp_path, capsys):
    """A scheme-2 directory continues: the stages whose hashes moved rerun, listed after one line saying why; the
    others are kept. (Here the moved hashes are stood in for by marking the judge, train and eval stages' files
    with another hash; which stages move for the shipped recipes is in loop/rundir.py beside SCHEME_3.)"""
    path = recipe(tmp_path, tiny_model)
    assert main(path) == 0
    run = tmp_path / "run"
    m = json.loads((run / "manifest.json").read_text())
    from lora_cai.core.manifest import FIELDS, StageEntry  # the typed manifest covers what a run writes

    assert set(m) <= FIELDS and all(set(e) == set(StageEntry.__annotations__) for e in m["stages"].values())
    m["hash_scheme"] = 2
    for key in ("round-1/judge", "round-1/train", "round-1/eval"):
        m["stages"][key]["inputs"] = "scheme-2"
    (run / "manifest.json").write_text(json.dumps(m))
    for name in ("judgments.jsonl.meta.json", "train.json", "eval.json"):
        f = run / "round-1" / name
        f.write_text(json.dumps({**json.loads(f.read_text()), "inputs": "scheme-2"}))
    kept = {p: p.read_bytes() for p in (run / "round-1").glob("*.jsonl") if not p.name.startswith(("sft", "pairs"))}
    capsys.readouterr()
    assert main(path, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "made with hash scheme 2" in out, out
    for key in ("round-1/judge", "round-1/train", "round-1/eval"):  # the stages whose hash moved: listed to rerun
        assert key in out, out
    assert main(path) == 0
    err = capsys.readouterr().err
    notice = [line for line in err.splitlines() if "made with hash scheme 2" in line]
    assert notice, err
    m = json.loads((run / "manifest.json").read_text())
    assert m["hash_scheme"] == HASH_SCHEME and all(m["stages"][k]["inputs"] != "scheme-2" for k in m["stages"])
    assert all(kept[p] == p.read_bytes() for p in kept if p.name in ("responses.jsonl", "samples.jsonl",
                                                                       "critique-1.jsonl", "trajectories.jsonl"))


def test_files_without_a_manifest_are_refused_too(tiny_model, tmp_path, capsys):
    path = recipe(tmp_path, tiny_model)
    (tmp_path / "run" / "round-1").mkdir(parents=True)
    (tmp_path / "run" / "round-1" / "responses.jsonl").write_text('{"id": "x"}\n')
    assert main(path) == 2
    assert "--restart-from responses --round 1" in capsys.readouterr().err
