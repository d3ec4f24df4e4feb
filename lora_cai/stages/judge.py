"""The round's training data: the comparisons its pair builder needs, judged (judgments.jsonl, committed per
batch), the preference pairs kept from them (pairs.jsonl) and the SFT records (sft.jsonl)."""

from __future__ import annotations

from itertools import combinations

from lora_cai.core.stage import Done, Round, Stage, peak_memory, timed
from lora_cai.errors import UserError
from lora_cai.core.inputs import EVAL_USES, JUDGE, LOCAL_BATCH, MODEL, Decl, If, judge_is


def comparisons(ctx: Round, trajectories: list[dict], samples: dict | None,
                labels: dict[str, dict | None]) -> tuple[list[dict], list]:
    """The revision pairs of the trajectories, and every comparison the builder wants judged (with the prompt's
    `labels`, by id)."""
    from lora_cai.engine import judges as J
    from lora_cai.stages import critique

    cfg, k = ctx.cfg, ctx.k
    constitution = ctx.data.constitution
    revision = critique.revision_pairs(trajectories) if cfg.pairs.builder in ("revision", "mix") else []
    comps: list[J.Comparison] = []
    principles = {p.name: p for p in constitution.principles}
    if cfg.pairs.judge_revisions:
        comps += [J.Comparison(p["id"], p["prompt"], p["chosen"], p["rejected"], p["principle"],
                               principles[p["principle"]].judge if p["principle"] in principles
                               else J.WIN_RATE_QUESTION, "revision", labels.get(p["id"])) for p in revision]
    for pid, s in (samples or {}).items():
        principle = critique.pick_principle(constitution, cfg.seed + k, f"judge:{pid}", 0)
        texts = list(dict.fromkeys(t.strip() for t in s["responses"] if t and t.strip()))
        comps += [J.Comparison(pid, s["prompt"], a, b, principle.name, principle.judge, labels=labels.get(pid))
                  for a, b in combinations(texts, 2)]
        s["responses"] = texts
    return revision, comps


def _labels(ctx: Round) -> dict[str, dict | None]:
    """Prompt id -> its labels, for a rule judge (only rules read labels)."""
    from lora_cai.data.rundata import labels_of

    column = ctx.cfg.data.label_column if ctx.data.rules is not None else None
    return {r["id"]: labels_of(r, column) for r in ctx.data.prompts.records}


def accepted_records(samples: dict[str, dict], paired: set[str], rules, labels: dict) -> list[dict]:
    """SFT records for the prompts that made no pair because every sample satisfies the rules: the first sample
    (the policy's plain answer). Prompts whose samples all violate them stay out."""
    out = []
    for pid, s in samples.items():
        texts = s["responses"]
        if pid in paired or not texts or any(rules.violations(t, labels.get(pid), s["prompt"]) for t in texts):
            continue
        out.append({"id": pid, "prompt": s["prompt"], "completion": texts[0], "source": "accepted"})
    return out


def judge_stage(ctx: Round, inp, trajectories: list[dict], samples: dict | None) -> Done:
    """Judge the comparisons the pair builder needs, build the pairs, write sft.jsonl and pairs.jsonl."""
    from lora_cai.cai.preferences import agreement, best_of_n_pairs, judged_revision_pairs, judgment_stats
    from lora_cai.core.store import write_jsonl_atomic
    from lora_cai.engine import judges as J

    cfg, j, done = ctx.cfg, ctx.cfg.judge, Done()
    labels = _labels(ctx)
    revision, comps = comparisons(ctx, trajectories, samples, labels)
    with timed(done.timing):
        pairs = revision
        if comps:
            judgments = _judged(ctx, inp, comps, done)
            stats = judgment_stats(judgments, confidence=j.confidence)
            calls = J.calls_of(judgments)
            if calls is not None:  # a server judged: what it did not answer, from the committed records
                stats["calls"] = calls.as_dict()
            if any("p_self" in r for r in judgments):
                stats["agreement_with_self"] = agreement(judgments, [{"p_raw": r.get("p_self")} for r in judgments])
            pairs, dropped = [], {}
            if cfg.pairs.judge_revisions:
                revision, dropped["revision"] = judged_revision_pairs(
                    revision, [r for r in judgments if r["source"] == "revision"], confidence=j.confidence)
            pairs += revision
            if samples:
                bon, dropped["best_of_n"] = best_of_n_pairs(
                    samples, [r for r in judgments if r["source"] == "best_of_n"], confidence=j.confidence)
                pairs += bon
            stats["dropped"] = dropped
            done.summary["judge"] = stats
        else:
            done.summary["judge"] = None
        if cfg.critique.steps:
            from lora_cai.stages.critique import sft_records

            sft = sft_records(trajectories)
        else:  # RLAIF only: fine-tune on the judged winners
            sft = [{"id": p["id"], "prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
            if cfg.pairs.sft_accepted:
                sft += accepted_records(samples or {}, {p["id"] for p in pairs}, ctx.data.rules, labels)
        write_jsonl_atomic(ctx.dir / "sft.jsonl", sft)
        write_jsonl_atomic(ctx.dir / "pairs.jsonl", pairs)
    done.summary.update(sft_records=len(sft), pairs=len(pairs))
    done.outputs = (sft, pairs)
    return done


def _judged(ctx: Round, inp, comps: list, done: Done) -> list[dict]:
    """judgments.jsonl for `comps`, computed batch by batch where not committed yet."""
    from lora_cai.core.store import JsonlStage
    from lora_cai.engine import judges as J
    from lora_cai.engine.generation import make_progress

    cfg, j, k = ctx.cfg, ctx.cfg.judge, ctx.k
    stage = JsonlStage(ctx.dir / "judgments.jsonl", inp.hash)
    if stage.complete:
        return stage.records()
    done.ran = True
    # Commit granularity: what one round trip computes (a server's concurrency window, or about one forward
    # batch of the local judge: two orders per comparison). Kept from the stage's first run, so a resumed stage
    # finds its batches where it left them whatever the concurrency now.
    per_batch = stage.pinned("per_batch", max(1, j.concurrency * 4 if j.kind == "api" else
                                               cfg.generation.max_batch_size // 2))
    batches = [comps[i:i + per_batch] for i in range(0, len(comps), per_batch)]
    models = ctx.models
    judge = models.judge(cfg, k, ctx.stack, ctx.data.rules)
    cot = models.cot_generator(cfg, k, ctx.stack) if j.chain_of_thought else None
    self_judge = None
    if j.cross_check_self and j.kind in ("teacher", "api"):
        if models.model is None and j.kind == "teacher" and not models.fits_together(cfg):
            raise UserError(f"{cfg.source}: judge.cross_check_self needs the student and the teacher in memory "
                            f"together, which vram_gb={cfg.vram_gb:g} does not allow; turn it off")
        g = cfg.generation
        self_judge = J.LogprobJudge(*models.for_inference(cfg, k, ctx.stack), kind="self",
                                    token_budget=g.token_budget, max_batch_size=g.max_batch_size)
    # A server judge's calls in this process: two per comparison left to judge (and as many rationales with the
    # chain of thought on the server), checked against judge.max_failures before each commit.
    servers = [g for g in (judge, cot) if hasattr(g, "calls")]
    todo = sum(len(chunk) for b, chunk in enumerate(batches) if b not in stage.done_batches)
    planned = 2 * todo * len(servers)
    with peak_memory(done.summary, "judge"), make_progress(console=ctx.console) as progress:
        task = progress.add_task(f"round {k} judging ({j.kind})", total=len(comps), tokens_per_s=0.0)
        for b, chunk in enumerate(batches):
            if b in stage.done_batches:
                progress.advance(task, len(chunk))
                continue
            recs = J.judge_comparisons(judge, chunk, cot_generator=cot,
                                       cot_max_new_tokens=j.cot_max_new_tokens if cot else 0, seed=cfg.seed + k)
            if servers:  # before the commit: a batch past the limit is redone by the rerun
                from lora_cai.engine.calls import stop_if_failing

                stop_if_failing(sum((g.calls for g in servers[1:]), servers[0].calls), planned, j.max_failures,
                                where=f"round {k} judge (pair labels)", who="judge", url=judge.client.base_url,
                                top_logprobs=j.top_logprobs)
            if self_judge is not None:
                for r, s in zip(recs, J.judge_comparisons(self_judge, chunk)):
                    r["p_self"] = s["p_raw"]
            stage.commit([{**r, "batch": b} for r in recs], b)
            progress.advance(task, len(chunk))
    stage.finish()
    return stage.records()


def nothing_to_train_on(k: int, summary: dict) -> UserError:
    return UserError(f"round {k}: nothing to train on (critiques: {summary.get('critiques', 0)}, copied "
                     f"demonstrations: {summary.get('copied_demonstration', 0)}, judged pairs kept: "
                     f"{summary.get('pairs', 0)}); use more prompts, a larger model or a teacher critic "
                     f"(critic: teacher)")


def something_to_train_on(k: int, done: dict) -> None:
    """After the judge: a round whose critiques and judgments left no SFT record stops here, in one line."""
    sft, _ = done["judge"].outputs
    if not sft:
        raise nothing_to_train_on(k, {**done["critique"].summary, **done["judge"].summary})


JUDGE_STAGE = Stage(
    "judge", judge_stage, files=("judgments.jsonl", "judgments.jsonl.meta.json", "sft.jsonl", "pairs.jsonl"),
    takes=("critique", "samples"), check=something_to_train_on,
    reads=Decl(settings=("pairs.builder", "pairs.judge_revisions", "critique.steps", "judge.confidence",
                         If(judge_is("rule"), "data.label_column"), "pairs.sft_accepted",
                         "judge.chain_of_thought", If(lambda c: c.judge.chain_of_thought, "judge.cot_max_new_tokens"),
                         "judge.cross_check_self", *JUDGE, "seed",
                         If(lambda c: c.judge.cross_check_self and c.judge.kind in ("teacher", "api"), *MODEL,
                            *LOCAL_BATCH)),
               data=("constitution", "rules", If(judge_is("rule"), "refusal_detector")),
               after=("responses", "samples", "critique"),
               uses=(*EVAL_USES, "generation.max_batch_size")))  # with rules or a server: only the commit batch size
