"""The policy's own answers: the round's initial responses, and the extra samples best-of-N pairs are built from."""

from __future__ import annotations

from lora_cai.core.stage import Done, Round, Stage, peak_memory, timed, tokens_per_s
from lora_cai.core.inputs import GENERATOR, GENERATOR_USES, Decl, If



def responses_stage(ctx: Round, inp) -> Done:
    """One response per prompt from the round's starting policy (responses.jsonl, committed per batch)."""
    from lora_cai.engine.generation import GenerationStats, make_progress
    from lora_cai.core.store import JsonlStage

    cfg, k, done = ctx.cfg, ctx.k, Done()
    stage = JsonlStage(ctx.dir / "responses.jsonl", inp.hash)
    stats = GenerationStats()
    if not stage.complete:
        done.ran = True
        recs, g = ctx.data.prompts.records, cfg.generation
        with timed(done.timing), peak_memory(done.summary, "responses"), make_progress(console=ctx.console) as progress:
            for batch, outs in ctx.models.generator(cfg, k, ctx.stack).pin(stage).iter(
                    [[{"role": "user", "content": r["prompt"]}] for r in recs], max_new_tokens=g.max_new_tokens,
                    temperature=g.temperature, top_p=g.top_p, seed=cfg.seed + 7919 * k,
                    skip_batches=stage.done_batches, stats=stats, progress=progress,
                    description=f"round {k} responses"):
                stage.commit([{"id": recs[i]["id"], "prompt": recs[i]["prompt"], "response": text,
                               "round": k, "seed": cfg.seed, "batch": batch} for i, text in outs], batch)
        stage.finish(generation=stats.as_dict())
        done.timing["tokens_per_s"] = tokens_per_s(stats)
    responses = stage.records()
    done.outputs = responses
    done.summary.update(responses=sum(r["response"] is not None for r in responses),
                        skipped_too_long=sum(r["response"] is None for r in responses))
    if ctx.data.rules is not None:
        from lora_cai.data.rundata import labels_of

        labels = {r["id"]: labels_of(r, cfg.data.label_column) for r in ctx.data.prompts.records}
        answered = [r for r in responses if r["response"] is not None]
        violating = sum(ctx.data.rules.violations(r["response"], labels[r["id"]], r["prompt"]) > 0 for r in answered)
        done.summary["response_violation_rate"] = violating / len(answered) if answered else None
    return done


RESPONSES_STAGE = Stage(
    "responses", responses_stage, files=("responses.jsonl", "responses.jsonl.meta.json"),
    reads=Decl(settings=(*GENERATOR, "generation.max_new_tokens", "generation.temperature", "generation.top_p", "seed"),
               data=("prompts",), uses=(*GENERATOR_USES, "data.label_column")))  # labels: the summary's violation rate


def samples_stage(ctx: Round, inp, responses: list[dict]) -> Done:
    """N responses per prompt for best-of-N pairs: the initial response plus N-1 more samples."""
    from lora_cai.engine.generation import GenerationStats, make_progress
    from lora_cai.core.store import JsonlStage

    cfg, k, done = ctx.cfg, ctx.k, Done()
    items = [r for r in responses if r["response"] is not None]
    extra = cfg.pairs.n_samples - 1
    stage = JsonlStage(ctx.dir / "samples.jsonl", inp.hash)
    stats = GenerationStats()
    if not stage.complete:
        done.ran = True
        g = cfg.generation
        n = cfg.pairs.sample_demonstrations
        contexts = sample_contexts(ctx.data.constitution, n, n > 0 and cfg.pairs.contrast)  # read where it counts
        convs = [contexts[j % len(contexts)] + [{"role": "user", "content": r["prompt"]}]
                 for r in items for j in range(extra)]
        with timed(done.timing), peak_memory(done.summary, "samples"), make_progress(console=ctx.console) as progress:
            for batch, outs in ctx.models.generator(cfg, k, ctx.stack).pin(stage).iter(
                    convs, max_new_tokens=g.max_new_tokens, temperature=max(g.temperature, 0.7), top_p=g.top_p,
                    seed=cfg.seed + 7919 * k + 1, skip_batches=stage.done_batches, stats=stats,
                    progress=progress, description=f"round {k} samples"):
                stage.commit([{"id": items[i // extra]["id"], "sample": 1 + i % extra, "response": text,
                               "batch": batch} for i, text in outs], batch)
        stage.finish()
        done.timing["tokens_per_s"] = tokens_per_s(stats)
    out = {r["id"]: {"prompt": r["prompt"], "responses": [r["response"]]} for r in items}
    for s in sorted(stage.records(), key=lambda s: (s["id"], s["sample"])):
        if s["response"] and s["response"].strip():
            out[s["id"]]["responses"].append(s["response"])
    done.outputs = out
    done.summary["samples"] = sum(len(v["responses"]) for v in out.values())
    return done


SAMPLES_STAGE = Stage(
    "samples", samples_stage, files=("samples.jsonl", "samples.jsonl.meta.json"), takes=("responses",),
    restartable=False,  # --restart-from responses redoes it
    reads=Decl(settings=(*GENERATOR, "generation.max_new_tokens", "generation.temperature", "generation.top_p", "seed",
                         "pairs.n_samples", "pairs.sample_demonstrations",
                         If(lambda c: c.pairs.sample_demonstrations > 0, "pairs.contrast")),
               data=(If(lambda c: c.pairs.sample_demonstrations > 0, "constitution"),
                     If(lambda c: c.pairs.sample_demonstrations > 0 and c.pairs.contrast, "refusal_detector")),
               after=("responses",), uses=(*GENERATOR_USES, "pairs.builder"),
               exists=lambda c: c.pairs.builder != "revision"))


def sample_contexts(constitution, n: int, contrast: bool) -> list[list[dict]]:
    """The earlier turns each extra sample sees, in turn: the first `n` shared demonstrations; with `contrast`, those
    that refuse (by the evaluation's refusal detector) and those that answer, alternately."""
    from lora_cai.errors import UserError
    from lora_cai.cai.refusal import is_refusal

    if not contrast:
        return [_turns(constitution.demonstrations[:n])]
    demos = constitution.demonstrations[:n]
    refuses = [is_refusal(d.revision, d.prompt) for d in demos]
    refusing = [d for d, r in zip(demos, refuses) if r]
    answering = [d for d, r in zip(demos, refuses) if not r]
    if not refusing or not answering:
        raise UserError(f"pairs.contrast: the first {n} demonstrations of constitution {constitution.name!r} need "
                        f"at least one that refuses and one that answers (found {len(refusing)} and "
                        f"{len(answering)}); raise pairs.sample_demonstrations or set pairs.contrast: false")
    return [_turns(refusing), _turns(answering)]


def _turns(demonstrations) -> list[dict]:
    turns = []
    for d in demonstrations:
        turns += [{"role": "user", "content": d.prompt}, {"role": "assistant", "content": d.revision}]
    return turns

