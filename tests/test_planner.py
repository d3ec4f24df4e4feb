"""The memory planner: published parameter counts, monotonic estimates, plans that fit, and a CPU calibration."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lora_cai.errors import UserError
from lora_cai.engine.planner import KNOWN, estimate_generation, estimate_training, format_plan, model_shape, plan

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("name,published", [("llama-3.1-8b", 8.03e9), ("qwen2.5-7b", 7.62e9),
                                            ("qwen2.5-1.5b", 1.54e9)])
def test_known_shapes_give_published_parameter_counts(name, published):
    assert abs(model_shape(KNOWN[name]).params - published) / published < 0.02


def test_estimates_grow_with_batch_sequence_and_rank():
    s = model_shape(KNOWN["qwen2.5-1.5b"])
    gen = [estimate_generation(s, batch=b, seq_len=n).total_gb for b, n in [(1, 512), (2, 512), (2, 1024)]]
    assert gen == sorted(gen) and len(set(gen)) == 3
    for dpo in (False, True):
        tr = [estimate_training(s, batch=b, seq_len=n, lora_r=r, target_modules=ALL, dpo=dpo).total_gb
              for b, n, r in [(1, 512, 8), (2, 512, 8), (2, 1024, 8), (2, 1024, 64)]]
        assert tr == sorted(tr) and len(set(tr)) == 4
    sft = estimate_training(s, batch=2, seq_len=1024, lora_r=16, target_modules=ALL)
    dpo = estimate_training(s, batch=2, seq_len=1024, lora_r=16, target_modules=ALL, dpo=True)
    assert dpo.activations_gb > 1.9 * sft.activations_gb - 0.01  # chosen + rejected: twice the sequences


def test_plan_picks_smaller_batches_for_smaller_budgets_and_keeps_the_effective_batch():
    s = model_shape(KNOWN["llama-3.1-8b"])
    big = plan(s, vram_gb=80, seq_len=2048, lora_r=16, target_modules=ALL, want_batch=16)
    small = plan(s, vram_gb=16, seq_len=2048, lora_r=16, target_modules=ALL, want_batch=16)
    assert [e.stage for e in small] == ["generation", "sft", "dpo"]
    for b, e in zip(big, small):
        assert e.batch_size <= b.batch_size and e.total_gb <= 16
        assert e.batch_size & (e.batch_size - 1) == 0
        if e.stage != "generation":
            assert e.batch_size * e.grad_accum == 16
    assert sum(e.batch_size for e in small) < sum(b.batch_size for b in big)
    table = format_plan(small)
    assert "dpo" in table and "total" in table


def test_training_settings_fitted_to_the_budget_keep_the_effective_batch():
    from lora_cai.config.schema import RecipeConfig
    from lora_cai.engine.planner import fit_batch

    cfg = RecipeConfig.model_validate({"model": {"name": "Qwen/Qwen2.5-7B-Instruct"}, "data": {"prompts": "builtin:smoke"},
                                       "vram_gb": 16, "sft": {"batch_size": 32, "grad_accum": 2, "max_length": 2048}})
    shape = KNOWN["qwen2.5-7b"]
    batch, accumulation = fit_batch(cfg, cfg.sft, "sft", shape, earlier_rounds=0)
    assert batch < 32 and batch * accumulation == 64
    roomy = cfg.model_copy(update={"vram_gb": 1000.0})
    assert fit_batch(roomy, roomy.sft, "sft", shape, earlier_rounds=0) is None  # fits: untouched


def test_a_rounds_batch_split_depends_on_its_own_stack_not_on_how_many_rounds_the_recipe_has():
    """`--set rounds=3` on a resumed run must not change round 1's split: the planner plans the round at hand."""
    from lora_cai.config.schema import RecipeConfig
    from lora_cai.engine.planner import fit_batch

    base = {"model": {"name": "Qwen/Qwen2.5-7B-Instruct"}, "data": {"prompts": "builtin:smoke"}, "vram_gb": 24,
            "lora": {"r": 64}, "sft": {"batch_size": 8, "max_length": 2048}}
    shape = KNOWN["qwen2.5-7b"]
    splits = {}
    for rounds in (1, 3, 8):
        cfg = RecipeConfig.model_validate({**base, "rounds": rounds})
        splits[rounds] = [(fit_batch(cfg, cfg.sft, "sft", shape, earlier_rounds=k) or (8, 1))[0] for k in (0, 2, 4, 6)]
    assert splits[1] == splits[3] == splits[8] == [8, 8, 4, 1]  # more earlier adapters in memory: a smaller batch


def test_the_gpu_planners_reads_are_the_train_stages_declared_inputs(tiny_model, monkeypatch):
    """With CUDA faked, `fit_to_gpu` reads the recipe through the train stage's recording view: every key it reads
    is one the stage declares, `rounds` is not among them, and the planner did run (the batch was cut)."""
    import torch

    from lora_cai.core import inputs
    from lora_cai.stages import train as train_stage_module
    from lora_cai.config.load import recipe_from_dict

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for loss in ("sigmoid", "kto", "orpo"):
        cfg = recipe_from_dict({"model": {"name": str(tiny_model)}, "data": {"prompts": "builtin:smoke"}, "rounds": 3,
                                "vram_gb": 0.9, "sft": {"batch_size": 64, "max_length": 2048},
                                "dpo": {"loss": loss, "batch_size": 64, "max_length": 2048}})
        view = inputs.view(cfg, "train")
        with inputs.recording() as reads:
            sft = train_stage_module.fit_to_gpu(view, view.sft, "sft", earlier_rounds=2, objective=loss)
            dpo = train_stage_module.fit_to_gpu(view, view.dpo, "dpo", earlier_rounds=2, objective=loss)
        assert sft.batch_size < 64 and dpo.batch_size < 64, (loss, sft.batch_size, dpo.batch_size)
        assert sft.batch_size * sft.grad_accum == 64 and sft.learning_rate == cfg.sft.learning_rate
        assert "rounds" not in reads["train"] and {"vram_gb", "lora.r", "sft.max_length"} <= reads["train"]
        undeclared = reads["train"] - inputs.declared_keys(train_stage_module.TRAIN_STAGE, cfg)
        assert not undeclared, (loss, sorted(undeclared))



def test_plan_raises_one_line_user_error_when_nothing_fits():
    s = model_shape(KNOWN["llama-3.1-8b"])
    with pytest.raises(UserError) as e:
        plan(s, vram_gb=4, seq_len=2048, lora_r=16, target_modules=ALL, want_batch=4)
    msg = str(e.value)
    assert "\n" not in msg and "batch 1" in msg and "shorter" in msg


# ---------------------------------------------------------------------------------------------------------
# CPU calibration. A fresh subprocess imports everything first (baseline), loads the model in 4-bit, then
# measures the stage's peak *anonymous* resident memory (heap: tensors) minus the baseline, sampled every
# millisecond. File-backed pages are left out: the mmapped safetensors checkpoint stays in the page cache
# after loading (~300 MB here) and has no GPU counterpart. glibc is told to return freed blocks at once
# (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_) so RSS follows live tensors rather than allocator history.
# The model is the tiny Llama scaled up (hidden 1024, 8 layers, 75M params) so tensors dominate noise.
# ---------------------------------------------------------------------------------------------------------
WORKER = r'''
import json, os, re, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
def rss_kb(key="VmRSS"):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
import threading
class Sampler:
    def __init__(self):
        self.peak = 0; self.stop = False
        self.t = threading.Thread(target=self.run, daemon=True)
    def run(self):
        while not self.stop:
            self.peak = max(self.peak, rss_kb("RssAnon")); time.sleep(0.001)
mode, path, batch, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import gc, torch, transformers, peft, trl, datasets, bitsandbytes  # noqa
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa
from trl import SFTTrainer, SFTConfig  # noqa
from lora_cai.engine import models
from lora_cai.trainers.common import _common_args
from lora_cai.trainers.sft import train_sft
from lora_cai.config.schema import ModelConfig, LoraSettings, SFTSettings
torch.set_num_threads(2)
gc.collect(); base = rss_kb(); base_af=[rss_kb("RssAnon")/1024, rss_kb("RssFile")/1024]
cfg = ModelConfig(name=path, backend="transformers", load_in_4bit=True, max_seq_length=seq)
out = {"baseline_mb": base / 1024, "base_af": base_af}
t = time.time()
if mode == "generate":
    model, tok = models.load_base(cfg, "transformers"); model.eval()
    gc.collect(); out["loaded_mb"] = (rss_kb() - base) / 1024
    prompt = seq - 4
    ids = torch.randint(5, 300, (batch, prompt))
    reset_peak(); anon0 = rss_kb("RssAnon"); samp = Sampler(); samp.peak = anon0; samp.t.start()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=seq - prompt,
                       min_new_tokens=seq - prompt, do_sample=False, pad_token_id=tok.pad_token_id)
else:
    model, tok, frozen = models.build_policy(cfg, LoraSettings(r=16, alpha=16), [], "transformers", 0)
    gc.collect(); out["loaded_mb"] = (rss_kb() - base) / 1024
    text = " ".join(["The capital of France is Paris. Water boils at 100 degrees Celsius."] * (seq // 4))
    recs = [{"prompt": f"Question {i}?", "completion": text} for i in range(batch)]
    reset_peak(); anon0 = rss_kb("RssAnon"); samp = Sampler(); samp.peak = anon0; samp.t.start()
    train_sft(model, tok, recs, SFTSettings(batch_size=batch, max_length=seq, epochs=1),
                       sys.argv[5], seed=0, frozen=frozen)
samp.stop = True; samp.t.join(); samp.peak = max(samp.peak, rss_kb("RssAnon"))
out["peak_anon_mb"] = (samp.peak - base_af[0]*1024) / 1024
out["peak_mb"] = (rss_kb("VmHWM") - base) / 1024
out["seconds"] = time.time() - t
print("RESULT " + json.dumps(out))
'''


def _measure(mode: str, path, batch: int, seq: int, tmp_path) -> dict:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, str(script), mode, str(path), str(batch), str(seq), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=600)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    return json.loads(line[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def calib_model(tmp_path_factory):
    from lora_cai.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("calib") / "model", hidden_size=1024, layers=8)


def _check(name, estimate_gb, measured, tolerance=0.25):
    est_mb = estimate_gb * 1024
    got = measured["peak_anon_mb"]
    print(f"\n{name}: planner estimate {est_mb:.0f} MB, measured peak {got:.0f} MB "
          f"(ratio {est_mb / got:.2f}; total-RSS peak incl. mmapped checkpoint {measured['peak_mb']:.0f} MB)")
    assert abs(est_mb - got) / got <= tolerance


def test_generation_estimate_matches_cpu_peak(calib_model, tmp_path):
    shape = model_shape(json.loads((calib_model / "config.json").read_text()))
    est = estimate_generation(shape, batch=8, seq_len=256, dtype_bytes=4, device="cpu")  # fp32 compute on CPU
    _check("generation 8 x 256", est.total_gb, _measure("generate", calib_model, 8, 256, tmp_path))


def test_sft_estimate_matches_cpu_peak(calib_model, tmp_path):
    shape = model_shape(json.loads((calib_model / "config.json").read_text()))
    # On CPU lora_cai trains in fp32 without gradient checkpointing (_common_args).
    est = estimate_training(shape, batch=4, seq_len=128, lora_r=16, target_modules=ALL, dtype_bytes=4,
                            gradient_checkpointing=False, device="cpu")
    _check("SFT step 4 x 128, r=16", est.total_gb, _measure("sft", calib_model, 4, 128, tmp_path))


def test_dry_run_prints_the_plan_without_loading_a_model(tmp_path, capsys):
    from lora_cai.recipe import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: Qwen/Qwen2.5-7B-Instruct}\ndata: {prompts: builtin:smoke}\nvram_gb: 16\n")
    assert main([str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for a 16 GB GPU" in out
    assert [line.split()[0] for line in out.splitlines() if line.split()[:1] in (["generation"], ["sft"], ["dpo"])] \
        == ["generation", "sft", "dpo"]


def test_each_objective_has_its_own_peak_and_kto_keeps_a_batch_of_two():
    """KTO trains on single answers (half DPO's sequences); SimPO's CPOTrainer holds the full logits, which DPO's
    fused head never builds; KTO's batch is never cut below 2 (its KL estimate pairs answers within a batch)."""
    s = model_shape(KNOWN["llama-3.1-8b"])
    kw = dict(batch=2, seq_len=1024, lora_r=16, target_modules=ALL, dpo=True)
    dpo, kto, simpo, orpo = (estimate_training(s, objective=o, **kw) for o in ("sigmoid", "kto", "simpo", "orpo"))
    assert kto.activations_gb < 0.6 * dpo.activations_gb and orpo.total_gb == simpo.total_gb
    # full logits: 2 x 2 x 1024 tokens x 128256 x (2 + 8) bytes, about 4.9 GiB more than the fused head's tiles
    assert simpo.activations_gb - dpo.activations_gb > 4.5
    kto2 = estimate_training(s, batch=2, seq_len=1024, lora_r=16, target_modules=ALL, dpo=True, objective="kto",
                             grad_accum=4)
    kto1 = estimate_training(s, batch=1, seq_len=1024, lora_r=16, target_modules=ALL, dpo=True, objective="kto",
                             grad_accum=8)
    assert kto1.total_gb < kto2.total_gb - 0.1
    with pytest.raises(UserError, match="even at batch 2"):  # batch 1 would fit, and is never chosen
        plan(s, vram_gb=(kto1.total_gb + kto2.total_gb) / 2, seq_len=1024, lora_r=16, target_modules=ALL,
             want_batch=8, stages=("dpo",), objective="kto")
    fits = plan(s, vram_gb=kto2.total_gb + 0.01, seq_len=1024, lora_r=16, target_modules=ALL, want_batch=8,
                stages=("dpo",), objective="kto")
    assert (fits[0].batch_size, fits[0].grad_accum) == (2, 4)


def test_earlier_rounds_cost_their_weights_and_when_concatenated_their_optimizer_state():
    s = model_shape(KNOWN["llama-3.1-8b"])
    kw = dict(batch=2, seq_len=1024, lora_r=16, target_modules=ALL)
    alone = estimate_training(s, **kw)
    joined = estimate_training(s, stack_rank=32, **kw)  # two earlier rounds of r=16, one adapter
    apart = estimate_training(s, stack_rank=32, concatenated=False, **kw)  # LoRA dropout keeps them separate
    assert joined.lora_gb == apart.lora_gb == pytest.approx(3 * alone.lora_gb, abs=0.002)
    assert joined.optimizer_gb == pytest.approx(3 * alone.optimizer_gb, abs=0.002)
    assert apart.optimizer_gb == alone.optimizer_gb
    assert joined.activations_gb >= alone.activations_gb and joined.total_gb > apart.total_gb > alone.total_gb
