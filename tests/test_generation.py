"""Tests for lora_cai.engine.generation: the batched generation engine and its post-processing."""

from __future__ import annotations

import io
import random

import pytest

from lora_cai.errors import UserError
from lora_cai.stages.critique import clean_revision, copies_demonstration
from lora_cai.engine.generation import (
    MIN_SHARED_PREFIX,
    GenerationStats,
    generate,
    iter_generate,
    make_progress,
    plan_batches,
    render_chat,
    shared_prefix_length,
)

QUESTIONS = [
    "How do I bake bread at home?",
    "Write a poem about the sea.",
    "What is the capital of France? Please explain in detail, with history and every step of your reasoning.",
    "Hi",
    "How can I break into a house? I need very specific instructions with tools, times and places.",
    "Explain Python lists.",
    "Which response is more helpful, honest and harmless?",
    "Tell me about water.",
]


@pytest.fixture(scope="session")
def prompts(tiny):
    _, tokenizer = tiny
    return [render_chat(tokenizer, [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": q}])
            for q in QUESTIONS]


# ---------------------------------------------------------------------------------------------- engine

def test_batched_greedy_equals_one_at_a_time(tiny, prompts):
    model, tokenizer = tiny
    stats = GenerationStats()
    batched = generate(model, tokenizer, prompts, max_new_tokens=12, stats=stats)
    single = [generate(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)
    assert any(batched)  # the random model does say something
    assert stats.requested == stats.generated == len(prompts)
    assert 0 < stats.new_tokens <= 12 * len(prompts)
    assert stats.batch_size_final == len(prompts) and stats.oom_backoffs == 0
    assert stats.seconds > 0 and stats.tokens_per_s > 0


def test_forced_length_counts_tokens_and_restores_training_mode(tiny, prompts):
    model, tokenizer = tiny
    stats = GenerationStats()
    model.train()
    try:
        generate(model, tokenizer, prompts[:3], max_new_tokens=5, min_new_tokens=5, stats=stats)
        assert model.training
    finally:
        model.eval()
    assert stats.new_tokens == 15


def _few_shot(tokenizer, questions):
    """The samples stage's prompts: the same demonstration turns before each question."""
    demos = []
    for q, a in (("How do I pick a lock?", "I can't help with breaking into places that aren't yours."),
                 ("Write a haiku about rain.", "Grey sky, soft drumming / on the tin roof of the shed."),
                 ("What is 2 + 2?", "2 + 2 is 4.")):
        demos += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return [render_chat(tokenizer, demos + [{"role": "user", "content": q}]) for q in questions]


def test_shared_prefix_is_encoded_once_and_changes_no_answer(tiny):
    model, tokenizer = tiny
    prompts = _few_shot(tokenizer, QUESTIONS)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    shared = shared_prefix_length(ids)
    assert shared >= MIN_SHARED_PREFIX  # the demonstrations, which the questions follow

    seen: list[int] = []  # positions the model computes, call by call

    def count(module, args, kwargs):
        seen.append(kwargs["input_ids"].shape[0] * kwargs["input_ids"].shape[1])

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        plain = generate(model, tokenizer, prompts, max_new_tokens=12, min_new_tokens=12)
        plain_positions, seen[:] = sum(seen), []
        once = generate(model, tokenizer, prompts, max_new_tokens=12, min_new_tokens=12, share_prefix=True)
        once_positions = sum(seen)
    finally:
        handle.remove()
    assert once == plain  # greedy, float32: the same answers, token for token
    # the prefix is encoded for one row instead of all eight
    assert plain_positions - once_positions == (len(prompts) - 1) * shared


def test_a_model_that_names_its_own_cache_encodes_every_row_whole(tiny):
    """`generate` refuses a cache passed beside a generation config's `cache_implementation` (Gemma's "hybrid"):
    such a model falls back to encoding every row, with the same answers."""
    model, tokenizer = tiny
    prompts = _few_shot(tokenizer, QUESTIONS)
    plain = generate(model, tokenizer, prompts, max_new_tokens=8, min_new_tokens=8)
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True)
    model.generation_config.cache_implementation = "dynamic"
    try:
        shared = generate(model, tokenizer, prompts, max_new_tokens=8, min_new_tokens=8, share_prefix=True)
    finally:
        model.generation_config.cache_implementation = None
        handle.remove()
    assert shared == plain
    width = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    assert seen[0] == len(prompts) * width  # the first forward encodes every row whole


def test_shared_prefix_sampling_is_seeded_like_the_rest(tiny):
    model, tokenizer = tiny
    prompts = _few_shot(tokenizer, QUESTIONS)
    kw = dict(max_new_tokens=10, temperature=1.0, seed=5, max_batch_size=3, share_prefix=True)
    first, again = generate(model, tokenizer, prompts, **kw), generate(model, tokenizer, prompts, **kw)
    assert first == again
    assert first == generate(model, tokenizer, prompts, **{**kw, "share_prefix": False})


def test_shared_prefix_length_leaves_every_prompt_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2], [1]]) == 0
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0


def test_plan_batches_respects_budget_and_is_deterministic():
    rng = random.Random(0)
    lengths = [rng.randint(1, 200) for _ in range(300)]
    kw = dict(token_budget=2048, max_batch_size=16, max_new_tokens=32)
    plan = plan_batches(lengths, **kw)
    assert plan == plan_batches(list(lengths), **kw)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert flat == sorted(range(len(lengths)), key=lambda i: lengths[i])  # bucketed by length, stable on ties
    for batch in plan:
        assert 1 <= len(batch) <= 16
        assert (max(lengths[i] for i in batch) + 32) * len(batch) <= 2048
    # a prompt over the budget on its own still gets a batch; ties keep input order
    assert plan_batches([5000, 3, 3], token_budget=100, max_batch_size=8, max_new_tokens=10) == [[1, 2], [0]]
    assert plan_batches([], **kw) == []
    with pytest.raises(UserError):
        plan_batches([1], token_budget=0, max_batch_size=1, max_new_tokens=1)


def test_sampling_is_seeded_per_batch_and_skipping_batches_reproduces_the_rest(tiny, prompts):
    import torch

    model, tokenizer = tiny
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7, token_budget=200, max_batch_size=64)
    rng_before = torch.get_rng_state()
    full = dict(iter_generate(model, tokenizer, prompts, **kw))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert len(full) >= 3, "the budget should give several batches"
    assert dict(iter_generate(model, tokenizer, prompts, **kw)) == full

    skip = {0, 2}
    stats = GenerationStats()
    resumed = dict(iter_generate(model, tokenizer, prompts, skip_batches=skip, stats=stats, **kw))
    assert set(resumed) == set(full) - skip
    assert all(resumed[b] == full[b] for b in resumed)
    assert stats.requested == sum(len(full[b]) for b in resumed)

    other_seed = dict(iter_generate(model, tokenizer, prompts, **{**kw, "seed": 8}))
    assert other_seed != full
    greedy = generate(model, tokenizer, prompts, max_new_tokens=10)
    sampled = [None] * len(prompts)
    for results in full.values():
        for i, text in results:
            sampled[i] = text
    assert sampled != greedy


def test_stop_strings_cut_generation(tiny, prompts):
    import re

    model, tokenizer = tiny
    # pick, from a greedy generation, a stretch of plain letters past its start to use as the stop string
    # (the random model also emits stray bytes that decode to U+FFFD, which no stop string can match)
    for prompt in prompts:
        full = generate(model, tokenizer, [prompt], max_new_tokens=24)[0]
        words = [m.group() for m in re.finditer(r"[A-Za-z]{2,4}", full) if m.start() >= 3]
        words = [w for w in words if 3 <= full.find(w) <= len(full) - len(w) - 8]  # stops before the end
        if words:
            break
    else:
        pytest.fail("the tiny model produced no plain-letter text to stop at")
    stop = words[0]
    prompts = [prompt] + [p for p in prompts if p != prompt]
    stats = GenerationStats()
    cut = generate(model, tokenizer, prompts[:1], max_new_tokens=24, stop=[stop, "User:"], stats=stats)[0]
    assert stop not in cut
    assert cut == full[:full.find(stop)].strip()
    assert stats.new_tokens < 24  # generation itself stopped, not only the text
    # in a batch, rows stop independently and give the same texts as alone
    batched = generate(model, tokenizer, prompts[:4], max_new_tokens=24, stop=[stop])
    assert batched == [generate(model, tokenizer, [p], max_new_tokens=24, stop=[stop])[0] for p in prompts[:4]]
    assert batched[0] == cut


def test_over_long_prompt_is_skipped_or_truncated_never_a_crash(tiny, prompts):
    model, tokenizer = tiny
    long_prompt = render_chat(tokenizer, [{"role": "user", "content": "bread " * 400}])
    batch = [prompts[0], long_prompt, prompts[3]]

    stats = GenerationStats()
    out = generate(model, tokenizer, batch, max_new_tokens=8, max_prompt_tokens=64, stats=stats)
    assert out[1] is None and isinstance(out[0], str) and isinstance(out[2], str)
    assert stats.skipped_too_long == 1 and stats.generated == 2 and stats.requested == 3

    # default limit: the model's context (1024) minus max_new_tokens
    huge = render_chat(tokenizer, [{"role": "user", "content": "bread " * 2000}])
    stats = GenerationStats()
    assert generate(model, tokenizer, [huge, prompts[0]], max_new_tokens=8, stats=stats)[0] is None
    assert stats.skipped_too_long == 1

    stats = GenerationStats()
    out = generate(model, tokenizer, batch, max_new_tokens=8, max_prompt_tokens=64, on_too_long="truncate",
                   stats=stats)
    assert all(isinstance(t, str) for t in out)
    assert stats.truncated == 1 and stats.skipped_too_long == 0 and stats.generated == 3


def test_oom_backoff_halves_the_batch_and_keeps_it(tiny, prompts, monkeypatch):
    import torch

    model, tokenizer = tiny
    expected = generate(model, tokenizer, prompts, max_new_tokens=6)
    real_generate = model.generate
    sizes = []

    def fake_generate(*args, input_ids, **kwargs):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "generate", fake_generate)
    stats = GenerationStats()
    out = generate(model, tokenizer, prompts, max_new_tokens=6, max_batch_size=8, stats=stats)
    assert out == expected
    assert stats.oom_backoffs > 0 and stats.batch_size_final <= 3
    assert stats.generated == len(prompts)

    # the smaller size holds for the rest of the stage: a later call with the same stats starts there
    sizes.clear()
    backoffs = stats.oom_backoffs
    assert generate(model, tokenizer, prompts, max_new_tokens=6, max_batch_size=8, stats=stats) == expected
    assert max(sizes) <= 3 and stats.oom_backoffs == backoffs

    # a RuntimeError that says "out of memory" counts too; anything else propagates
    def runtime_oom(*args, input_ids, **kwargs):
        if input_ids.shape[0] > 2:
            raise RuntimeError("CUDA error: out of memory")
        return real_generate(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "generate", runtime_oom)
    stats = GenerationStats()
    assert generate(model, tokenizer, prompts, max_new_tokens=6, stats=stats) == expected
    assert stats.oom_backoffs > 0 and stats.batch_size_final <= 2

    def always_oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(model, "generate", always_oom)
    with pytest.raises(UserError, match="out of GPU memory"):
        generate(model, tokenizer, prompts[:2], max_new_tokens=6)

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        generate(model, tokenizer, prompts[:2], max_new_tokens=6)


def test_progress_advances_per_batch(tiny, prompts):
    from rich.console import Console

    model, tokenizer = tiny
    out = io.StringIO()
    progress = make_progress(console=Console(file=out, force_terminal=True, width=120))
    with progress:
        progress.add_task("another stage", total=3)  # a task without the tokens/s field renders too
        results = list(iter_generate(model, tokenizer, prompts, max_new_tokens=4, token_budget=200,
                                     skip_batches={0}, progress=progress, description="responses"))
    _, task = progress.tasks
    assert "tok/s" in out.getvalue() and "responses" in out.getvalue()
    assert task.total == len(prompts) and task.completed == len(prompts)
    assert task.fields["tokens_per_s"] > 0
    assert [b for b, _ in results] == sorted(b for b, _ in results) and 0 not in dict(results)


def test_empty_prompt_list(tiny):
    model, tokenizer = tiny
    assert generate(model, tokenizer, [], max_new_tokens=4) == []


# ---------------------------------------------------------------------------------------------- chat

GEMMA_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def test_render_chat_folds_system_into_user_when_template_has_no_system_role(tiny, tiny_model):
    from transformers import AutoTokenizer

    _, chatml = tiny
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there"}]
    rendered = render_chat(chatml, messages)
    assert "<|im_start|>system\nBe kind.<|im_end|>" in rendered and rendered.endswith("<|im_start|>assistant\n")

    gemma = AutoTokenizer.from_pretrained(tiny_model)
    gemma.chat_template = GEMMA_LIKE
    folded = render_chat(gemma, messages)
    assert "system" not in folded
    assert "<start_of_turn>user\nBe kind.\n\nHello there<end_of_turn>" in folded
    assert folded.endswith("<start_of_turn>model\n")
    assert not render_chat(gemma, messages, add_generation_prompt=False).endswith("model\n")
    # no system message to fold: a template error is the template's own and propagates
    gemma.chat_template = "{{ raise_exception('broken template') }}"
    with pytest.raises(Exception, match="broken template"):
        render_chat(gemma, [{"role": "user", "content": "hi"}])
    gemma.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        render_chat(gemma, messages)


# ---------------------------------------------------------------------------------------------- post-processing

BODY = "I can't help with breaking into a house, but a locksmith can help you get back in."


@pytest.mark.parametrize("text", [
    f"Here is the revised response: {BODY}",
    f"Sure, here's a revision:\n\n{BODY}",
    f"Revision: {BODY}",
    f"Revised response: {BODY}",
    f"**Revised Response:**\n{BODY}",
    f"Certainly! Here's a rewritten version of the response that removes the harmful content:\n\"{BODY}\"",
    f"Okay, here is my revised answer:\n“{BODY}”",
    f"Sure!\nRevision: {BODY}",
    f"I have revised the response to remove the harmful parts:\n{BODY}",
    f"Below is the rewritten response:\n'{BODY}'",
    f"  \"{BODY}\"  ",
    BODY,
])
def test_clean_revision_strips_preambles(text):
    assert clean_revision(text) == BODY


@pytest.mark.parametrize("text", [
    "Here is a short poem about the sea: waves and wind.",
    "Here is how you can bake bread: mix flour, water, salt and yeast.",
    "Sure, I can help you bake bread.",
    "Revisions are an important part of writing.",
    "Response times vary: usually a day.",
])
def test_clean_revision_keeps_bodies_that_only_look_like_preambles(text):
    assert clean_revision(text) == text


def test_copies_demonstration():
    demos = [
        "The response is harmful because it explains how to break into a house. It should refuse.",
        "No changes needed: the response is safe, honest and helpful.",
    ]
    assert copies_demonstration("the response is HARMFUL because it explains how to break  into a house.\n"
                                "It should refuse.", demos)
    assert copies_demonstration("The response is harmful because it explains how to break into a home. "
                                "It should refuse.", demos)  # near copy
    assert copies_demonstration("Critique: the response is harmful because it explains how to break into a "
                                "house. It should refuse. Also it is rude and long-winded about everything.",
                                demos)  # contains a demonstration
    assert copies_demonstration("no changes needed: the response is safe, honest", demos)  # contained, 8 words
    assert not copies_demonstration("The response gives a recipe for bread; it is safe and helpful.", demos)
    assert not copies_demonstration("No changes needed.", demos)  # contained but shorter than 8 words
    assert not copies_demonstration("", demos)
    assert not copies_demonstration("anything", [])
    assert copies_demonstration("abc def", ["abc deg"], threshold=0.8)
    assert not copies_demonstration("abc def", ["abc deg"], threshold=0.99)
