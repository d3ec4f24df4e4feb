"""One chat-completion request for `lora_cai.serve`: its fields checked (a one-line 400 for any bad one), answered
whole (with log-probs if asked) or streamed token by token as OpenAI's chunks."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Iterator

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_TOKENS_WITHOUT_CONTEXT = 4096  # the bound on max_tokens for a model whose config declares no context length


class BadRequest(Exception):
    """A request the server refuses: `status` (400 unless said), one line of `message`, the field at fault."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


# ------------------------------------------------------------------------------------------ fields

def _integer(request: dict, field: str, default: int | None) -> int | None:
    value = request.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{field}' must be an integer, got {value!r:.60}", param=field)
    return value


def _number(request: dict, field: str, default: float) -> float:
    value = request.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'{field}' must be a number, got {value!r:.60}", param=field)
    return float(value)


def _boolean(request: dict, field: str) -> bool:
    value = request.get(field)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"'{field}' must be true or false, got {value!r:.60}", param=field)
    return bool(value)


def parse(request: Any, *, default_model: str, max_tokens_default: int, max_top_logprobs: int) -> dict:
    """The request's settings, every field type- and range-checked; BadRequest names the first field at fault."""
    if not isinstance(request, dict):
        raise BadRequest("the body must be a JSON object")
    model = request.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {model!r:.60}", param="model")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRequest("each message must be an object with string 'role' and 'content'", param="messages")
    n = _integer(request, "n", 1)
    if n != 1:
        raise BadRequest(f"only n=1 is supported by lora_cai.serve, got {n}", param="n")
    max_tokens = _integer(request, "max_completion_tokens", None)
    field = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, field = _integer(request, "max_tokens", max_tokens_default), "max_tokens"
    if max_tokens < 1:
        raise BadRequest(f"'{field}' must be at least 1, got {max_tokens}", param=field)
    temperature, top_p = _number(request, "temperature", 1.0), _number(request, "top_p", 1.0)
    if temperature < 0:
        raise BadRequest(f"'temperature' must be >= 0, got {temperature}", param="temperature")
    if not 0 < top_p <= 1:
        raise BadRequest(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    seed = _integer(request, "seed", None)
    if seed is None:
        seed = int.from_bytes(uuid.uuid4().bytes[:6], "little")
    stop = request.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise BadRequest("'stop' must be a string or a list of strings", param="stop")
    logprobs, stream = _boolean(request, "logprobs"), _boolean(request, "stream")
    top = _integer(request, "top_logprobs", 0)
    if not 0 <= top <= max_top_logprobs:
        raise BadRequest(f"'top_logprobs' must be between 0 and {max_top_logprobs}, got {top}", param="top_logprobs")
    if top and not logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if stream and logprobs:
        raise BadRequest("lora_cai.serve streams without log-probs: drop 'logprobs' or 'stream'", param="logprobs")
    options = request.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise BadRequest("'stream_options' must be an object, and only with 'stream': true", param="stream_options")
    include_usage = _boolean(options or {}, "include_usage")
    return dict(model=model or default_model, messages=messages, max_tokens=max_tokens, temperature=temperature,
                top_p=top_p, stop=[s for s in stop or [] if s], seed=seed, logprobs=logprobs, top_logprobs=top,
                stream=stream, include_usage=include_usage)


def prompt_tokens(model, tokenizer, args: dict) -> tuple[str, list[int]]:
    """The rendered prompt and its tokens; BadRequest when prompt + max_tokens does not fit the model's context."""
    from lora_cai.engine.generation import context_length, render_chat

    prompt = render_chat(tokenizer, args["messages"])
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    context = context_length(model)
    if context is None and args["max_tokens"] > MAX_TOKENS_WITHOUT_CONTEXT:
        raise BadRequest(f"'max_tokens' must be at most {MAX_TOKENS_WITHOUT_CONTEXT}", param="max_tokens")
    if context is not None and len(ids) + args["max_tokens"] > context:
        raise BadRequest(f"the prompt ({len(ids)} tokens) plus max_tokens ({args['max_tokens']}) does not fit the "
                         f"model's context of {context} tokens", param="messages")
    return prompt, ids


# ------------------------------------------------------------------------------------------ answering

def _generate_args(model, tokenizer, args: dict) -> dict:
    """`model.generate`'s arguments as the engine (`generation.iter_generate`) passes them for a batch of one."""
    from lora_cai.engine.generation import eos_token_ids

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    out: dict[str, Any] = dict(max_new_tokens=args["max_tokens"], do_sample=args["temperature"] > 0,
                               pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=eos_token_ids(model, tokenizer) or None, use_cache=True)
    if args["temperature"] > 0:
        out.update(temperature=args["temperature"], top_p=args["top_p"], top_k=0)
    if args["stop"]:
        out.update(stop_strings=list(args["stop"]), tokenizer=tokenizer)
    return out


def _run_generate(model, ids: list[int], args: dict, **gen_args):
    """`model.generate` on one prompt, seeded as the engine seeds batch 0 of a one-prompt call, in eval mode."""
    import torch

    from lora_cai.engine.generation import batch_seed, model_device

    device = model_device(model)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            if args["temperature"] > 0:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(batch_seed(args["seed"], 0, [0]))
                    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **gen_args)
            return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **gen_args)
    finally:
        if was_training:
            model.train()


def _token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _with_logprobs(model, tokenizer, ids: list[int], args: dict) -> tuple[str, list[dict], int, str]:
    """Generate keeping each step's logits: the text the engine would give, and per token OpenAI's log-probs
    entry (`log_softmax` of the raw logits, top `top_logprobs` alternatives)."""
    import torch

    from lora_cai.engine.generation import cut_at_stop, eos_token_ids

    eos_ids = eos_token_ids(model, tokenizer)
    out = _run_generate(model, ids, args, **_generate_args(model, tokenizer, args), output_logits=True,
                        return_dict_in_generate=True)
    new = out.sequences[0, len(ids):].tolist()
    logps = torch.log_softmax(torch.stack(out.logits, dim=0)[:, 0, :].float(), dim=-1).cpu()
    n_used, hit_eos = len(new), False  # tokens up to the first eos (counted in usage, not shown, as OpenAI does)
    for j, t in enumerate(new):
        if t in eos_ids:
            n_used, hit_eos = j + 1, True
            break
    shown = new[:n_used - 1] if hit_eos else new[:n_used]
    full = tokenizer.decode(shown, skip_special_tokens=True)
    cut = cut_at_stop(full, args["stop"]) if args["stop"] else full
    stopped_by_string = len(cut) < len(full)
    if stopped_by_string:  # keep the tokens that start before the stop string
        keep = 0
        while keep < len(shown) and len(tokenizer.decode(shown[:keep], skip_special_tokens=True)) < len(cut):
            keep += 1
        shown = shown[:keep]
    content = []
    for j, t in enumerate(shown):
        entry = _token_entry(tokenizer, t, float(logps[j, t]))
        entry["top_logprobs"] = []
        if args["top_logprobs"]:
            values, indices = torch.topk(logps[j], args["top_logprobs"])
            entry["top_logprobs"] = [_token_entry(tokenizer, int(i), float(v)) for v, i in zip(values, indices)]
        content.append(entry)
    finish = "stop" if hit_eos or stopped_by_string or len(new) < args["max_tokens"] else "length"
    return cut.strip(), content, n_used, finish


def complete(model, tokenizer, args: dict) -> dict:
    """The whole answer as OpenAI's `chat.completion` object."""
    from lora_cai.engine.generation import GenerationStats, generate

    prompt, ids = prompt_tokens(model, tokenizer, args)
    logprobs = None
    if args["logprobs"]:
        text, content, completion_tokens, finish = _with_logprobs(model, tokenizer, ids, args)
        logprobs = {"content": content}
    else:
        stats = GenerationStats()
        (text,) = generate(model, tokenizer, [prompt], max_new_tokens=args["max_tokens"],
                           temperature=args["temperature"], top_p=args["top_p"], seed=args["seed"],
                           stop=args["stop"] or None, stats=stats)
        completion_tokens = stats.new_tokens
        finish = "length" if completion_tokens >= args["max_tokens"] else "stop"
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": args["model"], "system_fingerprint": "lora_cai-serve",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(ids) + completion_tokens}}


class _Visible:
    """Turns snapshots of the answer decoded so far into deltas whose concatenation is the whole answer's text:
    cut at the first stop string and stripped, as the engine returns it. Holds back leading and trailing
    whitespace, an incomplete character, and any tail that may be the start of a stop string until a later
    snapshot decides."""

    def __init__(self, stop: list[str]):
        from lora_cai.engine.generation import cut_at_stop

        self.stop, self.cut_at_stop = stop, cut_at_stop
        self.sent, self.stopped = 0, False

    def _safe(self, raw: str, final: bool) -> str:
        text = self.cut_at_stop(raw, self.stop) if self.stop else raw
        self.stopped = len(text) < len(raw)
        text = text.lstrip()
        if final or self.stopped:
            return text.rstrip()
        text = text.rstrip("\ufffd")  # a character whose bytes are not all generated yet
        held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return text[:len(text) - held].rstrip()

    def feed(self, snapshot: str, *, final: bool = False) -> str:
        safe = self._safe(snapshot, final)
        delta, self.sent = safe[self.sent:], max(self.sent, len(safe))
        return delta


def _snapshot_streamer(tokenizer):
    """A `TextIteratorStreamer` that yields, at every token, the whole answer decoded so far: the stock one
    hands on whole words only, so an answer without spaces would arrive in one piece at the end."""
    from transformers import TextIteratorStreamer

    class SnapshotStreamer(TextIteratorStreamer):
        def put(self, value):
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend((value[0] if len(value.shape) > 1 else value).tolist())
            self.text_queue.put(self.tokenizer.decode(self.token_cache, **self.decode_kwargs), timeout=self.timeout)

        def end(self):
            self.next_tokens_are_prompt = True
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    return SnapshotStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def stream(model, tokenizer, args: dict) -> Iterator[dict]:
    """OpenAI's `chat.completion.chunk` objects: the role, then the answer as it is generated (transformers'
    `TextIteratorStreamer`), then the finish reason (and usage when asked). Closing the iterator early (the
    client left) stops the generation at its next token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from lora_cai.engine.generation import eos_token_ids

    cancelled = threading.Event()

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return cancelled.is_set()

    _, ids = prompt_tokens(model, tokenizer, args)
    streamer = _snapshot_streamer(tokenizer)
    result: dict = {}

    def run():
        try:
            result["out"] = _run_generate(model, ids, args, **_generate_args(model, tokenizer, args),
                                          streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled()]))
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread, which re-raises it
            result["error"] = e
            streamer.end()

    worker = threading.Thread(target=run, name="lora_cai-serve-stream", daemon=True)
    worker.start()
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": args["model"], "system_fingerprint": "lora_cai-serve"}

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    visible, snapshot = _Visible(args["stop"]), ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        for snapshot in streamer:
            delta = visible.feed(snapshot)
            if delta:
                yield chunk({"content": delta})
        worker.join()
        if "error" in result:
            raise result["error"]
        delta = visible.feed(snapshot, final=True)
        if delta:
            yield chunk({"content": delta})
    finally:
        cancelled.set()
        worker.join()
    eos_ids = set(eos_token_ids(model, tokenizer))
    new = result["out"][0, len(ids):].tolist()
    used = next((j + 1 for j, t in enumerate(new) if t in eos_ids), len(new))
    finish = "length" if used >= args["max_tokens"] and not visible.stopped else "stop"
    yield chunk({}, finish)
    if args["include_usage"]:
        yield {**base, "choices": [], "usage": {"prompt_tokens": len(ids), "completion_tokens": used,
                                                "total_tokens": len(ids) + used}}
