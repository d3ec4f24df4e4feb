"""The weights vLLM serves for a policy: written once per identity, like the GGUF conversion (`offline_models`).

vLLM >= 0.28 loads no bitsandbytes 4-bit weights (that moved to an out-of-tree plugin), so it serves the
*dequantized* base the policy multiplies by: the 4-bit base loaded as it trained, every NF4 weight dequantized
to float32 on the CPU, exactly as `export` does (`engine.merge.merged_model`). Two forms:

* `merged_policy`: the stack folded into that copy, one folder per policy (per round), cast to the served dtype.
  On a CPU this avoids vLLM's slow LoRA path; `<run>/vllm/<name>`, the older ones deleted as a run moves on.
* `served_base` + `stack_adapter`: the dequantized base alone, written once per base under
  `$LORA_CAI_CACHE/vllm/` (it depends on nothing a run trains) and the stack as one adapter of rank
  sum(r_i) (`engine.merge.concatenated_adapter`, what `export --single-adapter` writes), which vLLM applies as a LoRA.

Every folder is written into a private temporary sibling, its marker file last, and moved into place with one
`os.replace`: a crash leaves only a temporary folder that is never used, and of two writers the second finds the
place taken and uses the first's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MARKER = "lora_cai_vllm.json"
# Bump when what these folders hold changes in a way that makes old ones wrong.
VERSION = 1


def _complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _write_once(target: Path, write) -> Path:
    """`write(tmp) -> info` into a temporary sibling, the marker last, then one rename; a finished target is reused."""
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        info = write(tmp)
        (tmp / MARKER).write_text(json.dumps({"version": VERSION, **info}, indent=2) + "\n")
        if target.exists() and not _complete(target):
            shutil.rmtree(target, ignore_errors=True)  # a folder left without its marker is never trusted
        try:
            os.replace(tmp, target)
        except OSError:
            if not _complete(target):  # not another writer's finished folder: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _save_model(model, tokenizer, folder: Path, dtype: str) -> None:
    import torch

    model.to(getattr(torch, dtype))
    model.config.dtype = getattr(torch, dtype)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def merged_policy(model_cfg, adapters: list[Path], folder: Path, *, dtype: str, backend: str) -> Path:
    """The base (dequantized as it trained) with `adapters` merged in order, in `dtype`, at `folder` (once)."""
    def write(tmp: Path) -> dict:
        from lora_cai.engine.merge import merged_model

        model, tokenizer = merged_model(model_cfg, [Path(a) for a in adapters], backend=backend)
        _save_model(model, tokenizer, tmp, dtype)
        del model
        return {"kind": "merged", "base_model": model_cfg.name, "base_loaded_in_4bit": model_cfg.load_in_4bit,
                "dtype": dtype, "adapters": [str(a) for a in adapters]}

    return _write_once(Path(folder), write)


def base_key(model_cfg, path: str, dtype: str) -> str:
    """12 hex digits naming a dequantized base: the checkpoint's config and weight files (size, head and tail, so
    cheap for any size), how it loads (4-bit or not) and the served dtype."""
    import importlib.metadata as md

    root = Path(path)
    parts: list = [VERSION, model_cfg.load_in_4bit, dtype]
    try:
        parts.append(md.version("bitsandbytes") if model_cfg.load_in_4bit else None)
    except md.PackageNotFoundError:
        parts.append(None)
    for f in sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 1 << 20:
                fh.seek(max(1 << 20, size - (1 << 20)))
                h.update(fh.read(1 << 20))
        parts.append([f.name, size, h.hexdigest()])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def served_base(model_cfg, *, dtype: str, backend: str, cache_dir: Path | None = None) -> Path:
    """The base as vLLM serves it under a LoRA: the checkpoint itself when it is not loaded in 4-bit (vLLM casts it to
    `dtype`), else its dequantized copy, written once under `$LORA_CAI_CACHE/vllm/`."""
    from lora_cai.engine.offline_models import default_cache_dir, resolve_model_path

    path = resolve_model_path(model_cfg.name)
    if not model_cfg.load_in_4bit and Path(path).is_dir():
        return Path(path)
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "vllm"
    return merged_policy(model_cfg, [], root / f"{Path(path).name}-{base_key(model_cfg, path, dtype)}", dtype=dtype,
                         backend=backend)


def stack_adapter(adapters: list[Path], folder: Path) -> Path:
    """The stack as one PEFT adapter of rank sum(r_i) at `folder` (once)."""
    def write(tmp: Path) -> dict:
        from safetensors.torch import save_file

        from lora_cai.engine.merge import concatenated_adapter

        tensors, config = concatenated_adapter([Path(a) for a in adapters])
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return {"kind": "adapter", "adapters": [str(a) for a in adapters]}

    return _write_once(Path(folder), write)


def adapter_rank(folder: Path) -> int:
    return int(json.loads((Path(folder) / "adapter_config.json").read_text())["r"])


def stack_rank(adapters: list[Path]) -> int:
    """The rank of the stack as one adapter: the sum of its rounds' ranks."""
    return sum(adapter_rank(a) for a in adapters)


def forget_others(root: Path, keep: set[str]) -> None:
    """Delete the finished folders under `root` this module wrote, except those named in `keep` (a run keeps only the
    merged policies it still serves: each is a whole model)."""
    if not Path(root).is_dir():
        return
    for d in Path(root).iterdir():
        if d.is_dir() and d.name not in keep and _complete(d):
            shutil.rmtree(d, ignore_errors=True)
