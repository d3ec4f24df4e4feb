"""The prepared GPU check: what only a GPU can show, in parts of at most five minutes, figures saved as they come.

    python benchmarks/gpu_check.py [--part round|shapes|all] [--out gpu_check.json] [--tiny] [--timeout 300]

Every part runs in its own process (Unsloth must be imported before transformers, and a part that hangs or runs
out of memory must not take the others with it) and writes each figure into the JSON file as soon as it has it,
so a part cut off by its timeout keeps what it measured. The file is labelled with the GPU's name and compute
capability: figures from a data-centre GPU say nothing about a T4's speed.

- `round` (a): a tiny two-round recipe (responses, critique, judged pairs, SFT, DPO, eval) through Unsloth in
  bfloat16 and in float16, one process each. Per round: seconds and peak memory per stage (the run's manifest),
  how often Unsloth's fused LoRA kernels ran (`LoRA_QKV`, `LoRA_W`, `LoRA_MLP` forwards) and how often a
  projection fell back to PEFT's forward because several adapters were active (`_has_multiple_active_adapters`
  answering True), the trainers' precision (fp16 must bring its gradient scaler); the stack invariants at every
  adapter save (each frozen adapter in memory equals its file bit for bit, the base weights' fingerprint is the
  same in every round, the new adapter's B moved off zero).
- `shapes` (b): a Llama-3.1-8B-shaped model with random weights built from a config (nothing downloaded), saved
  once (its own part), loaded in 4-bit by each backend (Unsloth, then transformers + PEFT, one process each): generation
  tokens/s at batch 1, 8 and 32 (128-token prompts, 64 new tokens), and one SFT and one DPO step at sequence 1024
  and 2048 with the measured peak memory beside the planner's estimate (`lora_cai.engine.planner`), then one step of each
  other preference objective (KTO at batch 2, SimPO, ORPO: their full-vocabulary logits) the same way.

`--tiny` runs the same code on a CPU with the tiny test model and small sizes (the default test suite runs it, so
it cannot rot); float16 with its scaler needs a GPU and is skipped there, and Unsloth's CPU backend never imports
its GPU kernels, so the kernel counts read `null` ("not imported"). The wheels a bare GPU machine lacks:
`benchmarks/collect_wheels.py` (docs/gpu-check.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")

# Llama-3.1-8B's shape (its config.json); the weights are random.
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
FULL = {"batches": (1, 8, 32), "prompt": 128, "new": 64, "seqs": (1024, 2048)}
TINY = {"batches": (1, 2, 4), "prompt": 16, "new": 8, "seqs": (64, 128)}
ROUND_DTYPES = ("bfloat16", "float16")
KERNELS = ("LoRA_QKV", "LoRA_W", "LoRA_MLP")
OBJECTIVES = ("kto", "simpo", "orpo")  # dpo.loss values beside DPO whose peak the planner models differently


# ---------------------------------------------------------------- the JSON file, written as figures come in
def record(out: Path, path: tuple, value) -> None:
    """Set `value` at `path` in the JSON file `out`, atomically (a kill never leaves half a file)."""
    data = json.loads(out.read_text()) if out.exists() else {}
    node = data
    for key in path[:-1]:
        node = node.setdefault(str(key), {})
    node[str(path[-1])] = value
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)


def device_label() -> dict:
    import torch

    label = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        label |= {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
                  "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    else:
        label |= {"name": "cpu", "compute_capability": None, "memory_gb": None}
    return label


def peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    """CUDA's max allocated since the last reset; on a CPU the process's peak resident set (never reset)."""
    import resource

    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


# ---------------------------------------------------------------- part (a): a tiny two-round recipe
class Counters:
    """Counts calls into Unsloth's fused LoRA kernels and its multi-adapter fallback, per round.

    The fused autograd Functions are patched on their classes (every call site reaches them through
    `Function.apply`); the fallback test is patched in every module that imported it by name."""

    def __init__(self):
        self.round = 0
        self.counts: dict[int, dict[str, int]] = {}
        self.imported = False

    def bump(self, name: str) -> None:
        per = self.counts.setdefault(self.round, {})
        per[name] = per.get(name, 0) + 1

    def install(self) -> None:
        if "unsloth.kernels.fast_lora" not in sys.modules:  # Unsloth's CPU backend never imports its kernels
            return
        self.imported = True
        fast_lora = sys.modules["unsloth.kernels.fast_lora"]
        for name in KERNELS:
            cls = getattr(fast_lora, name)
            forward = cls.forward

            def counted(ctx, *args, _forward=forward, _name=name, **kwargs):
                self.bump(_name)
                return _forward(ctx, *args, **kwargs)

            cls.forward = staticmethod(counted)
        original = sys.modules["unsloth.kernels.utils"]._has_multiple_active_adapters

        def multiple(proj):
            answer = original(proj)
            self.bump("multiple_active_adapters" if answer else "single_active_adapter")
            return answer

        for module in list(sys.modules.values()):
            if getattr(module, "_has_multiple_active_adapters", None) is original:
                module._has_multiple_active_adapters = multiple

    def of_round(self, k: int) -> dict:
        names = KERNELS + ("multiple_active_adapters", "single_active_adapter")
        if not self.imported:
            return {n: None for n in names} | {"note": "not imported (Unsloth's CPU backend)"}
        return {n: self.counts.get(k, {}).get(n, 0) for n in names}


def fingerprint(model) -> str:
    """sha256 over the base model's own tensors (4-bit weights, their quantization state, norms, embeddings)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" not in name:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stack_check(model, stack_dir: Path) -> dict:
    """At an adapter save: each frozen round's weights in memory against its saved file, bit for bit (as slices of
    the one concatenated adapter: B scaled by s_i/s, `lora_cai.engine.concat`), and whether the new adapter learnt."""
    import torch
    from safetensors.torch import load_file

    from lora_cai.engine.concat import concat_of, frozen_slices_match_sources

    cat = concat_of(model)
    if cat is not None:
        frozen = {Path(p).parent.name.split("-")[1]: ok for p, ok in frozen_slices_match_sources(model).items()}
        b = [p[:, cat.frozen_rank:] for n, p in model.named_parameters() if "lora_B" in n and f".{cat.adapter}." in n]
        return {"frozen_equal_their_files": frozen, "one_adapter": True,
                "new_adapter_moved": bool(b) and any(float(p.detach().float().abs().sum()) > 0 for p in b)}
    named = dict(model.named_parameters())
    frozen, moved = {}, None
    for adapter in sorted(stack_dir.glob("round-*/adapter/adapter_model.safetensors")):
        k = adapter.parent.parent.name.split("-")[1]
        saved = load_file(str(adapter))
        in_memory = {n.replace(f".round-{k}.", "."): p for n, p in named.items() if f".round-{k}." in n}
        if in_memory:
            frozen[k] = all(n in in_memory and torch.equal(in_memory[n].detach().cpu(), t.to(in_memory[n].dtype))
                            for n, t in saved.items())
    b = [p for n, p in named.items() if "lora_B" in n and ".default." in n]
    moved = bool(b) and any(float(p.detach().float().abs().sum()) > 0 for p in b)
    return {"frozen_equal_their_files": frozen, "one_adapter": not frozen, "new_adapter_moved": moved}


def part_round(out: Path, dtype: str, tiny: bool, work: Path) -> None:
    if os.environ.get("GPU_CHECK_BACKEND", "unsloth") == "unsloth":
        with contextlib.suppress(Exception):
            import unsloth  # noqa: F401  (before transformers, as lora_cai does)
    from lora_cai.engine import models
    from lora_cai import recipe
    from lora_cai.loop import rounds
    from lora_cai.trainers import common
    from lora_cai.tiny import build_tiny_model

    key = ("round", dtype)
    model_dir = build_tiny_model(work / "tiny")
    run_dir = work / f"run-{dtype}"
    backend = os.environ.get("GPU_CHECK_BACKEND", "unsloth")
    recipe_file = work / f"round-{dtype}.yaml"
    recipe_file.write_text("\n".join([
        "name: gpu-check", f"model: {{name: {model_dir}, backend: {backend}, dtype: {dtype}}}",
        "constitution: default", "data: {prompts: 'builtin:smoke', limit: 8, eval_limit: 2}", "rounds: 2",
        "seed: 3", f"output_dir: {run_dir}", "generation: {max_new_tokens: 16, critique_max_new_tokens: 12}",
        "critique: {steps: 1, demonstrations: 1}", "lora: {r: 8, alpha: 16}",
        "sft: {batch_size: 4, learning_rate: 0.005}", "dpo: {batch_size: 4, learning_rate: 0.005}",
        "eval: {early_stop_drop: null, capability_limit: 8}"]) + "\n")

    counters = Counters()
    run_round, save_adapter, precision = rounds.run_round, models.save_adapter, common._precision_args
    fingerprints: dict[int, str] = {}
    saves: dict[int, dict] = {}

    def counted_round(ledger, ctx, plan, **kw):
        counters.install() if not counters.imported else None
        counters.round = ctx.k
        return run_round(ledger, ctx, plan, **kw)

    def checked_save(model, dest):
        k = counters.round
        fingerprints[k] = fingerprint(model)
        saves[k] = stack_check(model, run_dir) | {"loaded_dtype": str(getattr(model, "dtype", None))}
        record(out, key + ("rounds", k, "stack"), saves[k])
        return save_adapter(model, dest)

    def seen_precision(model):
        args = precision(model)
        record(out, key + ("rounds", counters.round, "trainer_precision"), args)
        return args

    import accelerate

    accelerator_init = accelerate.Accelerator.__init__

    def seen_scaler(self, *args, **kwargs):
        accelerator_init(self, *args, **kwargs)
        record(out, key + ("rounds", counters.round, "grad_scaler"), getattr(self, "scaler", None) is not None)

    accelerate.Accelerator.__init__ = seen_scaler
    rounds.run_round, models.save_adapter, common._precision_args = counted_round, checked_save, seen_precision
    record(out, key + ("status",), "running")
    start = time.time()
    rc = recipe.main([str(recipe_file)])
    record(out, key + ("seconds",), round(time.time() - start, 1))
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").exists() else {}
    for k, summary in manifest.get("rounds", {}).items():
        record(out, key + ("rounds", k, "stage_seconds"),
               {s: t.get("seconds") for s, t in summary.get("timing", {}).items()})
        record(out, key + ("rounds", k, "peak_memory_gb"), summary.get("peak_memory_gb"))
        record(out, key + ("rounds", k, "fused_kernels"), counters.of_round(int(k)))
        record(out, key + ("rounds", k, "seconds_per_step"), steps_time(run_dir / f"round-{k}"))
    rounds_done = out_rounds(out, key)
    if {"1", "2"} <= set(rounds_done):  # round 2 trains on round 1 concatenated: its step should cost about the same
        per_step = {k: rounds_done[k].get("seconds_per_step") or {} for k in ("1", "2")}
        record(out, key + ("round2_over_round1_step",),
               {stage: round(per_step["2"][stage] / per_step["1"][stage], 3) for stage in ("sft", "dpo")
                if per_step["1"].get(stage) and per_step["2"].get(stage)})
    record(out, key + ("base_identical_in_every_round",), len(set(fingerprints.values())) == 1 and len(saves) == 2)
    record(out, key + ("status",), "ok" if rc == 0 else f"recipe exit {rc}")


def steps_time(round_dir: Path) -> dict:
    """Seconds per optimizer step of the round's SFT and DPO, from the trainers' own logs."""
    out = {}
    for stage in ("sft", "dpo"):
        log = round_dir / f"{stage}_log.jsonl"
        if not log.exists():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        end = [r for r in rows if "train_runtime" in r]
        steps = max((int(r.get("step", 0)) for r in rows), default=0)
        if end and steps:
            out[stage] = round(end[-1]["train_runtime"] / steps, 4)
    return out


def out_rounds(out: Path, key: tuple) -> dict:
    node = json.loads(out.read_text()) if out.exists() else {}
    for part in key + ("rounds",):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node


# ---------------------------------------------------------------- part (b): an 8B-shaped model in 4-bit
def build_shaped(work: Path, tiny: bool) -> Path:
    """A random model of Llama-3.1-8B's shape (the tiny test model with --tiny), saved once in bf16."""
    from lora_cai.tiny import build_tiny_model

    if tiny:
        return build_tiny_model(work / "tiny")
    path = work / "llama-8b-shaped"
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_dir = build_tiny_model(work / "tiny")  # any tokenizer will do: the ids are random
    config = LlamaConfig(**LLAMA_8B, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 16 GB, not 32 GB then a copy
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=".shaped-", dir=work))
    model.save_pretrained(tmp, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_dir / f).exists():
            (tmp / f).write_bytes((tok_dir / f).read_bytes())
    os.replace(tmp, path)
    return path


def part_shapes(out: Path, backend: str, tiny: bool, work: Path) -> None:
    if backend == "build":  # its own part: writing 16 GB of random bf16 weights takes minutes by itself
        t0 = time.time()
        build_shaped(work, tiny)
        record(out, ("shapes", "build"), {"status": "ok", "seconds": round(time.time() - t0, 1)})
        return
    if backend == "unsloth":
        import unsloth  # noqa: F401
    import torch

    from lora_cai.engine.generation import is_oom, model_device
    from lora_cai.trainers.dpo import train_preferences
    from lora_cai.trainers.sft import train_sft
    from lora_cai.engine import models, planner
    from lora_cai.config.schema import DPOSettings, LoraSettings, ModelConfig, SFTSettings

    sizes = TINY if tiny else FULL
    key = ("shapes", backend)
    path = build_shaped(work, tiny)
    config = json.loads((path / "config.json").read_text())
    shape = planner.model_shape(config)
    record(out, ("shapes", "model"), {k: config.get(k) for k in LLAMA_8B} | {"path": path.name})
    record(out, key + ("status",), "running")
    lora = LoraSettings(r=16, alpha=16)
    cfg = ModelConfig(name=str(path), backend=backend, load_in_4bit=True, dtype="auto",
                      max_seq_length=max(sizes["seqs"]) + 16)
    peak_reset()
    t0 = time.time()
    model, tok, frozen = models.build_policy(cfg, lora, [], backend, 0)
    record(out, key + ("load",), {"seconds": round(time.time() - t0, 1), "peak_gb": peak_gb(),
                                  "dtype": str(model.dtype)})
    device = model_device(model)
    vocab = config["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    models.for_inference(model, backend)
    for batch in sizes["batches"]:
        ids = torch.randint(10, vocab, (batch, sizes["prompt"]), generator=gen).to(device)
        peak_reset()
        t0 = time.time()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sizes["new"],
                           min_new_tokens=sizes["new"], do_sample=False, pad_token_id=0)
        seconds = time.time() - t0
        est = planner.estimate_generation(shape, batch=batch, seq_len=sizes["prompt"] + sizes["new"],
                                          device="cuda" if torch.cuda.is_available() else "cpu")
        record(out, key + ("generation", batch), {"tokens_per_s": round(batch * sizes["new"] / seconds, 1),
                                                  "peak_gb": peak_gb(), "planner_gb": est.total_gb})
    models.for_training(model, backend)

    per_word = len(tok(" tok" * 100, add_special_tokens=False)["input_ids"]) / 100
    for seq in sizes["seqs"]:
        half = (" tok" * int((seq // 2 - 16) / per_word)).strip()  # prompt and answer: half the sequence each
        for stage in ("sft", "dpo", *OBJECTIVES):
            dpo = stage != "sft"
            objective = "sigmoid" if stage == "dpo" else stage
            batch = 2 if objective == "kto" else 1  # KTO's KL estimate needs two examples in a batch
            sft_records = [{"prompt": half, "completion": half}]
            pairs = [{"id": str(i), "prompt": half, "chosen": half, "rejected": half.replace("tok", "kot")}
                     for i in range(batch)]
            common = dict(batch_size=batch, learning_rate=1e-4, epochs=1, max_length=seq, save_steps=1000)
            peak_reset()
            t0 = time.time()
            try:
                if dpo:
                    train_preferences(model, tok, pairs, DPOSettings(loss=objective, **common),
                                               work / f"{backend}-{stage}-{seq}", seed=0, frozen=frozen)
                else:
                    train_sft(model, tok, sft_records, SFTSettings(**common),
                                       work / f"{backend}-sft-{seq}", seed=0, frozen=frozen)
                figures = {"seconds": round(time.time() - t0, 2), "peak_gb": peak_gb()}
            except Exception as error:  # an OOM here is a figure too
                if not is_oom(error):
                    raise
                figures = {"seconds": None, "peak_gb": peak_gb(), "error": "out of memory"}
            est = planner.estimate_training(shape, batch=batch, seq_len=seq, lora_r=lora.r,
                                            target_modules=lora.target_modules, dpo=dpo, objective=objective,
                                            device="cuda" if torch.cuda.is_available() else "cpu")
            record(out, key + (stage, seq), figures | {"planner_gb": est.total_gb})
    record(out, key + ("status",), "ok")


# ---------------------------------------------------------------- the driver
def child(part: str, arg: str, out: Path, tiny: bool, work: Path, timeout: float) -> None:
    """Run one part in a fresh process with a timeout; its status says how it ended."""
    cmd = [sys.executable, __file__, "--_child", part, "--_arg", arg, "--out", str(out), "--_work", str(work)]
    key = ("round", arg) if part == "round" else ("shapes", arg)
    try:
        proc = subprocess.run(cmd + (["--tiny"] if tiny else []), timeout=timeout, capture_output=True,
                              text=True)
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            record(out, key + ("status",), f"failed (exit {proc.returncode}): {tail[0][:300]}")
            (out.parent / f"{out.stem}.{part}-{arg}.log").write_text(proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired:
        record(out, key + ("status",), f"cut off after {timeout:.0f} s (figures so far kept)")
    print(f"{part} {arg}: {json.loads(out.read_text()).get(part, {}).get(arg, {}).get('status')}", flush=True)


def unsloth_usable() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import unsloth"], capture_output=True, timeout=300)
    return probe.returncode == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("round", "shapes", "all"), default="all")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--tiny", action="store_true", help="the same code on a CPU with the tiny model")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per part (default 300)")
    ap.add_argument("--work", type=Path, default=None, help="where models and runs go (default: a temp folder)")
    ap.add_argument("--_child"), ap.add_argument("--_arg"), ap.add_argument("--_work", type=Path)
    args = ap.parse_args(argv)
    out = args.out.resolve()
    if args._child:
        (part_round if args._child == "round" else part_shapes)(out, args._arg, args.tiny, args._work)
        return 0

    import torch

    if not torch.cuda.is_available() and not args.tiny:
        print("gpu_check: no CUDA device here; run it on a GPU machine, or with --tiny to check the code on a CPU",
              file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    record(out, ("device",), device_label() | {"tiny": args.tiny})
    import importlib.metadata as md

    libraries = {}
    for dist in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "accelerate"):
        with contextlib.suppress(md.PackageNotFoundError):
            libraries[dist] = md.version(dist)
    record(out, ("libraries",), libraries)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    has_unsloth = unsloth_usable()
    record(out, ("unsloth_importable",), has_unsloth)
    os.environ["GPU_CHECK_BACKEND"] = "unsloth" if has_unsloth else "transformers"
    record(out, ("round_backend",), os.environ["GPU_CHECK_BACKEND"])
    if args.part in ("round", "all"):
        for dtype in ROUND_DTYPES if torch.cuda.is_available() else ("bfloat16",):
            child("round", dtype, out, args.tiny, work, args.timeout)
        if not torch.cuda.is_available():
            record(out, ("round", "float16", "status"), "skipped: float16 with a gradient scaler needs a GPU")
    if args.part in ("shapes", "all"):
        for backend in ("build", "unsloth", "transformers") if has_unsloth else ("build", "transformers"):
            child("shapes", backend, out, args.tiny, work, args.timeout)
    print(f"figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
