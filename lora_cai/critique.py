"""The critique -> revision loop (CAI phase 1): K steps, a seeded principle per step, early stop, SFT records and pairs.

Each step runs over every prompt still open: a batch of critiques, then that batch's revisions, then
one commit. A critique that opens with the constitution's no-change marker closes its prompt; a
critique or revision that copies a few-shot demonstration (small models do) closes it too and keeps it
out of training. Principles are drawn per (seed, prompt id, step), so a resumed or reordered run
draws the same ones.
"""

from __future__ import annotations

import hashlib
import random

from .constitution import Constitution, Demonstration, Principle
from .generation import GenerationStats, clean_revision, copies_demonstration
from .store import JsonlStage, content_hash


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
                      *, cfg, seed: int, progress=None, stats: GenerationStats) -> None:
    """One critique -> revision step over `items` ({id, prompt, response}), committed batch by batch to `stage`.

    `generator` is a `generators.LocalGenerator` or `APIGenerator`.
    """
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
        for i, critique in outputs:
            it, p = items[i], principles[i]
            rec = {"id": it["id"], "step": step, "principle": p.name, "critique": critique, "revision": None,
                   "status": "revise", "batch": batch}
            if critique is None:
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
        if to_revise:
            for _, rev_out in generator.iter(
                    [m for _, m in to_revise], max_new_tokens=gen.max_new_tokens, temperature=crit.temperature,
                    top_p=gen.top_p, seed=seed * 1000 + step * 2 + 1 + batch * 7919, stats=stats):
                for j, text in rev_out:
                    rec = records[to_revise[j][0]]
                    revision = clean_revision(text) if text else ""
                    if text is None:
                        rec["status"] = "too_long"
                    elif not revision:
                        rec["status"] = "empty"
                    elif copies_demonstration(revision, demo_revisions):
                        rec["status"] = "copied_demonstration"
                    rec["revision"] = revision or None
        stage.commit(records, batch)


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
            if rec["status"] in {"copied_demonstration", "copied_response", "empty", "too_long"} and len(traj_steps) == 1:
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


def step_inputs_hash(cfg, constitution: Constitution, upstream: str, step: int) -> str:
    return content_hash({"generation": cfg.generation.model_dump(), "critique": cfg.critique.model_dump(),
                         "constitution": constitution.hash(), "upstream": upstream, "step": step, "seed": cfg.seed})
