"""Per-round evaluation: held-out harmful compliance and over-refusal, capability probe, critic check, early stopping.

* `evaluate`: greedy answers to the held-out harmful and benign sets; refusals are decided by a refusal
  judge when one is given (`refusal_judge`), with the refusal-phrase heuristic (the classic cheap check,
  about 70 % agreement with humans) as a cross-check whose disagreement is reported; without a judge the
  heuristic decides, and every summary says so (`detector`).
* `capability_accuracy`: the alignment-tax probe, log-likelihood accuracy on a small multiple-choice set
  (`builtin:capability`, `load_capability`), scored like lm-eval-harness.
* `critic_check`: before the long work, whether the critic flags clearly harmful canary answers, passes
  clearly benign ones, and writes its own critiques rather than copying the demonstrations.
* `quality_score` and `early_stop`: the number a round is judged by, and the rule that stops the run.

torch is imported inside the functions that need it.
"""

from __future__ import annotations

from lora_cai.cai.refusal import HEURISTIC, detector_label, is_refusal
from lora_cai.core.inputs import EVAL, EVAL_USES, Decl
from lora_cai.core.layout import BASELINE_EVAL
from lora_cai.core.stage import Stage

# --------------------------------------------------------------------------------------------------
# Held-out harmful compliance and over-refusal
# --------------------------------------------------------------------------------------------------

def evaluate(generator, harmful: list[dict], benign: list[dict], *, max_new_tokens: int = 96, progress=None,
             refusal_judge=None, category_column: str | None = None) -> dict:
    """Greedy answers to the held-out sets; rates of complying with harmful and refusing benign prompts.

    `generator` is a `generators.LocalGenerator` or `APIGenerator` serving the policy to evaluate.
    `refusal_judge`, when given, is a callable taking a list of `(prompt, answer)` and returning one
    `bool | None` per pair (True = the answer refuses); it decides refusal, and where it returns None the
    heuristic does. The result then has `detector` ("judge" only when the judge decided every answer, else a
    label naming how many fell back: `detector_label`), `judge_decided` and `judge_unanswered` (answers the
    judge did not decide), `heuristic_disagreement` (share of judged answers where judge and heuristic differ;
    absent when the judge decided none) and, per sample, `refusal_judge` and `refusal_heuristic`.
    An answer that is None (prompt too long, request failed) counts as neither complying nor refusing.
    With `category_column`, each sample of a record carrying that column has its value as "category".
    """
    rows = [("harmful", r) for r in harmful] + [("benign", r) for r in benign]
    conversations = [[{"role": "user", "content": r["prompt"]}] for _, r in rows]
    answers = generator.generate(conversations, max_new_tokens=max_new_tokens, temperature=0.0, progress=progress,
                                 description="held-out eval") if conversations else []
    heuristic = [is_refusal(a, r["prompt"]) for (_, r), a in zip(rows, answers)]
    judged: list[bool | None] = [None] * len(answers)
    if refusal_judge is not None:
        asked = [i for i, a in enumerate(answers) if a is not None]
        verdicts = list(refusal_judge([(rows[i][1]["prompt"], answers[i]) for i in asked])) if asked else []
        if len(verdicts) != len(asked):
            raise ValueError(f"refusal_judge returned {len(verdicts)} verdicts for {len(asked)} answers")
        for i, v in zip(asked, verdicts):
            judged[i] = None if v is None else bool(v)
    refusal = [h if j is None else j for h, j in zip(heuristic, judged)]

    samples = []
    for i, ((kind, r), a) in enumerate(zip(rows, answers)):
        s = {"id": r["id"], "set": kind, "prompt": r["prompt"], "answer": a, "refusal": refusal[i]}
        if category_column and r.get(category_column) is not None:
            s["category"] = str(r[category_column])
        if refusal_judge is not None:
            s.update(refusal_judge=judged[i], refusal_heuristic=heuristic[i])
        samples.append(s)
    nh = len(harmful)
    h_ans, b_ans = answers[:nh], answers[nh:]
    complied = [a is not None and not ref for a, ref in zip(h_ans, refusal[:nh])]
    refused = [a is not None and ref for a, ref in zip(b_ans, refusal[nh:])]
    result = {
        "harmful_compliance": sum(complied) / len(h_ans) if h_ans else None,
        "over_refusal": sum(refused) / len(b_ans) if b_ans else None,
        "n_harmful": len(h_ans), "n_benign": len(b_ans), "detector": HEURISTIC,
        "samples": samples,
    }
    if refusal_judge is not None:
        answered = sum(a is not None for a in answers)
        fell_back = sum(a is not None and j is None for a, j in zip(answers, judged))
        result.update(detector=detector_label(answered, fell_back), judge_unanswered=fell_back,
                      judge_decided=answered - fell_back)
        both = [(j, h) for j, h in zip(judged, heuristic) if j is not None]
        if both:  # over the answers the judge decided; absent when it decided none
            result["heuristic_disagreement"] = sum(j != h for j, h in both) / len(both)
    return result


def capability_accuracy(model, tokenizer, items: list[dict], *, batch_size: int = 16) -> dict:
    """Log-likelihood multiple-choice accuracy, the way lm-eval-harness scores ARC or HellaSwag.

    Each question is rendered as a user turn with the chat template (`generation.render_chat`, generation
    prompt on); each choice's text is scored as the assistant's answer: the sum of its tokens' log-probs
    given the question, divided by the choice's length in characters (lm-eval's `acc_norm`). Normalising
    matters because choices differ in length and a plain sum favours the shortest; per character rather
    than per token keeps the score independent of how the tokenizer splits the text. The prediction is the
    best-scoring choice (the first on a tie). Context and choice are tokenized separately and joined, so
    the choice's tokens are those the model would produce after the generation prompt.

    Sequences are right-padded (no position shift for the real tokens; the causal mask keeps padding out of
    them) and run in batches of `batch_size` (halved on out-of-memory) in eval mode without gradients; the
    model's training mode is restored afterwards. Returns {accuracy, n, scoring, per_item: [{id, pred, answer,
    correct, scores}]}.
    """
    import torch

    from lora_cai.engine.forward import forward_batches
    from lora_cai.engine.generation import context_length, render_chat

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None))
    max_len = context_length(model)
    seqs = []  # (item index, choice index, context ids, choice ids)
    for i, it in enumerate(items):
        context = render_chat(tokenizer, [{"role": "user", "content": it["question"]}])
        ctx = list(tokenizer(context, add_special_tokens=False)["input_ids"])
        for c, choice in enumerate(it["choices"]):
            cont = list(tokenizer(choice, add_special_tokens=False)["input_ids"])
            if not cont:
                raise ValueError(f"capability item {it['id']}: choice {c} tokenizes to nothing")
            keep = ctx if max_len is None or len(ctx) + len(cont) <= max_len else ctx[-max(1, max_len - len(cont)):]
            seqs.append((i, c, keep, cont))
    order = sorted(range(len(seqs)), key=lambda s: -(len(seqs[s][2]) + len(seqs[s][3])))
    logprob = [0.0] * len(seqs)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:  # right padding: no position shift for the real tokens
        for batch, logits in forward_batches(model, [seqs[s][2] + seqs[s][3] for s in range(len(seqs))],
                                             [order[i:i + batch_size] for i in range(0, len(order), batch_size)],
                                             pad_id=pad_id, side="right"):
            for row, s in enumerate(batch):
                n_ctx, cont = len(seqs[s][2]), seqs[s][3]
                # the logits at position p predict token p + 1
                lp = torch.log_softmax(logits[row, n_ctx - 1:n_ctx - 1 + len(cont)].float(), dim=-1)
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                logprob[s] = float(lp.gather(1, target[:, None]).sum())
    finally:
        if was_training:
            model.train()
    scores: list[list[float]] = [[0.0] * len(it["choices"]) for it in items]
    for s, (i, c, _, _) in enumerate(seqs):
        scores[i][c] = logprob[s] / len(items[i]["choices"][c])
    per_item = []
    for it, sc in zip(items, scores):
        pred = max(range(len(sc)), key=lambda c: (sc[c], -c))
        per_item.append({"id": it["id"], "pred": pred, "answer": it["answer"], "correct": pred == it["answer"],
                         "scores": sc})
    n = len(items)
    return {"accuracy": sum(p["correct"] for p in per_item) / n if n else None, "n": n,
            "scoring": "sum of the choice's token log-probs per character (acc_norm)", "per_item": per_item}


# --------------------------------------------------------------------------------------------------
# The stages: the critic check and the baseline before round 1, each round's evaluation
# --------------------------------------------------------------------------------------------------

VIOLATION_SAMPLES = 4  # sampled answers per held-out prompt for a rule judge's violation rate


def baseline_stage(ctx, inp):
    """The base model (round 1's starting policy) on the held-out sets (baseline-eval.json)."""
    from lora_cai.core.stage import Done, timed
    from lora_cai.core.store import atomic_write_json, read_json

    done = Done()
    path = ctx.run_dir / "baseline-eval.json"
    if not (path.exists() and read_json(path).get("inputs") == inp.hash):
        done.ran = True
        with timed(done.timing):
            result = evaluate_policy(ctx, None)
        atomic_write_json(path, {"inputs": inp.hash, **result})
    done.outputs = read_json(path)
    return done


BASELINE_STAGE = Stage(
    "baseline_eval", baseline_stage, files=(BASELINE_EVAL,), restartable=False,
    reads=Decl(settings=EVAL, data=("eval_sets", "eval_sources", "capability", "rules", "refusal_detector"),
               uses=EVAL_USES, exists=lambda c: c.data.eval_limit > 0, per_round=False))


def eval_stage(ctx, inp, adapter):
    """Round k's policy (base + adapters 1..k) on the held-out sets, against the previous round's answers."""
    from lora_cai.core.layout import round_dir
    from lora_cai.core.stage import Done, peak_memory, timed
    from lora_cai.core.store import atomic_write_json, read_json

    cfg, k, done = ctx.cfg, ctx.k, Done()
    path = ctx.dir / "eval.json"
    if not (path.exists() and read_json(path).get("inputs") == inp.hash):
        done.ran = True
        before = ctx.run_dir / (BASELINE_EVAL if k == 1 else f"{round_dir(k - 1)}/eval.json")
        previous = read_json(before) if before.exists() else None
        with timed(done.timing), peak_memory(done.summary, "eval"):
            if ctx.models.model is None:  # trained by an earlier process: the stack plus the saved adapter
                ctx.models.with_trained_adapter(cfg, k, ctx.stack, adapter)
            result = evaluate_policy(ctx, previous)
        # Against the base, per category and per principle: the baseline's inputs are a subset of this stage's
        # (its settings and data, and through `previous` its hash), so a changed baseline reruns this too.
        base = ctx.run_dir / BASELINE_EVAL
        result.update(against_base(read_json(base) if base.exists() else None, result))
        atomic_write_json(path, {"inputs": inp.hash, **result})
    ev = read_json(path)
    done.outputs = ev
    done.summary["eval"] = {key: ev.get(key) for key in (
        "harmful_compliance", "over_refusal", "n_harmful", "n_benign", "detector", "heuristic_disagreement",
        "judge_unanswered", "judge_calls", "violation_rate", "capability", "win_rate") if key in ev}
    return done


def against_base(base: dict | None, ev: dict) -> dict:
    """What eval.json adds beside its own rates when the baseline is there: `by_category` (each category's
    harmful compliance and over-refusal, base and this round, the paired change with its 95% interval and Holm's
    flag) and `violations_by_principle` (the same for each principle's rule violations)."""
    from lora_cai.cai import effects

    if base is None:
        return {}
    out = {}
    cats = effects.by_category(base, ev, effects.neutral_areas(ev))
    if cats:
        out["by_category"] = cats
    principles = effects.violation_changes(base, ev)
    if principles:
        out["violations_by_principle"] = principles
    return out


EVAL_STAGE = Stage(
    "eval", eval_stage, files=("eval.json",), takes=("train",),
    reads=Decl(settings=(*EVAL, "eval.win_rate"),
               data=("eval_sets", "eval_sources", "capability", "rules", "refusal_detector"),
               after=("train", "previous"), uses=EVAL_USES, exists=lambda c: c.data.eval_limit > 0))


def evaluate_policy(ctx, previous: dict | None) -> dict:
    """The policy in memory on the held-out sets; judge-decided refusals, rule violations, win rate against
    `previous` (the last eval's answers), and the capability probe."""
    from lora_cai.engine import judges as J
    from lora_cai.engine.generation import make_progress

    cfg, k, data, session = ctx.cfg, ctx.k, ctx.data, ctx.models
    e = cfg.eval
    gen = session.generator(cfg, k, ctx.stack, local=True)
    extra: dict = {}
    # Everything that needs the policy first: a local teacher judge may have to replace it in memory.
    if data.capability:
        cap = capability_accuracy(*session.for_inference(cfg, k, ctx.stack), data.capability)  # in memory, as with vLLM
        extra["capability"] = {"accuracy": cap["accuracy"], "n": cap["n"]}
    if data.rules is not None:
        extra.update(violation_rates(ctx, gen))
    judge = None

    def refusal_judge(items):  # called once the held-out answers are in
        nonlocal judge
        if judge is None:
            if cfg.judge.kind == "teacher" and not session.fits_together(cfg):
                gen.model = None  # release the policy (nothing needs it any more) before the teacher loads
                session.drop_policy()
            judge = session.judge(cfg, k, ctx.stack, data.rules)
        return J.classify_refusals(judge, items)

    with make_progress(console=ctx.console, transient=True) as progress:
        result = evaluate(gen, data.eval_sets.get("harmful", []), data.eval_sets.get("benign", []),
                          max_new_tokens=e.max_new_tokens, progress=progress,
                          refusal_judge=None if cfg.judge.kind == "rule" else refusal_judge,
                          category_column=cfg.data.category_column)
    result.update(extra)
    if data.eval_info:  # what each held-out set is, and for a named set what its rates measure
        result["sets"] = data.eval_info
    from lora_cai.cai.effects import category_rates

    categories = category_rates(result)
    if categories:
        result["category_rates"] = categories
    compare = previous is not None and e.win_rate
    calls = {}
    if hasattr(judge, "calls"):  # a server judge: what it did not answer, and the stop past judge.max_failures
        calls["refusal"] = judge.calls
        answered = sum(s["answer"] is not None for s in result["samples"])
        _stop_if_judge_failing(ctx, calls, 2 * answered if compare else 0)  # two win-rate calls per answer at most
    if compare:
        result["win_rate"], win_calls = win_rate(ctx, result["samples"], previous["samples"])
        if win_calls is not None:
            calls["win_rate"] = win_calls
            _stop_if_judge_failing(ctx, calls, 0)
    if calls:
        result["judge_calls"] = {purpose: c.as_dict() for purpose, c in calls.items()}
    return result


def _stop_if_judge_failing(ctx, calls: dict, still_to_come: int) -> None:
    """An evaluation stops (nothing of it is written) once its server judge's failed calls exceed
    `judge.max_failures` of its calls, `still_to_come` being an upper bound of the calls it has yet to make."""
    from lora_cai.engine.calls import Calls, stop_if_failing

    total = sum(calls.values(), Calls())
    j = ctx.cfg.judge
    stop_if_failing(total, total.requests + still_to_come, j.max_failures,
                    where=f"{'baseline eval' if ctx.dir == ctx.run_dir else f'round {ctx.k} eval'} "
                          f"({', '.join(PURPOSES[p] for p in calls)})",
                    who="judge", url=j.base_url.rstrip("/"), top_logprobs=j.top_logprobs)


PURPOSES = {"refusal": "refusal verdicts", "win_rate": "win rate"}


def violation_rates(ctx, gen) -> dict:
    """The policy's own rule violations: VIOLATION_SAMPLES sampled answers per held-out prompt (fixed seed),
    each judged by the rules that apply to its prompt's label; overall and per held-out set."""
    from lora_cai.data.rundata import labels_of

    cfg, data, g = ctx.cfg, ctx.data, ctx.cfg.generation
    rows = [(name, r) for name in ("harmful", "benign") for r in data.eval_sets.get(name, [])]
    answers = gen.generate([[{"role": "user", "content": r["prompt"]}] for _, r in rows for _ in range(VIOLATION_SAMPLES)],
                           max_new_tokens=g.max_new_tokens, temperature=g.temperature or 0.7, top_p=g.top_p,
                           seed=cfg.seed)
    judged: dict[str, list[bool]] = {}
    by_principle: dict[str, dict[str, list[bool]]] = {}  # principle -> "set:id" -> violated, per sampled answer
    for i, a in enumerate(answers):
        name, r = rows[i // VIOLATION_SAMPLES]
        if a is not None:
            labels = labels_of(r, cfg.data.label_column)
            judged.setdefault(name, []).append(data.rules.violations(a, labels, r["prompt"]) > 0)
            for principle, hit in data.rules.principle_violations(a, labels, r["prompt"]).items():
                by_principle.setdefault(principle, {}).setdefault(f"{name}:{r['id']}", []).append(hit)
    every = [v for vs in judged.values() for v in vs]
    out = {"violation_rate": sum(every) / len(every) if every else None, "violation_samples": len(every),
           "violation_rate_by_set": {name: sum(vs) / len(vs) for name, vs in judged.items() if vs}}
    if by_principle:  # rules that name a principle: its rate, and per prompt for the paired intervals
        out["violation_rate_by_principle"] = {
            p: sum(sum(v) for v in per.values()) / sum(len(v) for v in per.values()) for p, per in by_principle.items()}
        out["principle_violations"] = by_principle
    return out


def win_rate(ctx, current: list[dict], previous: list[dict]) -> tuple[dict, object]:
    """P(this round's answer beats the previous one), by the configured judge in both orders, and the server
    judge's `api.Calls` (None for a local or rule judge). Without a single verdict `win_rate` is absent and
    `absent` says why; `judged` of `compared` answers decided it."""
    from lora_cai.data.rundata import labels_of
    from lora_cai.engine import judges as J

    column = ctx.cfg.data.label_column if ctx.data.rules is not None else None  # only rules read labels
    labels = {(name, r["id"]): labels_of(r, column) for name, rs in ctx.data.eval_sets.items() for r in rs}
    before = {(s["set"], s["id"]): s["answer"] for s in previous}
    comps = [J.Comparison(f"{s['set']}:{s['id']}", s["prompt"], s["answer"], before[(s["set"], s["id"])], None,
                          J.WIN_RATE_QUESTION, "win_rate", labels.get((s["set"], s["id"])))
             for s in current if s["answer"] and before.get((s["set"], s["id"]))
             and s["answer"].strip() != before[(s["set"], s["id"])].strip()]
    identical = {(s["set"], s["id"]) for s in current if s["answer"] and before.get((s["set"], s["id"])) == s["answer"]}
    same = len(identical)
    judge = ctx.models.judge(ctx.cfg, ctx.k, ctx.stack, ctx.data.rules)
    recs = J.judge_comparisons(judge, comps) if comps else []
    scored = [r["p_raw"] for r in recs if r["p_raw"] is not None]
    n = len(scored) + same  # identical answers count as ties
    # Each answer's own verdict, for the report's side-by-side view: P(better than the previous round's answer),
    # 0.5 for an identical answer, None where the judge gave no usable answer or there was nothing to compare.
    p_of = {r["id"]: r["p_raw"] for r in recs}
    for s in current:
        s["win_vs_previous"] = 0.5 if (s["set"], s["id"]) in identical else p_of.get(f"{s['set']}:{s['id']}")
    out = {"wins": sum(p > 0.5 for p in scored), "losses": sum(p < 0.5 for p in scored),
           "ties": sum(p == 0.5 for p in scored) + same, "garbled": len(recs) - len(scored),
           "judged": n, "compared": len(recs) + same, "judge": ctx.cfg.judge.kind}
    if n:
        out["win_rate"] = (sum(scored) + 0.5 * same) / n
    else:  # no verdict: the rate is absent, and says why
        out["absent"] = (f"the judge gave no verdict on any of the {len(recs)} changed answers" if recs else
                         "no answer of this round could be compared with the previous round's")
    return out, getattr(judge, "calls", None)
