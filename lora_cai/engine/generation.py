"""Batched generation engine: chat rendering, left padding, length bucketing, token-budget batches, OOM back-off, stop strings, seeded sampling.

Every generation a CAI run makes (responses, critiques, revisions, samples to judge) goes through
`iter_generate`. Instead of one `model.generate` call per prompt, the engine

* tokenizes every prompt once, up front (no padding), and plans batches with `plan_batches`: indices
  sorted by prompt length (length bucketing, so a batch holds prompts of similar length and little
  padding) and cut so that `(longest prompt + max_new_tokens) * batch size <= token_budget`;
* left-pads each batch itself (pad id, attention mask) and calls `model.generate` once per batch under
  `torch.inference_mode()` with the KV cache on; under Unsloth (`FastLanguageModel.for_inference`) that
  plain call is Unsloth's fast-inference path;
* on CUDA out-of-memory halves the batch, retries, and keeps the smaller size for the rest of the call
  (and, through a shared `GenerationStats`, for the rest of the stage);
* cuts each output at the first stop string (transformers' `stop_strings` ends generation, the decoded
  text is truncated at the same string), decodes only the new tokens, skips special tokens, strips;
* seeds sampling per batch from `(seed, batch index, prompt indices)` inside `torch.random.fork_rng`, so
  a batch's texts do not depend on which batches ran before it (a resumed stage, which passes the
  batches it already committed in `skip_batches`, reproduces an uninterrupted one) and the caller's
  global RNG is left untouched;
* never crashes on an over-long prompt: it is skipped (text `None`, counted in `skipped_too_long`) or,
  with `on_too_long="truncate"`, cut from the left so the generation prompt at its end survives
  (counted in `truncated`).

`forward_batches` is the same padding and out-of-memory back-off for a plain forward pass (the judge's
option scores, the capability probe's log-likelihoods); `batch_seed`, `eos_token_ids`, `cut_at_stop`,
`context_length`, `model_device` and `is_oom` are the engine's pieces that the server and the judges share.

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from lora_cai.errors import UserError

__all__ = [
    "GenerationStats",
    "batch_seed",
    "context_length",
    "cut_at_stop",
    "eos_token_ids",
    "generate",
    "is_oom",
    "iter_generate",
    "make_progress",
    "model_device",
    "plan_batches",
    "render_chat",
]


# --------------------------------------------------------------------------------------------------
# Chat rendering
# --------------------------------------------------------------------------------------------------

def _fold_system(messages: list[dict]) -> list[dict]:
    """Fold every system message's text into the first user message (for templates without a system role)."""
    system = "\n\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "system").strip()
    rest = [dict(m) for m in messages if m.get("role") != "system"]
    if not system:
        return rest
    for m in rest:
        if m.get("role") == "user":
            m["content"] = f"{system}\n\n{m.get('content', '')}"
            return rest
    return [{"role": "user", "content": system}, *rest]


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """Render `messages` with the tokenizer's chat template to a string (not tokens).

    Templates without a system role (Gemma, Mistral style) raise on a "system" message; the system text is
    then folded into the first user message and the template applied again.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(f"tokenizer {name!r} has no chat template; use an instruct/chat model or set "
                        "tokenizer.chat_template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:
        if not any(m.get("role") == "system" for m in messages):
            raise
    return tokenizer.apply_chat_template(_fold_system(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


# --------------------------------------------------------------------------------------------------
# Statistics and progress
# --------------------------------------------------------------------------------------------------

@dataclass
class GenerationStats:
    """Counters for one stage's generation; pass the same object to several calls to accumulate.

    Counts cover the batches a call yields (batches in `skip_batches` are not counted again).
    `batch_size_final` is the batch-size cap after OOM back-offs (or the largest batch run when there were
    none); a later call given these stats starts from that cap, so the smaller size holds for the stage.
    """

    requested: int = 0
    generated: int = 0
    skipped_too_long: int = 0
    truncated: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    oom_backoffs: int = 0
    batch_size_final: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 2)}


def make_progress(**kwargs):
    """A `rich.progress.Progress` whose columns show items done/total, tokens/s and ETA (see `iter_generate`).

    Tasks without a `tokens_per_s` field (added by other stages) render that column empty.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class TokensPerSecondColumn(ProgressColumn):
        def render(self, task):
            value = task.fields.get("tokens_per_s")
            return Text(f"{value:>7.1f} tok/s" if value is not None else "", style="progress.data.speed")

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TokensPerSecondColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    **kwargs)


# --------------------------------------------------------------------------------------------------
# Batch planning
# --------------------------------------------------------------------------------------------------

def plan_batches(lengths: list[int], *, token_budget: int, max_batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """Cut prompt indices into batches, deterministically.

    Indices are sorted by prompt length (stable, so ties keep input order) and cut greedily so that each
    batch satisfies `(longest prompt + max_new_tokens) * batch size <= token_budget` and holds at most
    `max_batch_size` prompts. A prompt that alone exceeds the budget still gets a batch of its own.
    """
    if token_budget <= 0 or max_batch_size <= 0 or max_new_tokens < 0:
        raise UserError(f"generation: token_budget ({token_budget}) and max_batch_size ({max_batch_size}) must be "
                        f"positive and max_new_tokens ({max_new_tokens}) non-negative")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # sorted ascending, so the newcomer is the longest prompt of the batch
        if current and (len(current) >= max_batch_size
                        or (lengths[i] + max_new_tokens) * (len(current) + 1) > token_budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------

def batch_seed(seed: int, batch_index: int, indices: list[int]) -> int:
    """A stable 63-bit seed from (seed, batch index, prompt indices); independent of Python's hash salt."""
    key = f"{seed}:{batch_index}:{','.join(map(str, indices))}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def is_oom(exc: BaseException) -> bool:
    import torch

    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def context_length(model) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        try:
            config = config.get_text_config()
        except Exception:  # pragma: no cover - exotic configs
            pass
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_device(model):
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def eos_token_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]) + [tokenizer.eos_token_id]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def cut_at_stop(text: str, stop: list[str]) -> str:
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


# Below this many shared tokens a batch encodes every row whole: a guess, not measured (plain chat prompts share
# only the template's 24 tokens or so with SmolLM2, and gain little from a second forward call per batch).
MIN_SHARED_PREFIX = 32


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading tokens all `sequences` share, leaving each at least one token of its own (the first
    token generation computes must come from the prompt, not from the cache)."""
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    n = 0
    while n < shortest - 1 and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


def _shared_prefix_cache(model, prefix, batch_size: int):
    """The key/value cache of `prefix` (1 x P tokens), encoded once and repeated for each of `batch_size` rows.

    Written here because `generate` re-encodes every row's copy of a shared few-shot prefix: with the
    constitution's demonstrations in context that prefix is most of each prompt (about 200 of 230 tokens for
    SmolLM2); encoding it once saves that prefill for every row but one (decoding still attends over it:
    `benchmarks/bench_prefix_cache.py` measures the whole). `generate` continues from a passed cache: it feeds
    only the uncached tokens and takes positions from the attention mask, so a row's padding between the prefix
    and its own tokens is masked and skipped.

    Returns None where that does not hold exactly, and the batch encodes every row whole: a model whose
    generation config names its own cache (`generate` refuses a cache passed beside it), and any cache but
    full-attention `DynamicLayer`s (sliding windows would count the padding inside the window; recurrent
    states are not repeated across a batch).
    """
    import inspect

    from transformers.cache_utils import DynamicCache, DynamicLayer

    if getattr(getattr(model, "generation_config", None), "cache_implementation", None):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs through
    # only the cache is wanted: logits for one position, not the prefix's (120 MB for a 150k vocabulary)
    one_logit = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    cache = getattr(model(input_ids=prefix, use_cache=True, **one_logit), "past_key_values", None)
    if type(cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.batch_repeat_interleave(batch_size)
    return cache


def iter_generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, token_budget: int = 16384, max_batch_size: int = 64,
                  stop: list[str] | None = None, max_prompt_tokens: int | None = None,
                  skip_batches: set[int] | frozenset = frozenset(), stats: GenerationStats | None = None,
                  progress=None, on_too_long: str = "skip", description: str = "generating",
                  share_prefix: bool = False,
                  **generate_kwargs: Any) -> Iterator[tuple[int, list[tuple[int, str | None]]]]:
    """Generate a completion for each (already chat-rendered) prompt, one planned batch at a time.

    Yields `(batch_index, [(prompt_index, text), ...])` per batch of `plan_batches`, in plan order, skipping
    the batch indices in `skip_batches`. Prompts longer than `max_prompt_tokens` (default: the model's
    context minus `max_new_tokens`) are skipped with text `None` (or, with `on_too_long="truncate"`, cut from
    the left); skipped prompts form one extra batch after the planned ones. Greedy when `temperature == 0`;
    otherwise sampling seeded per batch from `(seed, batch index, prompt indices)`. With `share_prefix`, the
    tokens a batch's prompts all begin with (a system prompt, few-shot demonstrations) are encoded once for the
    batch instead of once per prompt (see `_shared_prefix_cache`). Extra keyword arguments (e.g.
    `min_new_tokens`, `repetition_penalty`) go to `model.generate`.
    """
    import torch

    if on_too_long not in ("skip", "truncate"):
        raise UserError(f"generation: on_too_long must be 'skip' or 'truncate', got {on_too_long!r}")
    if max_new_tokens <= 0:
        raise UserError(f"generation: max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError(f"generation: need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    stats = stats if stats is not None else GenerationStats()
    started = time.perf_counter()
    stop = [s for s in (stop or []) if s]

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise UserError("generation: the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    eos_ids = eos_token_ids(model, tokenizer)
    if max_prompt_tokens is None:
        context = context_length(model)
        max_prompt_tokens = context - max_new_tokens if context else None
        if max_prompt_tokens is not None and max_prompt_tokens <= 0:
            raise UserError(f"generation: max_new_tokens ({max_new_tokens}) leaves no room for the prompt in the "
                            f"model's context of {context} tokens; lower max_new_tokens")

    # Tokenize every prompt once: chat-rendered text already carries its special tokens.
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    fallback_id = next(t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, pad_id, 0) if t is not None)
    ids: dict[int, list[int]] = {}
    too_long: list[int] = []
    truncated: set[int] = set()
    for i, tokens in enumerate(encoded):
        tokens = list(tokens) or [fallback_id]
        if max_prompt_tokens is not None and len(tokens) > max_prompt_tokens:
            if on_too_long == "skip":
                too_long.append(i)
                continue
            tokens = tokens[-max_prompt_tokens:]
            truncated.add(i)
        ids[i] = tokens
    kept = sorted(ids)
    plan = [[kept[j] for j in batch] for batch in
            plan_batches([len(ids[i]) for i in kept], token_budget=token_budget, max_batch_size=max_batch_size,
                         max_new_tokens=max_new_tokens)]
    if too_long:
        plan.append(list(too_long))
    skipped_batch_index = len(plan) - 1 if too_long else -1

    do_sample = temperature > 0
    gen_args: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id,
                                    eos_token_id=eos_ids or None, use_cache=True)
    if do_sample:
        gen_args.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    if stop:
        gen_args.update(stop_strings=list(stop), tokenizer=tokenizer)
    gen_args.update(generate_kwargs)
    eos_tensor = torch.tensor(eos_ids or [-1], dtype=torch.long)

    device = model_device(model)
    # A cap from an earlier OOM back-off in the same stage (shared stats) holds for this call too.
    cap = stats.batch_size_final if stats.oom_backoffs and stats.batch_size_final > 0 else None
    largest_run = 0

    task = None
    if progress is not None:
        done_before = sum(len(b) for bi, b in enumerate(plan) if bi in skip_batches)
        task = progress.add_task(description, total=len(prompts), completed=done_before, tokens_per_s=0.0)
    call_tokens = 0
    gen_seconds = 0.0

    def run_chunk(batch_index: int, chunk: list[int]) -> tuple[list[str], int]:
        nonlocal share_prefix
        shared = shared_prefix_length([ids[i] for i in chunk]) if share_prefix and len(chunk) > 1 else 0
        cache = None
        if shared >= MIN_SHARED_PREFIX:
            prefix = torch.tensor([ids[chunk[0]][:shared]], dtype=torch.long, device=device)
            cache = _shared_prefix_cache(model, prefix, len(chunk))
            share_prefix = cache is not None  # a model that cannot share once never will
        if cache is None:
            shared = 0
        width = shared + max(len(ids[i]) - shared for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        input_ids[:, :shared] = torch.tensor(ids[chunk[0]][:shared], dtype=torch.long)  # the shared prefix, then
        attention[:, :shared] = 1
        for row, i in enumerate(chunk):  # left padding before each prompt's own tokens
            n = len(ids[i]) - shared
            input_ids[row, width - n:] = torch.tensor(ids[i][shared:], dtype=torch.long)
            attention[row, width - n:] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        kwargs = dict(gen_args, past_key_values=cache) if cache is not None else gen_args
        if do_sample:
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(batch_seed(seed, batch_index, chunk))
                out = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        else:
            out = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        sequences = getattr(out, "sequences", out)
        new = sequences[:, width:].cpu()
        # tokens generated: up to and including the first eos; rows stopped otherwise (stop string) are
        # filled with pad after their end, so their trailing pad run does not count
        is_eos = torch.isin(new, eos_tensor).int()
        after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
        trailing_pad = (new == pad_id).flip(1).int().cumprod(dim=1).sum(dim=1)
        n_tokens = int(torch.where(is_eos.any(dim=1), (~after_eos).sum(dim=1), new.shape[1] - trailing_pad).sum())
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        if stop:
            texts = [cut_at_stop(t, stop) for t in texts]
        return [t.strip() for t in texts], n_tokens

    was_training = bool(getattr(model, "training", False))
    if was_training and hasattr(model, "eval"):
        model.eval()
    try:
        for batch_index, batch in enumerate(plan):
            if batch_index in skip_batches:
                continue
            t0 = time.perf_counter()
            if batch_index == skipped_batch_index:
                results: list[tuple[int, str | None]] = [(i, None) for i in batch]
                stats.skipped_too_long += len(batch)
                batch_tokens = 0
            else:
                texts: dict[int, str] = {}
                batch_tokens = 0
                pending = list(batch)
                while pending:
                    size = min(len(pending), cap) if cap else len(pending)
                    chunk = pending[:size]
                    oom = False
                    try:
                        with torch.inference_mode():
                            chunk_texts, n = run_chunk(batch_index, chunk)
                    except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                        if not is_oom(exc):
                            raise
                        if size == 1:
                            raise UserError("generation ran out of GPU memory with a batch of one prompt "
                                            f"({len(ids[chunk[0]])} tokens + {max_new_tokens} new); lower "
                                            "max_new_tokens or the prompt length, or use a smaller model") from exc
                        oom = True
                    if oom:  # outside the except block, so the traceback's tensors are freed first
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        cap = max(1, size // 2)
                        stats.oom_backoffs += 1
                        continue
                    largest_run = max(largest_run, size)
                    texts.update(zip(chunk, chunk_texts))
                    batch_tokens += n
                    pending = pending[size:]
                results = [(i, texts[i]) for i in batch]
                stats.generated += len(batch)
                stats.truncated += sum(1 for i in batch if i in truncated)
            stats.requested += len(batch)
            stats.new_tokens += batch_tokens
            stats.batch_size_final = cap if cap else max(stats.batch_size_final, largest_run)
            elapsed = time.perf_counter() - t0
            call_tokens += batch_tokens
            gen_seconds += elapsed
            if task is not None:
                progress.update(task, advance=len(batch),
                                tokens_per_s=call_tokens / gen_seconds if gen_seconds > 0 else 0.0)
            stats.seconds += time.perf_counter() - started
            started = time.perf_counter()
            yield batch_index, results
            started = time.perf_counter()  # time spent by the consumer is not generation time
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


def generate(model, tokenizer, prompts: list[str], **kw) -> list[str | None]:
    """Convenience wrapper: run `iter_generate` and return the texts in input order.

    Prompts that were skipped (too long, or in a batch listed in `skip_batches`) come back as `None`.
    """
    out: list[str | None] = [None] * len(prompts)
    for _, results in iter_generate(model, tokenizer, prompts, **kw):
        for i, text in results:
            out[i] = text
    return out
