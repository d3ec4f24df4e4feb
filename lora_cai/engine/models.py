"""Loading the 4-bit base (Unsloth or transformers + bitsandbytes), stacking frozen adapters, the new adapter.

The adapter being trained is `default`: PEFT and TRL both assume an adapter of that name exists, and saving it
writes a plain PEFT adapter folder. Earlier rounds are concatenated into it as frozen slices (`lora_cai.engine.concat`: one
active adapter, which keeps Unsloth's fused kernels on a GPU); where that would not be the same function (LoRA
dropout) they stay separate frozen adapters `round-1` .. `round-(k-1)`, active beside it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from pathlib import Path

from lora_cai.errors import UserError

TRAINABLE = "default"


def stack_name(k: int) -> str:
    return f"round-{k}"


def rank() -> int:
    """This process's rank under `accelerate launch`/torchrun (0 when run plainly)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier(world: int) -> None:
    if world > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def _say(message: str) -> None:
    if rank() == 0:  # under accelerate/torchrun, one process speaks
        print(message, file=sys.stderr)


def resolve_backend(requested: str) -> str:
    """`unsloth`, `transformers`, or for `auto` whichever imports (Unsloth first); says what it picked."""
    if requested == "transformers":
        _say("backend: transformers (requested)")
        return "transformers"
    try:
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        import unsloth  # noqa: F401  (must come before transformers/trl/peft to patch them)
    except Exception as e:  # ImportError, or "You need a GPU" from Unsloth builds without a CPU path
        if requested == "unsloth":
            raise UserError(f"model.backend: unsloth is not usable here ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); install it (see README) or set "
                            f"model.backend: transformers") from None
        _say(f"backend: transformers (Unsloth unavailable: {type(e).__name__})")
        return "transformers"
    _say(f"backend: unsloth ({'auto: Unsloth imports' if requested == 'auto' else 'requested'})")
    return "unsloth"


def pick_dtype(name: str):
    """The compute dtype of `model.dtype`, the one rule for loading, generation, judging and training: `auto` is
    bfloat16 only on GPUs that compute it natively (compute capability 8 and up: A100, RTX 30xx/40xx, L4), float16
    on older ones (T4, V100, P100), float32 on a CPU.

    `torch.cuda.is_bf16_supported()` alone says True on a T4, because a bfloat16 tensor can be created there
    (`including_emulation=True`); its matmuls are then emulated, slowly. Unsloth's own CUDA setup makes the same
    call with `including_emulation=False`.
    """
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def _bnb_config(dtype):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float32)


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("model.name: the tokenizer has no chat template; use an instruct/chat model")
    return tokenizer


def _process_device() -> dict:
    """Under `accelerate launch` on GPUs each process holds a whole copy on its own GPU (LOCAL_RANK)."""
    import torch

    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return {"device_map": {"": int(os.environ["LOCAL_RANK"])}}
    return {}


def load_base(model_cfg, backend: str):
    """The base model (4-bit unless disabled) and its tokenizer, through the chosen backend."""
    from lora_cai.engine.offline_models import resolve_model_path

    path = resolve_model_path(model_cfg.name)
    dtype = pick_dtype(model_cfg.dtype)
    placement = _process_device()
    try:
        if backend == "unsloth":
            from unsloth import FastLanguageModel

            model, tokenizer = FastLanguageModel.from_pretrained(
                path, max_seq_length=model_cfg.max_seq_length, dtype=dtype,
                load_in_4bit=model_cfg.load_in_4bit, trust_remote_code=model_cfg.trust_remote_code, **placement)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
            kwargs = {"dtype": dtype, "trust_remote_code": model_cfg.trust_remote_code, **placement}
            if model_cfg.load_in_4bit:
                kwargs["quantization_config"] = _bnb_config(dtype)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # a missing folder, an unsupported architecture, a broken weights or tokenizer file
        if type(e).__name__ == "OutOfMemoryError":
            raise  # the CLI says what to do about memory
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise UserError(f"model.name: cannot load '{model_cfg.name}' ({type(e).__name__}: {first}); check the name or "
                        f"path, that the folder holds a complete chat model (config.json, weights, tokenizer), and "
                        f"that this transformers version supports its architecture") from None
    keep_4bit_layers_unpacked(model)
    return model, _prepare_tokenizer(tokenizer)


def keep_4bit_layers_unpacked(model) -> int:
    """Keep every bitsandbytes 4-bit layer of `model` on one CPU code path; returns how many layers it holds.

    Why: bitsandbytes 0.50's `Linear4bit.forward`, on a CPU with AVX512-BF16 (`has_avx512bf16()`), repacks the
    layer's 4-bit weight *in place* at its first forward that is not training and has no grad
    (`_convert_weight_packed_for_cpu`), and from then on `matmul_4bit` sends the layer to a fused kernel that
    computes in bfloat16 whatever the compute dtype, in training too, where it has no autograd kernel (torch
    warns that the input gradient "may be silently incorrect"). Generation, judging, the DPO reference and
    evaluation would then compute another function than training, which one depending on the order of calls
    in the process, and the stored base weight would change. With the layer's own switch off, every forward
    dequantizes and computes in the compute dtype (`model.dtype`), as on every other CPU and as in training.

    What a user gives up: the fused bf16 kernel's speed for no-grad forwards on such CPUs. What they get: the
    DPO reference equal to the starting policy, a resumed run identical to an uninterrupted one, a base that
    stays bit-identical across rounds. Who wants bfloat16 on a CPU sets `model.dtype: bfloat16`: every stage,
    training included, then computes in bfloat16 (the dequantize path), never a silent switch between them.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return 0
    held = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):  # repacked before we saw it: back to the stored layout
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
        held += 1
    return held


def lora_config(lora):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")


def set_active(model, names: list[str], trainable: str | None = None) -> None:
    """Activate exactly `names` (in order); only `trainable`'s LoRA weights get gradients.

    PEFT's `set_adapter` marks every active adapter trainable, so the freeze is redone after it.
    """
    model.base_model.set_adapter(list(names))
    for pname, param in model.named_parameters():
        if "lora_" in pname:
            param.requires_grad = trainable is not None and f".{trainable}." in pname + "."


def active_adapters(model) -> list[str]:
    act = model.base_model.active_adapter
    return [act] if isinstance(act, str) else list(act)


@contextlib.contextmanager
def starting_policy(model, frozen: list[str]):
    """The round's starting policy inside the block: base + earlier adapters, the new one off (its slice of a
    concatenated adapter at zero, or the stack's adapters alone, or no adapter at all in round 1)."""
    from lora_cai.engine.concat import concat_of, new_slice_off

    before = active_adapters(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
    try:
        if frozen:
            set_active(model, frozen)
            yield model
        elif concat_of(model) is not None:
            with new_slice_off(model):
                yield model
        else:
            with model.disable_adapter():
                yield model
    finally:
        model.base_model.set_adapter(before)
        for n, p in model.named_parameters():
            if n in grads:
                p.requires_grad = grads[n]


def use_starting_policy(model, frozen: list[str]) -> None:
    """Until training, leave the new adapter out of every forward where it is separate: the stack alone is active
    (no adapter at all in round 1). Its B matrices are zero, so this computes the same numbers, minus its
    multiply-adds. A concatenated stack stays one adapter (its new slice's B is zero): on a GPU, one active adapter is
    what keeps Unsloth's fused LoRA kernels (they fall back to PEFT's forward with several)."""
    from lora_cai.engine.concat import concat_of

    if frozen:
        set_active(model, frozen)
    elif concat_of(model) is not None:
        set_active(model, [TRAINABLE])
    else:
        model.base_model.disable_adapter_layers()


def use_training_stack(model, frozen: list[str]) -> None:
    """The stack plus the new adapter, active; only the new adapter trainable (undoes `use_starting_policy`)."""
    model.base_model.enable_adapter_layers()
    set_active(model, frozen + [TRAINABLE], trainable=TRAINABLE)


def build_policy(model_cfg, lora, stack: list[Path], backend: str, seed: int, *, concat: bool = True):
    """Base (4-bit) + earlier adapters (frozen) + a new zero-initialised `default` adapter (trainable).

    Returns `(model, tokenizer, frozen)`: `frozen` names the earlier adapters active beside `default`, empty when
    they are concatenated into it (`lora_cai.engine.concat`; `concat=False` keeps them separate, as LoRA dropout does). The new
    adapter's B matrices start at zero, so until training the model computes exactly the round's starting policy.
    """
    model, tokenizer = load_base(model_cfg, backend)
    cfg = lora_config(lora)
    if backend == "unsloth":
        import torch
        from unsloth import FastLanguageModel

        # Gradient checkpointing trades compute for GPU memory; on a CPU (Unsloth's CPU backend turns it on too)
        # it only recomputes every forward, as the transformers backend there does not.
        checkpointing = "unsloth" if torch.cuda.is_available() else False
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, target_modules=list(lora.target_modules), lora_alpha=lora.alpha,
            lora_dropout=lora.dropout, bias="none", use_gradient_checkpointing=checkpointing, random_state=seed)
    else:
        import torch
        from peft import get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(model, cfg, adapter_name=TRAINABLE)
    from lora_cai.engine import concat as C

    frozen = []
    why_not = C.why_not_concatenable(lora, stack) if stack else None
    if stack and concat and why_not is None:
        C.concatenate(model, TRAINABLE, stack, trainable=True)
    else:
        if why_not:
            _say(why_not)
        for k, path in enumerate(stack, 1):
            name = stack_name(k)
            _load_adapter(model, path, name)
            frozen.append(name)
    set_active(model, frozen + [TRAINABLE], trainable=TRAINABLE)
    return model, tokenizer, frozen


def _load_adapter(model, path: Path, name: str) -> None:
    if not (Path(path) / "adapter_config.json").is_file():
        raise UserError(f"{path}: not a PEFT adapter folder (adapter_config.json missing); the run directory "
                        f"is damaged: restore it or start a new output_dir")
    try:
        model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    except Exception as e:
        raise UserError(f"{path}: unreadable adapter ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def save_adapter(model, dest: Path) -> None:
    """Save the trainable adapter as a PEFT folder (safetensors), atomically."""
    import shutil
    import tempfile

    from lora_cai.engine.concat import as_new_slice, concat_of

    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    if concat_of(model) is not None:  # the new slice alone: an adapter of the round's own rank
        with as_new_slice(model) as state_dict:
            model.save_pretrained(str(tmp), selected_adapters=[TRAINABLE], safe_serialization=True,
                                  state_dict=state_dict)
    else:
        model.save_pretrained(str(tmp), selected_adapters=[TRAINABLE], safe_serialization=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def load_trainable_weights(model, path: Path, frozen: list[str]) -> None:
    """Put a saved adapter's weights into the trainable `default` adapter (its new slice, when concatenated): resuming
    after its SFT finished, or evaluating a round trained by another process."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from lora_cai.engine.concat import concat_of, load_new_slice

    if concat_of(model) is not None:
        load_new_slice(model, path)
    else:
        set_peft_model_state_dict(model, load_file(str(Path(path) / "adapter_model.safetensors")),
                                  adapter_name=TRAINABLE)
    set_active(model, frozen + [TRAINABLE], trainable=TRAINABLE)


def for_inference(model, backend: str):
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    model.eval()
    return model


def for_training(model, backend: str):
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_training(model)
    model.train()
    return model


def free() -> None:
    """Return the memory of models the caller has dropped to the allocator (a round ends, a teacher leaves)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def load_policy(run_dir, *, upto: int | None = None, backend: str = "auto", model_overrides: dict | None = None):
    """A finished run's policy: the base in 4-bit with adapters 1..upto (default: the manifest's stack) applied,
    concatenated into one adapter (`lora_cai.engine.concat`; dropout plays no part in eval mode).

    Returns `(model, tokenizer)` in eval mode.
    """
    from lora_cai.config.schema import ModelConfig
    from lora_cai.core.store import RunStore

    store = RunStore(run_dir)
    manifest = store.read_manifest()
    if manifest is None:
        raise UserError(f"{run_dir}: no manifest.json here; is this a lora_cai run directory?")
    stack = manifest["stack"] if upto is None else manifest["stack"][:upto]
    model_cfg = ModelConfig(**{**manifest["model"], **(model_overrides or {})})
    backend = resolve_backend(backend if backend != "auto" else manifest.get("backend", "auto"))
    model, tokenizer = load_base(model_cfg, backend)
    paths = [store.root / rel for rel in stack]
    if paths:
        model = add_stack_adapter(model, paths, stack_name(len(paths)))
        set_active(model, [stack_name(len(paths))])
    for_inference(model, backend)
    return model, tokenizer


def add_stack_adapter(model, paths: list[Path], name: str):
    """The stack `paths` (rounds 1..k) as one frozen adapter `name` on `model`: round k's own adapter grown by the
    earlier rounds as frozen slices (`lora_cai.engine.concat`). Wraps a bare model in PEFT, or adds to a PEFT model's
    adapters; returns the model. Used by `load_policy` and by `serve` for each round it serves."""
    from peft import PeftModel

    from lora_cai.engine.concat import concatenate

    last = paths[-1]
    if not (last / "adapter_config.json").is_file():
        raise UserError(f"{last}: adapter missing or damaged")
    if isinstance(model, PeftModel):
        model.load_adapter(str(last), adapter_name=name, is_trainable=False)
    else:
        model = PeftModel.from_pretrained(model, str(last), adapter_name=name, is_trainable=False)
    if len(paths) > 1:
        concatenate(model, name, paths[:-1], trainable=False)
    return model
