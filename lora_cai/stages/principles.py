"""Per-principle effects of round k against the base (round-k/principles.json), off by default (`eval.per_principle`).

For every held-out prompt whose round-k answer differs from the base's, and for every principle of the
constitution, the principle's own comparative judge question is asked about the two stored answers (the eval's
and the baseline eval's: nothing is generated), in both orders, and read from the option tokens' log-probs as
everywhere else (`engine.judges`). Identical answers are ties (0.5) without a forward. The result per principle
is a win rate against the base with the totals' paired 95 % interval and Holm's flag (`cai.effects`).

Cost: one forward per (answer, principle, order), 17 x 80 x 2 = 2,720 with the default constitution and 40 + 40
held-out prompts. The question comes after the two answers here, so the 17 questions of one (answer, order)
share everything before them: that prefix is encoded once and its key/value cache repeated for the 17 rows, as
generation shares a few-shot prefix (`engine.generation._shared_prefix_cache`); a model whose cache cannot be
shared that way is scored whole. `benchmarks/bench_principles.py` measures both on one workload.

The judge: a `self` judge is the base model itself (the loaded policy with its adapters disabled), so every
round's column is read by one judge; a teacher or a server as configured; with `judge.kind: rule`, each
principle is judged by the rules that name it (`principle:` in the rule file, `enforce: false` rules included)
and principles no rule names are not measured.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from lora_cai.core.inputs import EVAL_USES, JUDGE, Decl, If, judge_is
from lora_cai.core.layout import BASELINE_EVAL
from lora_cai.core.stage import Stage
from lora_cai.engine.judges import ANSWER_INSTRUCTION

PRINCIPLES_FILE = "principles.json"


def principle_messages(question: str, prompt: str, first: str, second: str) -> list[dict]:
    """The comparison of two answers by one principle's question, asked after the answers (so the questions of one
    pair of answers share the prompt's prefix)."""
    return [{"role": "user", "content":
             f"Consider this conversation between a human and an assistant.\n\nHuman: {prompt}\n\n(A) {first}\n\n"
             f"(B) {second}\n\n{question}\n\n{ANSWER_INSTRUCTION}"}]


@dataclass
class Pair:
    """A held-out prompt's answer of round k and the base's."""

    set: str
    id: str
    prompt: str
    answer: str
    base: str
    labels: dict | None = None

    @property
    def key(self) -> str:
        return f"{self.set}:{self.id}"


def pairs_of(current: list[dict], base: list[dict], labels: dict | None = None) -> tuple[list[Pair], list[Pair]]:
    """(the pairs to judge, the pairs whose answers are identical) over the prompts both answered."""
    before = {(s["set"], s["id"]): s["answer"] for s in base}
    changed, same = [], []
    for s in current:
        b = before.get((s["set"], s["id"]))
        if not s.get("answer") or not b:
            continue
        p = Pair(s["set"], s["id"], s["prompt"], s["answer"], b, (labels or {}).get((s["set"], s["id"])))
        (same if s["answer"].strip() == b.strip() else changed).append(p)
    return changed, same


def size(n_principles: int, n_answers: int) -> dict:
    """The stage's work for `n_answers` held-out answers: forwards, and the prefixes shared among them."""
    return {"principles": n_principles, "answers": n_answers, "orders": 2,
            "forwards": n_principles * n_answers * 2, "shared_prefixes": 2 * n_answers}


def dry_run_line(data) -> str:
    """What `--dry-run` says of the stage: its forwards per round for the loaded constitution and held-out sets
    (at most: an answer identical to the base's costs none)."""
    n_answers = sum(len(v) for v in data.eval_sets.values())
    if data.rules is not None:
        named = [p.name for p in data.constitution.principles if data.rules.names(p.name)]
        return (f"per-principle effects (eval.per_principle): the rule judge compares each round's {n_answers} "
                f"held-out answers with the base's by the rules of {len(named)} principle(s) "
                f"({', '.join(named) or 'no rule names a principle'}); no model forward")
    s = size(len(data.constitution.principles), n_answers)
    return (f"per-principle effects (eval.per_principle): {s['principles']} principles x {s['answers']} held-out "
            f"answers x 2 orders = {s['forwards']:,} judge forwards per round at most (an answer identical to the "
            f"base's costs none), the {s['principles']} questions of each (answer, order) sharing one encoded prefix "
            f"({s['shared_prefixes']:,} prefixes)")


# --------------------------------------------------------------------------------------------------
# Scoring many prompts that share prefixes
# --------------------------------------------------------------------------------------------------

def _shared_length(group: list[list[int]]) -> int:
    from lora_cai.engine.generation import shared_prefix_length

    return shared_prefix_length(group) if len(group) > 1 else len(group[0]) - 1


def _plan(groups: list[list[list[int]]], prefixes: list[int], *, token_budget: int, max_batch_size: int):
    """Batches of group indices whose prefixes plus their rows' own tokens fit `token_budget` and whose rows fit
    `max_batch_size` (a group larger than either is a batch of its own)."""
    batches, current, rows, tokens = [], [], 0, 0
    for g, group in enumerate(groups):
        cost = prefixes[g] + sum(len(s) - prefixes[g] for s in group)
        if current and (rows + len(group) > max_batch_size or tokens + cost > token_budget):
            batches.append(current)
            current, rows, tokens = [], 0, 0
        current.append(g)
        rows, tokens = rows + len(group), tokens + cost
    if current:
        batches.append(current)
    return batches


def _prefix_cache(model, ids, mask):
    """The key/value cache of a batch of left-padded prefixes, or None where it cannot be repeated across rows
    exactly (the same conditions as generation's shared prefix: full-attention `DynamicLayer`s only)."""
    import inspect

    from transformers.cache_utils import DynamicCache, DynamicLayer

    if getattr(getattr(model, "generation_config", None), "cache_implementation", None):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    one_logit = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                **one_logit)
    cache = getattr(out, "past_key_values", None)
    if type(cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    return cache


def _shared_batch(model, groups, prefixes, batch: list[int], pad: int, device):
    """One batch of groups: their prefixes encoded once (left-padded together), the cache repeated for each group's
    rows, then every row's own tokens after it (left-padded between prefix and suffix, positions continuing from
    the row's prefix). Returns ([(batch position, group, row)], last-position logits), or None where the model's
    cache cannot be shared."""
    import torch

    width = max(prefixes[g] for g in batch)
    ids = torch.tensor([[pad] * (width - prefixes[g]) + groups[g][0][:prefixes[g]] for g in batch], device=device)
    mask = torch.tensor([[0] * (width - prefixes[g]) + [1] * prefixes[g] for g in batch], device=device)
    with torch.no_grad():
        cache = _prefix_cache(model, ids, mask)
    if cache is None:
        return None
    rows = [(b, g, r) for b, g in enumerate(batch) for r in range(len(groups[g]))]
    cache.batch_select_indices(torch.tensor([b for b, _, _ in rows], device=device))
    own = [groups[g][r][prefixes[g]:] for _, g, r in rows]
    longest = max(len(s) for s in own)
    suffix = torch.tensor([[pad] * (longest - len(s)) + s for s in own], device=device)
    suffix_mask = torch.tensor([[0] * (longest - len(s)) + [1] * len(s) for s in own], device=device)
    start = torch.tensor([prefixes[g] for _, g, _ in rows], device=device)[:, None]
    with torch.no_grad():
        logits = model(input_ids=suffix, attention_mask=torch.cat([mask[[b for b, _, _ in rows]], suffix_mask], 1),
                       position_ids=start + (suffix_mask.cumsum(-1) - 1).clamp(min=0), past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits
    return rows, logits


def option_logprobs(model, tokenizer, option_ids, groups: list[list[list[int]]], *, share_prefix: bool = True,
                    token_budget: int = 16384, max_batch_size: int = 64) -> list[list[tuple[float, float]]]:
    """(log P(A), log P(B)) at the last position of every token sequence of `groups`, each group's shared prefix
    encoded once (`share_prefix`) or every sequence whole; both give the same numbers up to float rounding."""
    import torch

    from lora_cai.engine.forward import forward_batches
    from lora_cai.engine.generation import is_oom, model_device, plan_batches

    ids_a, ids_b = option_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[list] = [[None] * len(g) for g in groups]

    def read(logits):
        logp = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
        return torch.logsumexp(logp[:, ids_a], dim=-1).tolist(), torch.logsumexp(logp[:, ids_b], dim=-1).tolist()

    device = model_device(model)
    prefixes = [_shared_length(g) for g in groups]
    todo = list(range(len(groups)))
    if share_prefix:
        todo = []
        for batch in _plan(groups, prefixes, token_budget=token_budget, max_batch_size=max_batch_size):
            try:
                scored = _shared_batch(model, groups, prefixes, batch, pad, device)
            except Exception as e:  # out of memory: what is left goes whole, in batches halved on OOM
                if not is_oom(e):
                    raise
                scored = None
            if scored is None:  # this model cannot share a cache, or the batch did not fit: the rest whole
                todo = [g for g in range(len(groups)) if out[g][0] is None]
                break
            la, lb = read(scored[1])
            for row, (_, g, r) in enumerate(scored[0]):
                out[g][r] = (la[row], lb[row])
    if todo:
        flat = [(g, r) for g in todo for r in range(len(groups[g]))]
        seqs = [groups[g][r] for g, r in flat]
        planned = plan_batches([len(s) for s in seqs], token_budget=token_budget, max_batch_size=max_batch_size,
                               max_new_tokens=1)
        for batch, logits in forward_batches(model, seqs, planned, pad_id=pad, side="left", logits_to_keep=1):
            la, lb = read(logits)
            for row, i in enumerate(batch):
                g, r = flat[i]
                out[g][r] = (la[row], lb[row])
    return out


# --------------------------------------------------------------------------------------------------
# Judging
# --------------------------------------------------------------------------------------------------

def judge_principles(judge, principles, pairs: list[Pair], *, share_prefix: bool = True) -> list[dict]:
    """One record per (pair, principle): {set, id, principle, p_order1, p_order2, p} with p = P(round k's answer
    better by the principle) averaged over both orders (None where the judge gave no answer or a sequence is
    longer than the model's context). `principles`: the constitution's. A rule judge judges each principle by the
    rules naming it, and gives no record for a principle no rule names."""
    from lora_cai.cai.rules import RuleJudge

    records = []
    if isinstance(judge, RuleJudge):
        for pair in pairs:
            for pr in principles:
                if not judge.names(pr.name):
                    continue
                p = judge.compare(pair.answer, pair.base, pair.labels, pair.prompt, principle=pr.name)
                records.append(_record(pair, pr.name, p, p))
        return records
    # group (pair, order): the principles' questions after the same two answers
    groups = [[principle_messages(pr.judge, pair.prompt, *((pair.answer, pair.base) if order == 0 else
                                                           (pair.base, pair.answer))) for pr in principles]
              for pair in pairs for order in (0, 1)]
    if hasattr(judge, "model"):  # a local model: option-token log-probs with the prefixes shared
        scores = _local_scores(judge, groups, share_prefix=share_prefix)
    else:  # a server: every conversation a request (the server caches prefixes its own way)
        flat = judge.score([c for g in groups for c in g])
        scores = [flat[i * len(principles):(i + 1) * len(principles)] for i in range(len(groups))]
    for n, pair in enumerate(pairs):
        first, second = scores[2 * n], scores[2 * n + 1]
        for j, pr in enumerate(principles):
            p1 = first[j]
            p2 = None if second[j] is None else 1.0 - second[j]
            records.append(_record(pair, pr.name, p1, p2))
    return records


def _local_scores(judge, groups: list[list[list[dict]]], *, share_prefix: bool) -> list[list[float | None]]:
    from lora_cai.engine.generation import context_length, render_chat
    from lora_cai.engine.judges import p_option_a

    tok = judge.tokenizer
    encoded = [[tok(render_chat(tok, c), add_special_tokens=False)["input_ids"] for c in g] for g in groups]
    limit = context_length(judge.model)
    keep = [i for i, g in enumerate(encoded) if limit is None or max(len(s) for s in g) < limit]
    scored = option_logprobs(judge.model, tok, judge.option_ids(), [encoded[i] for i in keep],
                             share_prefix=share_prefix, token_budget=judge.token_budget,
                             max_batch_size=judge.max_batch_size)
    out: list[list[float | None]] = [[None] * len(g) for g in groups]
    for i, rows in zip(keep, scored):
        out[i] = [p_option_a({0: a, 1: b}) for a, b in rows]
    return out


def _record(pair: Pair, principle: str, p1: float | None, p2: float | None) -> dict:
    p = None if p1 is None or p2 is None else (p1 + p2) / 2
    r6 = (lambda x: None if x is None else round(x, 6))
    return {"set": pair.set, "id": pair.id, "principle": principle, "p_order1": r6(p1), "p_order2": r6(p2),
            "p": r6(p)}


def ties(principles, same: list[Pair], judge) -> list[dict]:
    """Identical answers: a tie (0.5) by every principle the judge measures, without a forward."""
    from lora_cai.cai.rules import RuleJudge

    names = [p.name for p in principles if not isinstance(judge, RuleJudge) or judge.names(p.name)]
    return [{"set": s.set, "id": s.id, "principle": n, "p_order1": 0.5, "p_order2": 0.5, "p": 0.5, "identical": True}
            for s in same for n in names]


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def base_judge(ctx):
    """The configured judge, with a `self` judge being the base model: the loaded policy with its adapters off."""
    from lora_cai.engine.judges import LogprobJudge

    cfg = ctx.cfg
    if cfg.judge.kind != "self":
        if cfg.judge.kind == "teacher" and not ctx.models.fits_together(cfg):
            ctx.models.drop_policy()  # nothing needs the policy any more: the answers are stored
        yield ctx.models.judge(cfg, ctx.k, ctx.stack, ctx.data.rules)
        return
    model, tok = ctx.models.policy(cfg, ctx.k, ctx.stack)
    g = cfg.generation
    judge = LogprobJudge(model, tok, kind="self", token_budget=g.token_budget, max_batch_size=g.max_batch_size)
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with off:
            yield judge
    finally:
        model.train(was_training)


def principles_stage(ctx, inp, current: dict | None):
    """Round k's held-out answers (`current`: its eval.json) against the base's by every principle
    (principles.json)."""
    from lora_cai.cai import effects
    from lora_cai.core.stage import Done, timed
    from lora_cai.core.store import atomic_write_json, read_json
    from lora_cai.data.rundata import labels_of

    done = Done()
    path = ctx.dir / PRINCIPLES_FILE
    base_path = ctx.run_dir / BASELINE_EVAL
    if current is None or not base_path.exists():
        return done
    base = read_json(base_path)
    if not (path.exists() and read_json(path).get("inputs") == inp.hash):
        done.ran = True
        cfg, data = ctx.cfg, ctx.data
        column = cfg.data.label_column if data.rules is not None else None  # only rules read labels
        labels = {(name, r["id"]): labels_of(r, column) for name, rs in data.eval_sets.items() for r in rs}
        changed, same = pairs_of(current["samples"], base["samples"], labels)
        principles = data.constitution.principles
        with timed(done.timing), base_judge(ctx) as judge:
            records = judge_principles(judge, principles, changed) + ties(principles, same, judge)
            calls = getattr(judge, "calls", None)
        if calls is not None:  # a server judge: past judge.max_failures the stage stops (nothing written)
            from lora_cai.engine.calls import stop_if_failing

            j = cfg.judge
            stop_if_failing(calls, calls.requests, j.max_failures, where=f"round {ctx.k} per-principle effects",
                            who="judge", url=j.base_url.rstrip("/"), top_logprobs=j.top_logprobs)
        rule = data.rules is not None and cfg.judge.kind == "rule"
        measured = [p for p in principles if not rule or data.rules.names(p.name)]
        work = size(len(measured), len(changed))
        if rule:  # the rules compare the texts: no model forward
            work.update(forwards=0, shared_prefixes=0)
        result = {"inputs": inp.hash, "judge": cfg.judge.kind, **work, "identical": len(same),
                  "win_rates": effects.win_rates(records), "records": records}
        if calls is not None:
            result["judge_calls"] = calls.as_dict()
        atomic_write_json(path, result)
    out = read_json(path)
    done.outputs = out
    wins = out.get("win_rates", {})
    done.summary["principles"] = {
        "judged": len(wins),
        "improved": sorted(n for n, w in wins.items() if w.get("flag") == "improved"),
        "worsened": sorted(n for n, w in wins.items() if w.get("flag") == "worsened")}
    return done


# The stored answers of round k's eval and of the baseline (whose inputs round k's eval hash covers, through its
# `previous` chain), judged by the configured judge: a self judge is the base model (MODEL, the batch settings),
# a rule judge reads the rule file and the prompts' labels.
PRINCIPLES_STAGE = Stage(
    "principles", principles_stage, files=(PRINCIPLES_FILE,), takes=("eval",),
    reads=Decl(settings=("eval.per_principle", *JUDGE, If(judge_is("rule"), "data.label_column")),
               data=("constitution", "rules", If(judge_is("rule"), "refusal_detector")), after=("eval",),
               uses=EVAL_USES, exists=lambda c: c.eval.per_principle and c.data.eval_limit > 0))
