"""kill -9 anywhere, rerun the same command: the same artifacts as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_recipe

# small batches so each stage has several commits and checkpoints to be killed between
SETTINGS = ["--set", "rounds=1", "--set", "data.eval_limit=0", "--set", "generation.max_batch_size=2",
            "--set", "sft.batch_size=1", "--set", "sft.save_steps=2", "--set", "dpo.batch_size=1",
            "--set", "dpo.save_steps=2", "--set", "pairs.builder=mix", "--set", "pairs.n_samples=3",
            "--set", "eval.critic_check=false"]


TWO = ["--set", "rounds=2"]


def cli(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lora_cai.recipe", str(recipe), *SETTINGS, *extra]


def run_to_end(recipe: Path, *extra: str) -> None:
    proc = subprocess.run(cli(recipe, *extra), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]


def kill_when(recipe: Path, ready, *extra: str, timeout: float = 900) -> None:
    """Start the run, SIGKILL it as soon as `ready()` is true."""
    proc = subprocess.Popen(cli(recipe, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before the kill point"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


def committed_batches(meta: Path) -> int:
    try:
        return len(json.loads(meta.read_text())["batches"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def artifacts(run: Path, round_dir: str = "round-1") -> dict[str, object]:
    from safetensors.torch import load_file

    out: dict[str, object] = {}
    rd = run / round_dir
    for name in ("responses.jsonl", "samples.jsonl", "judgments.jsonl", "critique-1.jsonl", "critique-2.jsonl", "trajectories.jsonl", "sft.jsonl",
                 "pairs.jsonl", "ref_logps.jsonl"):
        out[name] = (rd / name).read_text()
    out["adapter"] = {k: v.tolist() for k, v in load_file(str(rd / "adapter" / "adapter_model.safetensors")).items()}
    for log in ("sft_log.jsonl", "dpo_log.jsonl"):
        # timings differ; TRL's cumulative `num_tokens` and Trainer's closing `train_loss` (the mean over the
        # steps this process ran) are not part of a checkpoint. Every per-step loss must match.
        out[log] = [{k: v for k, v in json.loads(line).items()
                     if "runtime" not in k and "per_second" not in k and k not in ("num_tokens", "train_loss")}
                    for line in (rd / log).read_text().splitlines()]
    m = json.loads((run / "manifest.json").read_text())
    for r in m["rounds"].values():
        r.pop("seconds")
        r.pop("timing")  # per-stage seconds and rates, like `seconds`
        r.pop("peak_memory_gb")  # memory differs from process to process; what was computed must not
    for entry in m["stages"].values():
        entry.pop("timing")
    out["manifest"] = m
    return out


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(write_recipe(tmp / "r.yaml", tiny_model, tmp / "run"))
    return artifacts(tmp / "run")


KILL_POINTS = {
    "generation": lambda rd: committed_batches(rd / "responses.jsonl.meta.json") >= 1,
    "critique": lambda rd: committed_batches(rd / "critique-1.jsonl.meta.json") >= 1,
    "judging": lambda rd: committed_batches(rd / "judgments.jsonl.meta.json") >= 1,
    "sft": lambda rd: any((rd / "checkpoints" / "sft").glob("checkpoint-*/trainer_state.json")),
    "dpo": lambda rd: any((rd / "checkpoints" / "dpo").glob("checkpoint-*/trainer_state.json")),
}


@pytest.mark.parametrize("point", [
    "generation", "sft", "judging", pytest.param("critique", marks=pytest.mark.slow),
    pytest.param("dpo", marks=pytest.mark.slow)])
def test_killed_run_resumes_to_identical_artifacts(point, reference, tiny_model, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "run")
    rd = tmp_path / "run" / "round-1"
    kill_when(recipe, lambda: KILL_POINTS[point](rd))
    assert not (rd / "train.json").exists()  # really cut off before the round finished
    committed = json.loads((rd / "responses.jsonl.meta.json").read_text()) if point == "generation" else None
    judged = json.loads((rd / "judgments.jsonl.meta.json").read_text()) if point == "judging" else None
    run_to_end(recipe)
    got = artifacts(tmp_path / "run")
    for key in reference:
        assert got[key] == reference[key], key
    assert not (rd / "checkpoints").exists()
    if committed is not None:
        # only the batches that were not committed before the kill were generated again
        done = json.loads((rd / "responses.jsonl.meta.json").read_text())
        assert done["summary"]["generation"]["requested"] == 6 - committed["count"]
        assert committed["count"] >= 2
    if judged is not None:
        assert not judged.get("complete"), "killed after the judging stage had finished"
        # the resumed stage appended exactly the batches that were not committed before the kill
        done = json.loads((rd / "judgments.jsonl.meta.json").read_text())
        assert set(done["batches"]) >= set(judged["batches"]) and len(done["batches"]) > len(judged["batches"])


def test_restart_from_reruns_that_stage_and_later_and_keeps_the_old_files(reference, tiny_model, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "run")
    run_to_end(recipe)
    rd = tmp_path / "run" / "round-1"
    responses_before = (rd / "responses.jsonl").stat().st_mtime_ns
    proc = subprocess.run(cli(recipe) + ["--restart-from", "critique"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    superseded = list((tmp_path / "run").glob("superseded-*/round-1"))
    assert len(superseded) == 1
    assert {p.name for p in superseded[0].iterdir()} >= {"critique-1.jsonl", "pairs.jsonl", "train.json", "adapter"}
    assert not (superseded[0] / "responses.jsonl").exists()
    assert (rd / "responses.jsonl").stat().st_mtime_ns == responses_before  # earlier stage kept, not redone
    got = artifacts(tmp_path / "run")
    for key in reference:
        assert got[key] == reference[key], key


def test_a_full_disk_is_one_line_and_keeps_committed_work(tiny_model, tmp_path):
    """The run directory on a real 256 KB tmpfs: writes fail with ENOSPC inside the round."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        recipe = write_recipe(tmp_path / "r.yaml", tiny_model, mnt / "run")
        proc = subprocess.run(cli(recipe), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: disk full while writing ") and "committed work is kept" in last
        assert "Traceback" not in proc.stderr
        meta = json.loads((mnt / "run" / "round-1" / "responses.jsonl.meta.json").read_text())
        assert (mnt / "run" / "round-1" / "responses.jsonl").stat().st_size == meta["committed_bytes"]
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.fixture(scope="module")
def reference_two(tiny_model, tmp_path_factory) -> Path:
    """An uninterrupted two-round run: round 2 trains on round 1 concatenated into its adapter (lora_cai.engine.concat)."""
    tmp = tmp_path_factory.mktemp("uninterrupted-two")
    run_to_end(write_recipe(tmp / "r.yaml", tiny_model, tmp / "run"), *TWO)
    return tmp / "run"


@pytest.mark.parametrize("point", ["sft", pytest.param("dpo", marks=pytest.mark.slow)])
def test_killed_in_round_two_training_resumes_to_identical_artifacts(point, reference_two, tiny_model, tmp_path):
    """kill -9 inside round 2's SFT or DPO (checkpoints hold the whole concatenated adapter and its optimizer)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "run")
    rd = tmp_path / "run" / "round-2"
    kill_when(recipe, lambda: KILL_POINTS[point](rd), *TWO)
    assert not (rd / "train.json").exists()
    run_to_end(recipe, *TWO)
    want, got = artifacts(reference_two, "round-2"), artifacts(tmp_path / "run", "round-2")
    for key in want:
        assert got[key] == want[key], key
    assert not (rd / "checkpoints").exists()


@pytest.mark.slow
def test_killed_between_rounds_resumes_to_identical_artifacts(reference_two, tiny_model, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "run")
    manifest = tmp_path / "run" / "manifest.json"
    proc = subprocess.Popen(cli(recipe, *TWO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (manifest.exists() and '"1"' in manifest.read_text()):
        assert proc.poll() is None
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "round-2" / "train.json").exists()
    proc = subprocess.run(cli(recipe, *TWO), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f in sorted(reference_two.rglob("*.jsonl")):
        rel = f.relative_to(reference_two)
        if "log" not in f.name:
            assert (tmp_path / "run" / rel).read_bytes() == f.read_bytes(), rel


def test_a_damaged_adapter_is_a_one_line_error(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "run")
    run_to_end(recipe)
    adapter = tmp_path / "run" / "round-1" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(b"not a safetensors file")
    assert adapter.stat().st_size == 22
    snapshot = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    proc = subprocess.run(cli(recipe) + ["--set", "rounds=2"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "round-1/adapter" in last and "unreadable adapter" in last
    assert "Traceback" not in proc.stderr
    assert all(p.read_bytes() == b for p, b in snapshot.items())  # nothing changed by the failed run
