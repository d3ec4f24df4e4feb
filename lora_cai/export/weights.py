"""Export a run's stacked policy: merged 16-bit checkpoint, GGUF through Unsloth, Hub push.

    python -m lora_cai.export RUN_DIR --out OUT [--upto K] [--dtype bfloat16|float16|float32]
                              [--gguf QUANT] [--push-to-hub REPO_ID] [--backend auto|transformers|unsloth]
    python -m lora_cai.export RUN_DIR --out OUT --single-adapter [--upto K] [--push-to-hub REPO_ID]
    python -m lora_cai.export RUN_DIR --dataset OUT [--push-to-hub REPO_ID]     (the data: lora_cai.dataset)

The base is loaded in 4-bit exactly as the run trained it (the manifest's model settings and backend),
each NF4 weight is dequantized with bitsandbytes into float32 on the CPU, so the merged model starts
from the very weights the trained policy multiplied by, and every adapter of the stack (1..K) is merged
into it in order with PEFT's `merge_and_unload`, still in float32. Only then is the result cast to
`--dtype` and saved (safetensors, tokenizer, `lora_cai_export.json`). The merge needs about 4 bytes of
CPU memory per parameter (32 GB for an 8B model), whatever `--dtype` is.

`fold_stack` is the same merge for a long run: the earlier adapters folded into a 16-bit copy of the
base, which then loads re-quantized to 4-bit with one adapter fewer per round. Measured
(benchmarks/bench_fold.py, tiny model): the 16-bit fold itself keeps the adapters (error 6 % of their
change, bf16 rounding), but re-quantizing to NF4 snaps most weights back onto the grid they came from and
undoes 96 % of the adapters' change when their deltas are small next to the NF4 step, which trained
deltas usually are. Load a fold with `load_in_4bit: false` where memory allows.

`--single-adapter` writes the stack as one PEFT adapter instead, for servers that apply one LoRA per
request (vLLM `--lora-modules`, SGLang, TGI, LoRAX): since a stack computes W + sum_i s_i B_i A_i, the
adapter with A = [A_1; ...; A_n] and B = [s_1 B_1, ..., s_n B_n] (rank sum r_i, scaling 1) computes exactly
the same. It reads only the adapter files (no base model loads), in seconds.

GGUF goes only through Unsloth's `save_pretrained_gguf`, in a separate process (Unsloth must be imported
before transformers). It fetches and builds llama.cpp, so it needs the network the first time; where
that fails the merged checkpoint is still complete and the error says so. `--push-to-hub` uploads OUT
with `huggingface_hub` (token from `HF_TOKEN`; a new repository is created private, and an existing public one is
refused unless `--public` says to publish). Nothing written carries a local path: the source run is named by its
folder's name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lora_cai.engine.merge import _dequantize_to_cpu_fp32, _last_line, concatenated_adapter, merged_model  # noqa: F401
from lora_cai.errors import UserError

DTYPES = ("bfloat16", "float16", "float32")
MARKER = "lora_cai_export.json"


# --------------------------------------------------------------------------------------------------
# The merge (engine.merge, shared with vLLM's served weights), written as a checkpoint
# --------------------------------------------------------------------------------------------------
def _save(model, tokenizer, out: Path, dtype: str, info: dict) -> Path:
    """Cast to `dtype` and write a checkpoint into `out` atomically (a temporary sibling renamed into place)."""
    import torch

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists and is not empty; choose another path or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype))
    model.config.dtype = getattr(torch, dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp (and some writers) make owner-only files; follow the umask
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _info(kind: str, model_cfg, adapters: list[Path], dtype: str, stack: list[str] | None = None, **extra) -> dict:
    from lora_cai.version import __version__
    from lora_cai.core.store import file_hash

    return {"kind": kind, "lora_cai": __version__, "base_model": model_cfg.name,
            "base_loaded_in_4bit": model_cfg.load_in_4bit, "dtype": dtype,
            "merged": "4-bit NF4 base dequantized to float32, adapters merged in order in float32, then cast",
            "stack": [str(p) for p in (stack if stack is not None else adapters)],
            "adapter_sha256": [file_hash(Path(p) / "adapter_model.safetensors") for p in adapters], **extra}


def fold_stack(base_model_cfg, adapter_dirs: list[Path], out_dir: Path, dtype: str = "bfloat16", *,
               backend: str = "transformers") -> Path:
    """Fold `adapter_dirs` (in order) into a `dtype` copy of the dequantized base and save it to `out_dir`.

    A later round loads `out_dir` as its base with those adapters gone from the stack. Re-quantized to
    4-bit it loses most of what small adapters did (module docstring; `benchmarks/bench_fold.py`).
    """
    if dtype not in DTYPES:
        raise UserError(f"fold dtype '{dtype}': use one of {', '.join(DTYPES)}")
    adapters = [Path(p) for p in adapter_dirs]
    model, tokenizer = merged_model(base_model_cfg, adapters, backend=backend)
    return _save(model, tokenizer, Path(out_dir), dtype, _info("fold", base_model_cfg, adapters, dtype))


# --------------------------------------------------------------------------------------------------
# A run directory
# --------------------------------------------------------------------------------------------------
def read_run(run_dir: Path, upto: int | None):
    """(model config, adapter folders 1..upto, backend) of a finished run, checked; UserError otherwise."""
    from lora_cai.config.schema import ModelConfig
    from lora_cai.core.store import RunStore

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    try:
        manifest = RunStore(run_dir).read_manifest()
    except (OSError, ValueError) as e:
        raise UserError(f"{run_dir / 'manifest.json'}: unreadable ({type(e).__name__}); is this a lora_cai run "
                        f"directory?") from None
    if manifest is None:
        raise UserError(f"{run_dir}: no manifest.json here; is this a lora_cai run directory?")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), dict) \
            or not isinstance(manifest.get("stack"), list):
        raise UserError(f"{run_dir / 'manifest.json'}: not a run manifest (needs 'model' and 'stack'); is this a "
                        f"lora_cai run directory?")
    try:
        model_cfg = ModelConfig(**manifest["model"])
    except Exception as e:
        raise UserError(f"{run_dir / 'manifest.json'}: bad 'model' entry ({str(e).splitlines()[0]})") from None
    stack = manifest["stack"]
    if upto is not None and not 0 <= upto <= len(stack):
        raise UserError(f"--upto {upto}: the run has {len(stack)} adapter(s); use 0..{len(stack)}")
    if upto is None and not stack:
        raise UserError(f"{run_dir}: the run has no finished round yet (empty stack); nothing to export")
    adapters = [run_dir / rel for rel in stack[:len(stack) if upto is None else upto]]
    return model_cfg, adapters, manifest.get("backend") or "auto"


def _check_adapters(adapters: list[Path]) -> None:
    for path in adapters:
        if not ((path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()):
            raise UserError(f"{path}: not a PEFT adapter folder (adapter_config.json or adapter_model.safetensors "
                            f"missing); the run directory is damaged: restore it, or export fewer adapters with --upto")


def _check_out(out: Path, flag: str = "--out") -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{flag} {out}: already exists and is not empty; choose another path or remove it")
    return out


def export_run(run_dir: Path, out: Path, *, upto: int | None = None, dtype: str = "bfloat16",
               backend: str | None = None) -> Path:
    """Merge a run's stack (1..upto) into a `dtype` checkpoint at `out`; returns `out`."""
    from lora_cai.engine.models import resolve_backend

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    model_cfg, adapters, run_backend = read_run(run_dir, upto)
    _check_adapters(adapters)
    out = _check_out(out)
    chosen = resolve_backend(backend or run_backend)
    model, tokenizer = merged_model(model_cfg, adapters, backend=chosen)
    info = _info("export", model_cfg, adapters, dtype, stack=[p.relative_to(run_dir).as_posix() for p in adapters],
                 source_run=Path(run_dir).resolve().name, backend=chosen, upto=len(adapters))
    return _save(model, tokenizer, out, dtype, info)


def single_adapter(adapter_dirs: list[Path], out: Path) -> Path:
    """The stack `adapter_dirs` as one LoRA adapter of rank sum(r_i) at `out` (float32, `engine.merge.
    concatenated_adapter`); returns `out`."""
    from safetensors.torch import save_file

    out = _check_out(out)
    _check_adapters(adapter_dirs)
    merged, config = concatenated_adapter(adapter_dirs)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    save_file(merged, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    shutil.move(str(tmp), str(out))
    return out


# --------------------------------------------------------------------------------------------------
# GGUF and the Hub
# --------------------------------------------------------------------------------------------------
_GGUF_WORKER = r"""
import os, sys
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
import unsloth
from unsloth import FastLanguageModel
src, dest, quant = sys.argv[1:4]
model, tokenizer = FastLanguageModel.from_pretrained(src, load_in_4bit=False, max_seq_length=2048)
model.save_pretrained_gguf(dest, tokenizer, quantization_method=quant)
"""


def export_gguf(out: Path, quant: str, timeout: float = 3600) -> Path:
    """`out`'s merged checkpoint converted by Unsloth's `save_pretrained_gguf` into `out/gguf/`."""
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        raise UserError(f"--gguf {quant}: needs Unsloth (pip install unsloth); the merged checkpoint in {out} is "
                        f"complete: convert it with llama.cpp's convert_hf_to_gguf.py instead")
    dest = Path(out) / "gguf"
    try:
        proc = subprocess.run([sys.executable, "-c", _GGUF_WORKER, str(out), str(dest), quant], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        failed = proc.returncode != 0 or not list(dest.glob("*.gguf"))
        why = _last_line(proc.stderr + "\n" + proc.stdout) if failed else ""
    except subprocess.TimeoutExpired:
        failed, why = True, f"no result after {timeout:.0f}s"
    if failed:
        shutil.rmtree(dest, ignore_errors=True)  # Unsloth's half-done copy; the merged checkpoint stays
        raise UserError(f"--gguf {quant}: Unsloth's save_pretrained_gguf failed ({why}); it fetches and builds "
                        f"llama.cpp on first use, which needs the network (or point UNSLOTH_LLAMA_CPP_PATH at a built "
                        f"llama.cpp); the merged checkpoint in {out} is complete")
    return dest
