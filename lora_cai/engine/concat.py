"""The stack as one adapter: earlier rounds' LoRA adapters concatenated as frozen slices of one adapter.

A stack of LoRA adapters adds sum_i s_i B_i A_i x to a projection (s_i = alpha_i / r_i). That sum is one LoRA of
rank sum(r_i): A = [A_1; ...; A_n] and B = [B_1 s_1/s, ..., B_n s_n/s] with scaling s. Keeping one active
adapter matters on a GPU: Unsloth's fused LoRA kernels and its fast generation path fall back to PEFT's plain
forward as soon as a projection has more than one active adapter (`_has_multiple_active_adapters`).

During training the adapter being trained (`default`, built by PEFT or Unsloth exactly as for round 1) is grown in
place: the earlier rounds' rows of A and columns of B are put in front of its own, B scaled by s_i/s where s is its
own alpha/r, so its slice has the same parameters, scaling and initialisation as a separate adapter and trains
to the same numbers. Only that slice learns: a gradient hook zeroes the frozen rows and columns before
anything reads the gradient (clipping, the optimizer), so AdamW (weight decay 0 here) never moves them and their
Adam state stays zero. The round's starting policy is the grown adapter with its new slice's B at zero
(`new_slice_off`), and each round saves its new slice alone as a plain PEFT adapter of its own rank.

Written by hand because PEFT's `add_weighted_adapter(combination_type="cat")` makes a new adapter (new
parameters, the first adapter's scaling rule) and knows nothing of frozen slices.

With LoRA dropout the concatenation is not the same function (one dropout mask for the whole rank instead of
one per adapter): `why_not_concatenable` says so and the caller keeps the adapters stacked.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from lora_cai.errors import UserError

ATTR = "lora_cai_concat"  # where a PeftModel carries its Concat


@dataclass(frozen=True)
class Concat:
    """How `adapter` is laid out: its first `frozen_rank` ranks are earlier rounds, the last `new_rank` its own."""

    adapter: str
    frozen_rank: int
    new_rank: int
    new_alpha: float  # the adapter's own lora_alpha (its config now says rank frozen + new, alpha s x that rank)
    sources: tuple[str, ...]  # the concatenated adapters' folders, in stack order


def concat_of(model) -> Concat | None:
    """The model's Concat, or None when its adapters (if any) are not concatenated."""
    return getattr(model, ATTR, None)


def lora_layers(model, adapter: str):
    """(module name, PEFT LoRA layer) for every layer that carries `adapter`, in module order."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {}):
            yield name, module


def _read(path: Path) -> tuple[dict, dict, float]:
    from safetensors.torch import load_file

    cfg_path = Path(path) / "adapter_config.json"
    weights = Path(path) / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(f"{path}: not a PEFT adapter folder (adapter_config.json or adapter_model.safetensors "
                        f"missing); the run directory is damaged: restore it or start a new output_dir")
    try:
        config = json.loads(cfg_path.read_text())
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - a damaged file is the user's to fix, in one line
        raise UserError(f"{path}: unreadable adapter ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return config, tensors, config["lora_alpha"] / config["r"]


def _dropout(config: dict) -> float:
    return float(config.get("lora_dropout") or 0.0)


def why_not_concatenable(lora, stack: list[Path]) -> str | None:
    """None when `stack` concatenates into an adapter of settings `lora` as the same function; else the reason.

    Adapters that cannot be stacked by this project at all (other target modules, rsLoRA, DoRA, per-module ranks)
    are a UserError: every round of a run shares the recipe's LoRA settings, so that is a damaged run directory.
    """
    targets = set(lora.target_modules)
    dropout = float(lora.dropout)
    for path in stack:
        cfg_path = Path(path) / "adapter_config.json"
        try:
            c = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise UserError(f"{path}: not a PEFT adapter folder (adapter_config.json missing or unreadable); the "
                            f"run directory is damaged: restore it or start a new output_dir") from None
        theirs = set(c.get("target_modules") or [])
        if (theirs != targets or c.get("use_rslora") or c.get("use_dora") or c.get("rank_pattern")
                or c.get("alpha_pattern") or c.get("modules_to_save")):
            raise UserError(f"{cfg_path}: the stack's adapters must share lora.target_modules "
                            f"({sorted(targets)}; this one: {sorted(theirs)}) and plain LoRA (no rsLoRA, DoRA, "
                            f"per-module ranks); rerun from that round with --restart-from")
        dropout = max(dropout, _dropout(c))
    if dropout > 0:
        return (f"LoRA dropout {dropout:g}: one adapter for the stack would share one dropout mask, so the "
                f"{len(stack)} earlier adapter(s) stay stacked (slower on a GPU: Unsloth's fused LoRA kernels need "
                f"one active adapter); lora.dropout: 0 concatenates them")
    return None


def concatenate(model, adapter: str, stack: list[Path], *, trainable: bool) -> Concat:
    """Grow `adapter` (present in every targeted layer of the PeftModel `model`) by the adapters in `stack`.

    Their ranks go first, B scaled by s_i/s with s the adapter's own scaling; `adapter` keeps its parameters' values,
    its scaling and its place as the only active adapter. With `trainable`, the frozen ranks' gradients are
    zeroed by a hook on A and B. Returns the Concat, also kept on `model`.
    """
    import torch

    if concat_of(model) is not None:
        raise RuntimeError("this model's adapters are already concatenated")
    sources = [_read(p) for p in stack]
    layers = list(lora_layers(model, adapter))
    if not layers:
        raise RuntimeError(f"no LoRA layer carries adapter {adapter!r}")
    new_rank = None
    used = [set() for _ in sources]
    for name, layer in layers:
        a_old, b_old = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        s = float(layer.scaling[adapter])
        a_blocks, b_blocks = [], []
        for (_, tensors, s_i), path, seen in zip(sources, stack, used):
            ka, kb = f"{name}.lora_A.weight", f"{name}.lora_B.weight"  # PEFT's saved keys: module name + kind
            if ka not in tensors or kb not in tensors:
                raise UserError(f"{path}: no weights for {name}; the stack's adapters must target the same modules "
                                f"(the run directory is damaged: restore it or start a new output_dir)")
            seen.update((ka, kb))
            a_blocks.append(tensors[ka].float())
            b_blocks.append(tensors[kb].float() * (s_i / s))
        frozen_rank = sum(a.shape[0] for a in a_blocks)
        new_rank = a_old.shape[0]
        rank = frozen_rank + new_rank
        a_new = torch.nn.Linear(a_old.shape[1], rank, bias=False, device=a_old.device, dtype=a_old.dtype)
        b_new = torch.nn.Linear(rank, b_old.shape[0], bias=False, device=b_old.device, dtype=b_old.dtype)
        with torch.no_grad():
            a_new.weight.copy_(torch.cat([*(a.to(a_old.device) for a in a_blocks), a_old.float()], 0))
            b_new.weight.copy_(torch.cat([*(b.to(b_old.device) for b in b_blocks), b_old.float()], 1))
        a_new.weight.requires_grad_(trainable and a_old.requires_grad)
        b_new.weight.requires_grad_(trainable and b_old.requires_grad)
        layer.lora_A[adapter] = a_new
        layer.lora_B[adapter] = b_new
        layer.r[adapter] = rank  # the scaling stays s: Unsloth's kernels read `scaling`, not alpha/r
        if trainable:
            _freeze_first(a_new.weight, frozen_rank, dim=0)
            _freeze_first(b_new.weight, frozen_rank, dim=1)
    for (_, tensors, _), path, seen in zip(sources, stack, used):
        if set(tensors) - seen:  # weights for modules the grown adapter does not have: they would be dropped
            raise UserError(f"{path}: targets modules the newest adapter does not ({sorted(set(tensors) - seen)[0]}); "
                            f"the stack's adapters must target the same modules")
    # The config describes the modules as they now are (TRL copies `default` by its config into a `ref` adapter),
    # with the same scaling s: alpha = s x rank.
    config = model.peft_config[adapter]
    cat = Concat(adapter=adapter, frozen_rank=frozen_rank, new_rank=new_rank, new_alpha=config.lora_alpha,
                sources=tuple(str(p) for p in stack))
    alpha = s * (frozen_rank + new_rank)
    config.r, config.lora_alpha = frozen_rank + new_rank, int(alpha) if float(alpha).is_integer() else alpha
    setattr(model, ATTR, cat)
    return cat


def _freeze_first(param, n: int, *, dim: int) -> None:
    """Zero the gradient of `param`'s first `n` rows (dim 0) or columns (dim 1) as soon as it is computed."""
    import torch

    shape = [1, 1]
    shape[dim] = param.shape[dim]
    mask = torch.zeros(shape, dtype=torch.bool, device=param.device)
    mask.narrow(dim, 0, n).fill_(True)
    param.register_hook(lambda grad: grad.masked_fill(mask, 0))


def _slice(tensor, cat: Concat, kind: str):
    return tensor[cat.frozen_rank:] if kind == "A" else tensor[:, cat.frozen_rank:]


@contextlib.contextmanager
def new_slice_off(model):
    """Inside the block the new slice's B is zero, so the model computes the earlier rounds alone (the round's
    starting policy); edited in place under no_grad and restored bit for bit."""
    import torch

    cat = concat_of(model)
    saved = []
    with torch.no_grad():
        for _, layer in lora_layers(model, cat.adapter):
            b = layer.lora_B[cat.adapter].weight
            saved.append((b, _slice(b, cat, "B").clone()))
            _slice(b, cat, "B").zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for b, value in saved:
                _slice(b, cat, "B").copy_(value)


@contextlib.contextmanager
def as_new_slice(model):
    """Inside the block the concatenated adapter's config is the new slice's own (rank, alpha); yields the LoRA entries of
    `model.state_dict()` cut to that slice. For PEFT's `save_pretrained(state_dict=...)`: a plain adapter of the
    round's own rank, as a separate adapter would have saved."""
    cat = concat_of(model)
    config = model.peft_config[cat.adapter]
    whole = config.r, config.lora_alpha
    config.r, config.lora_alpha = cat.new_rank, cat.new_alpha
    try:
        yield _new_slice_state_dict(model, cat)
    finally:
        config.r, config.lora_alpha = whole


def _new_slice_state_dict(model, cat: Concat) -> dict:
    out = {}
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            continue
        if f".lora_A.{cat.adapter}." in key:
            value = _slice(value, cat, "A")
        elif f".lora_B.{cat.adapter}." in key:
            value = _slice(value, cat, "B")
        out[key] = value.contiguous()
    return out


def load_new_slice(model, path: Path) -> None:
    """Put a saved adapter of the new rank (a round's `adapter/` folder) into the concatenated adapter's new slice."""
    import torch
    from safetensors.torch import load_file

    cat = concat_of(model)
    tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, layer in lora_layers(model, cat.adapter):
            for kind, module in (("A", layer.lora_A[cat.adapter]), ("B", layer.lora_B[cat.adapter])):
                saved = tensors.get(f"{name}.lora_{kind}.weight")
                target = _slice(module.weight, cat, kind)
                if saved is None or tuple(saved.shape) != tuple(target.shape):
                    raise UserError(f"{path}: does not fit the policy's new adapter at {name} (lora settings "
                                    f"changed?); rerun the round with --restart-from")
                target.copy_(saved.to(target.device, target.dtype))


def frozen_slices_match_sources(model) -> dict[str, bool]:
    """Each concatenated adapter against its folder: its rows of A equal the file's A and its columns of B the
    file's B x s_i/s (computed as `concatenate` computes them), bit for bit; what the GPU check asserts at saves."""
    import torch

    cat = concat_of(model)
    result = {}
    start = 0
    for path in cat.sources:
        _, tensors, s_i = _read(Path(path))
        ok, rank = True, None
        for name, layer in lora_layers(model, cat.adapter):
            a_file, b_file = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
            rank = a_file.shape[0]
            a, b = layer.lora_A[cat.adapter].weight, layer.lora_B[cat.adapter].weight
            want_b = (b_file.float() * (s_i / float(layer.scaling[cat.adapter]))).to(b.dtype)
            ok = ok and torch.equal(a[start:start + rank].detach().cpu(), a_file.float().to(a.dtype))
            ok = ok and torch.equal(b[:, start:start + rank].detach().cpu(), want_b)
        result[path] = ok
        start += rank
    return result
