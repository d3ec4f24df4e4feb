"""Early stopping: a round whose quality score drops is kept on disk but not stacked, and the run ends."""

from __future__ import annotations

import json

from conftest import run_cli, write_recipe


def test_a_round_whose_score_drops_is_not_stacked(tiny_model, tmp_path):
    from lora_cai.cai.metrics import quality_score

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, run, rounds="1")
    proc = run_cli(str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Force the drop: round 1 is recorded as perfect (its inputs hash is untouched, so it is not re-evaluated).
    ev_path = run / "round-1" / "eval.json"
    ev = json.loads(ev_path.read_text())
    ev.update(harmful_compliance=0.0, over_refusal=0.0)
    ev_path.write_text(json.dumps(ev))

    proc = run_cli(str(recipe), "--set", "rounds=3", "--set", "eval.early_stop_drop=0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run / "manifest.json").read_text())
    round2 = quality_score(json.loads((run / "round-2" / "eval.json").read_text()))
    assert round2 < 0.95  # the precondition: round 2 really scored more than 5 % below round 1's 1.0
    assert m["stack"] == ["round-1/adapter"]
    assert m["stopped_round"] == 2 and m["best_round"] == 1
    assert m["rounds"]["1"]["quality"] == 1.0 and m["rounds"]["2"]["quality"] == round2
    assert set(m["rounds"]) == {"1", "2"} and not (run / "round-3").exists()  # the run ended there
    assert (run / "round-2" / "adapter" / "adapter_model.safetensors").stat().st_size > 0  # kept, not stacked
    assert "early stop" in proc.stderr

    # The same command again decides the same and changes nothing.
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_cli(str(recipe), "--set", "rounds=3", "--set", "eval.early_stop_drop=0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
