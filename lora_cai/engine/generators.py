"""Where generation runs: the local batched engine or an OpenAI-compatible server, behind one iterator.

Both yield `(batch_index, [(conversation_index, text or None), ...])` over a deterministic batch plan and
skip the batches a resumed stage already committed, so the stages do not care which one they drive. vLLM as the
engine (`generation.engine: vllm`) is a third, `engine.vllm.VLLMGenerator`: an `APIGenerator` (batches, seeds,
counted failures) that sends lora_cai's own prompt tokens and decodes the answers as the local engine does.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

from lora_cai.engine.generation import GenerationStats, iter_generate, render_chat


class _Generator:
    def pin(self, stage) -> "_Generator":
        """Cut work into the batches `stage` (a `store.JsonlStage`) was first cut into; the local engine's plan
        comes from declared settings already, so only a server's batch size needs pinning."""
        return self

    def generate(self, conversations: list[list[dict]], **kw) -> list[str | None]:
        """All texts in input order (None where a prompt was too long or a request failed)."""
        out: list[str | None] = [None] * len(conversations)
        for _, items in self.iter(conversations, **kw):
            for i, text in items:
                out[i] = text
        return out


class LocalGenerator(_Generator):
    """The batched engine on the in-process model (the policy being trained).

    `share_prefix`: encode a batch's common prompt prefix once (`generation.iter_generate`). Only for stock
    transformers generation: Unsloth's fast decoding on a GPU keeps its own cache layout, untested here with
    a cache passed in, so its backend leaves this off.
    """

    def __init__(self, model, tokenizer, *, token_budget: int, max_batch_size: int, share_prefix: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.token_budget, self.max_batch_size = token_budget, max_batch_size
        self.share_prefix = share_prefix

    def iter(self, conversations: list[list[dict]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, skip_batches=frozenset(), stats: GenerationStats | None = None,
             progress=None, description: str = "generating") -> Iterator[tuple[int, list[tuple[int, str | None]]]]:
        prompts = [render_chat(self.tokenizer, c) for c in conversations]
        yield from iter_generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, seed=seed, token_budget=self.token_budget,
                                 max_batch_size=self.max_batch_size, skip_batches=skip_batches, stats=stats,
                                 progress=progress, description=description, share_prefix=self.share_prefix)


class APIGenerator(_Generator):
    """An OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, `python -m lora_cai.serve`).

    Batches are consecutive slices of `batch_size` requests, sent with the client's concurrency limit;
    each request carries its own seed derived from (seed, index), so sampled answers do not depend on
    batching, and the client's disk cache makes a rerun pay nothing twice.
    """

    def __init__(self, client, *, batch_size: int = 32):
        from lora_cai.engine.calls import Calls

        self.client, self.batch_size = client, batch_size
        self.calls = Calls()  # every request sent, and the ones that failed for good
        self.errors: dict[int, str] = {}  # the last batch's failed requests: conversation index -> error

    def pin(self, stage) -> "APIGenerator":
        self.batch_size = stage.pinned("batch_size", self.batch_size)
        return self

    def iter(self, conversations: list[list[dict]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, skip_batches=frozenset(), stats: GenerationStats | None = None,
             progress=None, description: str = "generating") -> Iterator[tuple[int, list[tuple[int, str | None]]]]:
        import time

        task = None
        if progress is not None:
            task = progress.add_task(description, total=len(conversations), tokens_per_s=0.0)
        for b, idx in _request_batches(len(conversations), self.batch_size, skip_batches, progress, task):
            t = time.perf_counter()
            answers = self.client.chat_many([
                {"messages": conversations[i], "max_tokens": max_new_tokens, "temperature": temperature,
                 "top_p": top_p, "seed": _request_seed(seed, i)} for i in idx])
            self.calls.count(answers)
            self.errors = {i: a.get("error") or "no answer" for i, a in zip(idx, answers) if a.get("text") is None}
            if stats is not None:
                stats.requested += len(idx)
                stats.generated += sum(a.get("text") is not None for a in answers)
                stats.seconds += time.perf_counter() - t
            if task is not None:
                progress.advance(task, len(idx))
            yield b, [(i, a.get("text")) for i, a in zip(idx, answers)]


def _request_batches(n: int, batch_size: int, skip_batches, progress, task) -> Iterator[tuple[int, list[int]]]:
    """(batch number, conversation indices) of the batches of `n` conversations a server generator sends: those in
    `skip_batches` (committed by an earlier run) only advance the progress bar's `task`."""
    for b, start in enumerate(range(0, n, batch_size)):
        idx = list(range(start, min(start + batch_size, n)))
        if b in skip_batches:
            if task is not None:
                progress.advance(task, len(idx))
            continue
        yield b, idx


def _request_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "little")
