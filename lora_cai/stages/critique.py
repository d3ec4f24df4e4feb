"""The critique -> revision loop (CAI phase 1): K steps, a seeded principle per step, early stop, SFT records and pairs.

Each step runs over every prompt still open: a batch of critiques, then that batch's revisions, then
one commit. A critique that opens with the constitution's no-change marker closes its prompt; a
critique or revision that copies a few-shot demonstration (small models do) closes it too and keeps it
out of training. Principles are drawn per (seed, prompt id, step), so a resumed or reordered run
draws the same ones.
"""

from __future__ import annotations

import difflib
import hashlib
import random
import re
from typing import TYPE_CHECKING

from lora_cai.cai.constitution import Constitution, Demonstration, Principle
from lora_cai.engine.generation import GenerationStats
from lora_cai.core.store import JsonlStage, content_hash
from lora_cai.core.inputs import API_USES, CRITIC, GENERATOR_USES, TEACHER_USES, Decl
from lora_cai.core.stage import Stage

if TYPE_CHECKING:
    from lora_cai.core.stage import Done


def pick_principle(constitution: Constitution, seed: int, prompt_id: str, step: int) -> Principle:
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{step}".encode()).digest()
    return random.Random(digest).choice(constitution.principles)


def critique_request(constitution: Constitution, principle: Principle) -> str:
    """The principle's critique request, told how to say "nothing to change" (the marker the loop stops on)."""
    return f"{principle.critique} If nothing needs to change, begin with \"{constitution.no_change_marker}\"."


def _demo_turns(constitution: Constitution, demos: list[Demonstration], principle: Principle) -> list[dict]:
    turns = []
    ask = critique_request(constitution, principle)
    for d in demos:
        turns += [{"role": "user", "content": d.prompt}, {"role": "assistant", "content": d.response},
                  {"role": "user", "content": ask}, {"role": "assistant", "content": d.critique},
                  {"role": "user", "content": principle.revision}, {"role": "assistant", "content": d.revision}]
    return turns


def critique_messages(constitution: Constitution, principle: Principle, prompt: str, response: str,
                      n_demos: int) -> list[dict]:
    demos = constitution.demos_for(principle)[:n_demos]
    return _demo_turns(constitution, demos, principle) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": response},
        {"role": "user", "content": critique_request(constitution, principle)}]


def revision_messages(constitution: Constitution, principle: Principle, prompt: str, response: str,
                      critique: str, n_demos: int) -> list[dict]:
    return critique_messages(constitution, principle, prompt, response, n_demos) + [
        {"role": "assistant", "content": critique}, {"role": "user", "content": principle.revision}]


def run_critique_step(generator, constitution: Constitution, items: list[dict], step: int, stage: JsonlStage,
                      *, cfg, seed: int, progress=None, stats: GenerationStats, where: str = "critique") -> None:
    """One critique -> revision step over `items` ({id, prompt, response}), committed batch by batch to `stage`.

    `generator` is a `generators.LocalGenerator` or `APIGenerator`. On a server, a request that failed for good
    gives the record status `failed` with its `error`, each record notes its `requests`, and the step stops
    (`api.stop_if_failing`, before the batch's commit) once its failed calls exceed `judge.max_failures`.
    """
    server = hasattr(generator, "calls")
    left = len(items) - sum(len(b) for b in _committed(generator, items, stage)) if server else 0
    gen, crit = cfg.generation, cfg.critique
    principles = [pick_principle(constitution, seed, it["id"], step) for it in items]
    conversations = [critique_messages(constitution, p, it["prompt"], it["response"], crit.demonstrations)
                     for it, p in zip(items, principles)]
    demo_critiques = [d.critique for d in constitution.demonstrations] + [
        d.critique for p in constitution.principles for d in p.demonstrations]
    demo_revisions = [d.revision for d in constitution.demonstrations] + [
        d.revision for p in constitution.principles for d in p.demonstrations]
    for batch, outputs in generator.iter(
            conversations, max_new_tokens=gen.critique_max_new_tokens, temperature=crit.temperature,
            top_p=gen.top_p, seed=seed * 1000 + step * 2, skip_batches=stage.done_batches, stats=stats,
            progress=progress, description=f"critique step {step}"):
        records, to_revise = [], []
        failed = dict(generator.errors) if server else {}
        for i, critique in outputs:
            it, p = items[i], principles[i]
            rec = {"id": it["id"], "step": step, "principle": p.name, "critique": critique, "revision": None,
                   "status": "revise", "batch": batch}
            if server:
                rec["requests"] = 1
            if i in failed:
                rec["status"], rec["error"] = "failed", failed[i]
            elif critique is None:
                rec["status"] = "too_long"
            elif not critique.strip():
                rec["status"] = "empty"
            elif copies_demonstration(critique, demo_critiques):
                rec["status"] = "copied_demonstration"  # checked first: a copied no-change demo says nothing
            elif constitution.is_no_change(critique):
                rec["status"] = "no_change"
            elif copies_demonstration(critique, [it["response"]]):
                rec["status"] = "copied_response"  # small models echo the answer instead of critiquing it
            else:
                to_revise.append((len(records), revision_messages(constitution, p, it["prompt"], it["response"],
                                                                   critique, crit.demonstrations)))
            records.append(rec)
        if server:  # a dead server stops the step before its revisions are even asked for
            from lora_cai.engine.calls import stop_if_failing

            left -= len(outputs)
            stop_if_failing(generator.calls, generator.calls.requests + len(to_revise) + 2 * left,
                            cfg.judge.max_failures, where=where, who="critic", url=generator.client.base_url)
        if to_revise:
            for _, rev_out in generator.iter(
                    [m for _, m in to_revise], max_new_tokens=gen.max_new_tokens, temperature=crit.temperature,
                    top_p=gen.top_p, seed=seed * 1000 + step * 2 + 1 + batch * 7919, stats=stats):
                rev_failed = dict(generator.errors) if server else {}
                for j, text in rev_out:
                    rec = records[to_revise[j][0]]
                    revision = clean_revision(text) if text else ""
                    if server:
                        rec["requests"] = 2
                    if j in rev_failed:
                        rec["status"], rec["error"] = "failed", rev_failed[j]
                    elif text is None:
                        rec["status"] = "too_long"
                    elif not revision:
                        rec["status"] = "empty"
                    elif copies_demonstration(revision, demo_revisions):
                        rec["status"] = "copied_demonstration"
                    rec["revision"] = revision or None
        if server:  # before the commit: a batch past the limit is redone by the rerun
            stop_if_failing(generator.calls, generator.calls.requests + 2 * left, cfg.judge.max_failures,
                            where=where, who="critic", url=generator.client.base_url)
        stage.commit(records, batch)


def _committed(generator, items: list[dict], stage: JsonlStage) -> list[range]:
    """The slices of `items` a server generator's batches already committed to `stage` (skipped on resume)."""
    size = generator.batch_size
    return [range(b * size, min((b + 1) * size, len(items))) for b in stage.done_batches if b * size < len(items)]


# A step ending in one of these never critiqued anything ("failed": the critic's server did not answer).
UNUSABLE = frozenset({"copied_demonstration", "copied_response", "empty", "too_long", "failed"})


def assemble(responses: list[dict], steps: list[list[dict]], constitution: Constitution) -> list[dict]:
    """Trajectories {id, prompt, initial, steps, final, stopped_early, usable} from the stage outputs.

    A trajectory ends at its first step that is not a revision. It is usable for training unless that is
    step 1 and the critique was unusable (a copy, empty, too long): then nothing was ever critiqued.
    """
    by_step = [{r["id"]: r for r in s} for s in steps]
    out = []
    for r in responses:
        current, traj_steps, stopped, usable = r["response"], [], False, r["response"] is not None
        for s in by_step:
            rec = s.get(r["id"])
            if rec is None:
                break
            traj_steps.append({k: rec[k] for k in ("step", "principle", "critique", "revision", "status")})
            if rec["status"] == "revise" and rec["revision"]:
                current = rec["revision"]
                continue
            stopped = rec["status"] == "no_change"
            if rec["status"] in UNUSABLE and len(traj_steps) == 1:
                usable = False  # no real critique ever happened; a later bad step keeps the last good revision
            break
        out.append({"id": r["id"], "prompt": r["prompt"], "initial": r["response"], "steps": traj_steps,
                    "final": current, "stopped_early": stopped, "usable": usable})
    return out


def sft_records(trajectories: list[dict]) -> list[dict]:
    """(prompt, final revision) for every usable trajectory: CAI's SFT data."""
    return [{"id": t["id"], "prompt": t["prompt"], "completion": t["final"]}
            for t in trajectories if t["usable"] and t["final"] and t["final"].strip()]


def revision_pairs(trajectories: list[dict]) -> list[dict]:
    """chosen = final revision, rejected = initial response; identical or unusable pairs dropped."""
    pairs = []
    for t in trajectories:
        if not t["usable"] or not t["final"] or not t["initial"]:
            continue
        if t["final"].strip() == t["initial"].strip():
            continue
        principle = next((s["principle"] for s in reversed(t["steps"]) if s["status"] == "revise"), None)
        pairs.append({"id": t["id"], "prompt": t["prompt"], "chosen": t["final"], "rejected": t["initial"],
                      "source": "revision", "principle": principle, "p_chosen": 1.0, "judge": None})
    return pairs


def critique_stage(ctx, inp, responses: list[dict]) -> Done:
    """K critique -> revision steps over the round's responses (critique-<s>.jsonl, committed per batch), then
    the trajectories (trajectories.jsonl) that SFT records and revision pairs are read from.

    Step s works on the prompts step s-1 revised; its input hash chains the stage's hash, the step and the
    previous step's file, so a resumed step sees exactly the prompts it saw before.
    """
    from lora_cai.engine.generation import make_progress
    from lora_cai.core.stage import Done, peak_memory, timed, tokens_per_s
    from lora_cai.core.store import file_hash, write_jsonl_atomic

    cfg, k, done = ctx.cfg, ctx.k, Done()
    constitution = ctx.data.constitution
    stats = GenerationStats()
    step_records: list[list[dict]] = []
    upstream = inp.hash
    current = {r["id"]: r for r in responses if r["response"] is not None}
    with timed(done.timing):
        for s in range(1, cfg.critique.steps + 1):
            items = [{"id": i, "prompt": r["prompt"], "response": r["response"]} for i, r in current.items()]
            st = JsonlStage(ctx.dir / f"critique-{s}.jsonl", content_hash([upstream, s]))
            if not st.complete and items:
                done.ran = True
                with peak_memory(done.summary, f"critique-{s}"), make_progress(console=ctx.console) as progress:
                    run_critique_step(ctx.models.critic_generator(cfg, k, ctx.stack).pin(st), constitution, items, s, st,
                                      cfg=cfg, seed=cfg.seed + k, progress=progress, stats=stats,
                                      where=f"round {k} critique step {s}")
            if not st.complete:
                done.ran = True
                st.finish(generation=stats.as_dict())
            recs = st.records()
            step_records.append(recs)
            upstream = content_hash([upstream, file_hash(st.path)])
            current = {r["id"]: {"prompt": current[r["id"]]["prompt"], "response": r["revision"]}
                       for r in recs if r["status"] == "revise" and r["revision"]}
        trajectories = assemble(responses, step_records, constitution)
        write_jsonl_atomic(ctx.dir / "trajectories.jsonl", trajectories)
    if done.ran:
        done.timing["tokens_per_s"] = tokens_per_s(stats)
    statuses = [r["status"] for recs in step_records for r in recs]
    done.summary.update({
        "critiques": len(statuses), "revisions": statuses.count("revise"),
        "no_change": statuses.count("no_change"), "copied_demonstration": statuses.count("copied_demonstration"),
        "copied_response": statuses.count("copied_response"), "empty": statuses.count("empty")})
    calls = critic_calls([r for recs in step_records for r in recs])
    if calls is not None:  # a server critiqued: what it did not answer, from the committed records
        done.summary["critic_calls"] = calls.as_dict()
    done.outputs = trajectories
    return done


# --------------------------------------------------------------------------------------------------
# Post-processing of critiques and revisions
# --------------------------------------------------------------------------------------------------


CRITIQUE_STAGE = Stage(
    "critique", critique_stage, files=("critique-*.jsonl", "critique-*.jsonl.meta.json", "trajectories.jsonl"),
    takes=("responses",),
    reads=Decl(settings=(*CRITIC, "critique.steps", "critique.demonstrations", "critique.temperature",
                         "generation.critique_max_new_tokens", "generation.max_new_tokens", "generation.top_p", "seed"),
               data=("constitution",), after=("responses",), uses=(*GENERATOR_USES, *API_USES, *TEACHER_USES)))


_COURTESY = r"(?:sure|okay|ok|certainly|of course|absolutely|alright|all right|great|got it|understood)\b[\s,!.:;-]*"
_REVISION_WORDS = r"(?:revis\w*|rewrit\w*|re-written|edit\w*|version|response|answer|reply)"
_PREAMBLES = [
    # "Here is the revised response:", "Sure, here's a rewritten version of the answer that removes ...:",
    # "I have revised the response to remove the harmful parts:"
    re.compile(r"^(?:" + _COURTESY + r")?(?:(?:here(?:'s|’s| is| are)|below is|this is)\s+(?:a|an|the|my|your|our)\s+"
               r"(?:[\w-]+\s+){0,3}?" + _REVISION_WORDS + r"|i(?:'ve|’ve| have)\s+(?:revised|rewritten|edited|updated))"
               r"\b[^\n:]{0,120}(?::|\n)", re.IGNORECASE),
    # "Revision:", "Revised response:", "**Rewritten Response:**", "Final revision 2 -"
    re.compile(r"^(?:\*\*|__|#+\s*)?(?:final\s+|new\s+)?(?:revised|rewritten|improved|updated|edited|corrected)?\s*"
               r"(?:revision|response|answer|version|reply)(?:\s*\d+)?\s*(?:\*\*|__)?\s*(?::|[-–—](?=\s))\s*(?:\*\*|__)?",
               re.IGNORECASE),
    # "Sure!" / "Certainly." alone on the first line, before a label or a body
    re.compile(r"^" + _COURTESY.replace(r"[\s,!.:;-]*", r"[,!.]*") + r"[ \t]*\n", re.IGNORECASE),
]
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "`": "`"}


def clean_revision(text: str) -> str:
    """Strip conversational preambles ("Here is the revised response:", "Sure, here's a revision:",
    "Revision:", "Revised response:", ...) and surrounding quotes from a revision; keep the body."""
    text = (text or "").strip()
    changed = True
    while changed and text:
        changed = False
        for pattern in _PREAMBLES:
            match = pattern.match(text)
            if match and match.end() > 0:
                text = text[match.end():].strip()
                changed = True
        if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
            text = text[1:-1].strip()
            changed = True
    return text


def _normalize(text: str) -> str:
    return " ".join((text or "").lower().split())


def copies_demonstration(text: str, demonstrations: list[str], *, threshold: float = 0.8) -> bool:
    """True when `text` is (nearly) a copy of one of the few-shot `demonstrations`.

    Texts are lowercased and whitespace-collapsed; a copy is a difflib ratio >= `threshold`, or one text
    containing the other when the shorter has at least 8 words. Small models often answer a critique with
    the last demonstration's words; the caller counts such outputs and keeps them out of training.
    """
    norm = _normalize(text)
    if not norm:
        return False
    for demo in demonstrations:
        d = _normalize(demo)
        if not d:
            continue
        shorter, longer = (norm, d) if len(norm) <= len(d) else (d, norm)
        if len(shorter.split()) >= 8 and shorter in longer:
            return True
        matcher = difflib.SequenceMatcher(None, norm, d, autojunk=False)
        if matcher.real_quick_ratio() >= threshold and matcher.quick_ratio() >= threshold \
                and matcher.ratio() >= threshold:
            return True
    return False


def critic_calls(records: list[dict]):
    """`api.Calls` of a server critic recounted from its committed critique records; None when no server wrote them."""
    from lora_cai.engine.calls import Calls

    marked = [r for r in records if "requests" in r]
    if not marked:
        return None
    failed = [r for r in marked if r["status"] == "failed"]
    return Calls(requests=sum(r["requests"] for r in marked), failures=len(failed),
                 last_error=failed[-1].get("error") if failed else None)
