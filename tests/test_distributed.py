"""Training a round data-parallel (torchrun, two CPU processes, gloo): the multi-GPU workflow, end to end.

recipe --stop-before train  ->  accelerate launch -m lora_cai.train  ->  recipe (skips the training it finds)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import run_cli, write_recipe


def _train(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="120")
    cmd = (launcher or [sys.executable, "-m"]) + ["lora_cai.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


# torchrun is what `accelerate launch --multi_gpu` runs under the hood; accelerate's own CPU launcher wants MPI
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lora_b_norms(path: Path) -> list[float]:
    from safetensors.torch import load_file

    return [float(v.norm()) for k, v in sorted(load_file(str(path)).items()) if "lora_B" in k]


def test_accelerate_launch_trains_a_round_the_recipe_then_stacks(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, tmp_path / "run",
                          sft="{batch_size: 2, grad_accum: 2, learning_rate: 0.005}",
                          dpo="{batch_size: 2, grad_accum: 2, learning_rate: 0.005}")
    run = tmp_path / "run"

    proc = _train(str(recipe))  # nothing generated yet: one line, exit 2
    assert proc.returncode == 2 and "--stop-before train" in proc.stderr and "Traceback" not in proc.stderr

    proc = run_cli(str(recipe), "--stop-before", "train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerate launch -m lora_cai.train" in proc.stderr
    r1 = run / "round-1"
    assert (r1 / "sft.jsonl").exists() and (r1 / "pairs.jsonl").exists()
    assert not (r1 / "adapter").exists() and not (r1 / "train.json").exists()

    proc = _train(str(recipe), launcher=TORCHRUN)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "training on 2 process(es)" in proc.stderr
    assert proc.stderr.count("round 1: adapter") == 1  # one process speaks
    adapter = r1 / "adapter" / "adapter_model.safetensors"
    assert min(_lora_b_norms(adapter)) > 0  # every LoRA B left its zero init: the adapter trained
    trained = json.loads((r1 / "train.json").read_text())
    assert trained["sft"]["steps"] >= 1 and trained["dpo"]["steps"] >= 1
    assert not (r1 / "checkpoints").exists()
    sha = _sha(adapter)

    proc = _train(str(recipe))  # the same round again: found done, nothing retrained
    assert proc.returncode == 0 and "already trained" in proc.stderr, proc.stderr[-2000:]

    proc = run_cli(str(recipe), "--stop-before", "train")  # evaluates round 1, makes round 2's data
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _sha(adapter) == sha  # the recipe found the training done: same inputs, same adapter
    m = json.loads((run / "manifest.json").read_text())
    assert m["stack"] == ["round-1/adapter"] and "eval" in m["rounds"]["1"]
    assert (run / "round-2" / "pairs.jsonl").exists() and not (run / "round-2" / "adapter").exists()

    proc = _train(str(recipe), launcher=TORCHRUN)  # round 2: round 1 concatenated into the new adapter, under DDP
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 2: training on 2 process(es), 1 frozen adapter(s)" in proc.stderr
    assert min(_lora_b_norms(run / "round-2" / "adapter" / "adapter_model.safetensors")) > 0
    proc = run_cli(str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run / "manifest.json").read_text())
    assert m["stack"] == ["round-1/adapter", "round-2/adapter"] and _sha(adapter) == sha

    proc = _train(str(recipe))  # all rounds done
    assert proc.returncode == 2 and "all 2 round(s)" in proc.stderr


def test_train_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    from lora_cai import recipe, train

    for argv, want in (([], "the following arguments are required: recipe"),
                       ([str(tmp_path / "nope.yaml")], "recipe file not found")):
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and want in err, err
    assert recipe.main([str(tmp_path / "nope.yaml"), "--stop-before", "eval"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--stop-before: invalid choice: 'eval'" in err, err
