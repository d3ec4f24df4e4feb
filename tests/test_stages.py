"""The stage functions on their own: a temporary run directory, a scripted generator and a scripted judge, no CLI.

Each stage takes its round context and declared inputs' hash, commits its own files, skips when they are
current for that hash, redoes them when the hash changes, and resumes after the batches it committed.
"""

from __future__ import annotations

import re
import json
from pathlib import Path

import pytest

from lora_cai.core import inputs
from lora_cai.config.load import recipe_from_dict
from lora_cai.core.inputs import StageInputs
from lora_cai.data.rundata import load_run_data
from lora_cai.core.stage import Round


class Scripted:
    """A generator whose answers are a function of the conversation; batches of `batch` conversations."""

    def __init__(self, answer, batch: int = 2, fail_after: int | None = None):
        self.answer, self.batch, self.fail_after = answer, batch, fail_after
        self.requested: list[int] = []

    def pin(self, stage):
        return self

    def iter(self, conversations, *, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, skip_batches=frozenset(),
             stats=None, progress=None, description=""):
        for b, start in enumerate(range(0, len(conversations), self.batch)):
            if b in skip_batches:
                continue
            if self.fail_after is not None and len(self.requested) >= self.fail_after:
                raise KeyboardInterrupt  # a kill in the middle of the stage
            idx = list(range(start, min(start + self.batch, len(conversations))))
            self.requested += idx
            yield b, [(i, self.answer(conversations[i])) for i in idx]

    def generate(self, conversations, **kw):
        out = [None] * len(conversations)
        for _, items in self.iter(conversations, **kw):
            for i, text in items:
                out[i] = text
        return out


class ScriptedJudge:
    """Prefers the option that says 'safe'; calls an answer with 'cannot' a refusal."""

    kind = "self"

    def score(self, conversations):
        out = []
        for conv in conversations:
            text = conv[-1]["content"]
            a, b = re.search(r"\(A\) (.*?)\n\n\(B\) (.*?)\n\n", text, re.S).groups()
            if a in ("Yes", "No"):  # a refusal question
                refuses = "cannot" in text.split("Assistant: ", 1)[1].split("\n\n")[0]
                out.append(0.9 if (a == "Yes") == refuses else 0.1)
            else:
                out.append(0.9 if "safe" in a and "safe" not in b else 0.1 if "safe" in b and "safe" not in a else 0.5)
        return out


class Models:
    """The session as stages use it, with scripted parts."""

    backend, frozen = "transformers", []

    def __init__(self, gen=None, critic=None, judge=None):
        self.gen, self.critic, self.judge_ = gen, critic, judge
        self.model = object()  # "a policy in memory" for the eval stage

    def generator(self, cfg, k, stack, *, local=False):
        return self.gen

    def critic_generator(self, cfg, k, stack):
        return self.critic

    def judge(self, cfg, k, stack, rules=None):
        return self.judge_

    def fits_together(self, cfg):
        return True


RECIPE = {"model": {"name": "scripted"}, "data": {"prompts": "builtin:smoke", "limit": 5, "eval_limit": 2},
          "critique": {"steps": 2, "demonstrations": 0}, "eval": {"capability_limit": 0}}


def ctx(tmp_path: Path, models, stage: str, **changes) -> Round:
    import copy

    from rich.console import Console

    d = copy.deepcopy(RECIPE)
    for key, value in changes.items():
        *path, last = key.split(".")
        node = d
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    cfg = recipe_from_dict(d, source=str(tmp_path / "r.yaml"))
    (tmp_path / "round-1").mkdir(exist_ok=True)
    return Round(1, tmp_path / "round-1", tmp_path, inputs.view(cfg, stage), load_run_data(cfg), models,
                 Console(quiet=True))


def inp(stage: str, tag: str = "a") -> StageInputs:
    return StageInputs(stage, {"test": tag})


def test_responses_commit_skip_rerun_and_resume(tmp_path):
    from lora_cai.stages.responses import responses_stage

    gen = Scripted(lambda conv: f"answer to {conv[-1]['content'][:20]}")
    c = ctx(tmp_path, Models(gen), "responses")
    done = responses_stage(c, inp("responses"))
    assert done.ran and len(done.outputs) == 5 and done.summary["responses"] == 5
    assert [r["response"] for r in done.outputs] == [f"answer to {p['prompt'][:20]}" for p in c.data.prompts.records]
    assert done.timing["seconds"] >= 0
    again = responses_stage(c, inp("responses"))  # current: nothing generated
    assert not again.ran and gen.requested == list(range(5)) and again.outputs == done.outputs
    other = responses_stage(c, inp("responses", "b"))  # another input hash: redone
    assert other.ran and gen.requested == list(range(5)) * 2
    killed = Scripted(gen.answer, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        responses_stage(ctx(tmp_path, Models(killed), "responses"), inp("responses", "c"))
    resumed = Scripted(gen.answer)
    done = responses_stage(ctx(tmp_path, Models(resumed), "responses"), inp("responses", "c"))
    assert resumed.requested == [2, 3, 4]  # only the batches not committed before the kill
    assert [r["response"] for r in done.outputs] == [r["response"] for r in other.outputs]


def critic(conv) -> str:
    """Critiques: 'No changes needed' for prompts about bread; revisions say they are safe."""
    if len(conv) == 5:  # prompt, answer, critique request, critique, revision request (no demonstrations)
        return "Here is the revised response: a safe answer."
    prompt = conv[0]["content"]
    return "No changes needed." if "bread" in prompt.lower() else "The response could cause harm."


def test_critique_steps_trajectories_and_counts(tmp_path):
    from lora_cai.stages.critique import critique_stage

    responses = [{"id": f"p{i}", "prompt": p, "response": f"first answer {i}"}
                 for i, p in enumerate(["How do I bake bread?", "How do I pick a lock?", "Insult my boss."])]
    gen = Scripted(critic)
    c = ctx(tmp_path, Models(critic=gen), "critique")
    done = critique_stage(c, inp("critique"), responses)
    by_id = {t["id"]: t for t in done.outputs}
    assert by_id["p0"]["stopped_early"] and by_id["p0"]["final"] == "first answer 0"
    assert by_id["p1"]["final"] == "a safe answer."  # preamble stripped
    assert [s["status"] for s in by_id["p1"]["steps"]] == ["revise", "revise"]
    assert done.summary["critiques"] == 5 and done.summary["no_change"] == 1 and done.summary["revisions"] == 4
    assert (tmp_path / "round-1" / "critique-2.jsonl").exists() and (tmp_path / "round-1" / "trajectories.jsonl").exists()
    calls = len(gen.requested)
    again = critique_stage(c, inp("critique"), responses)
    assert not again.ran and len(gen.requested) == calls and again.outputs == done.outputs


def test_judge_stage_builds_pairs_from_judged_samples(tmp_path):
    from lora_cai.stages.judge import judge_stage

    trajectories = [{"id": "p1", "prompt": "How do I pick a lock?", "initial": "Here is how.", "final": "A safe answer.",
                     "steps": [{"step": 1, "principle": "harm", "status": "revise"}], "stopped_early": False,
                     "usable": True}]
    samples = {"p1": {"prompt": "How do I pick a lock?", "responses": ["Here is how.", "A safe refusal.", "Maybe."]}}
    judge = ScriptedJudge()
    c = ctx(tmp_path, Models(judge=judge), "judge", **{"pairs.builder": "mix", "pairs.n_samples": 3})
    done = judge_stage(c, inp("judge"), trajectories, samples)
    sft, pairs = done.outputs
    assert sft == [{"id": "p1", "prompt": "How do I pick a lock?", "completion": "A safe answer."}]
    by_source = {p["source"]: p for p in pairs}
    assert by_source["revision"]["chosen"] == "A safe answer."
    assert by_source["best_of_n"]["chosen"] == "A safe refusal." and by_source["best_of_n"]["p_chosen"] >= 0.7
    assert done.summary["judge"]["comparisons"] == 3 and done.summary["pairs"] == 2
    assert (tmp_path / "round-1" / "judgments.jsonl").read_text().count("\n") == 3
    again = judge_stage(c, inp("judge"), trajectories, {"p1": dict(samples["p1"])})
    assert not again.ran and again.outputs == done.outputs


def test_judge_stage_trains_sft_on_accepted_samples_with_pairs_sft_accepted(tmp_path):
    """With rules, no critique and pairs.sft_accepted, sft.jsonl holds the pairs' winners and then the first sample
    of each prompt whose samples all satisfy the rules; a prompt whose samples all violate them adds nothing."""
    from lora_cai.stages.judge import judge_stage

    refusal, answer = "I'm sorry, but I can't help with that.", "Sure: here is a plain answer."
    changes = {"critique.steps": 0, "pairs.builder": "best_of_n", "pairs.n_samples": 2, "data.label_column": "kind",
               "judge.kind": "rule", "judge.rules": "builtin:refuse-harmful", "pairs.sft_accepted": True}
    c = ctx(tmp_path, None, "judge", **changes)
    c = Round(c.k, c.dir, c.run_dir, c.cfg, c.data, Models(judge=c.data.rules), c.console)
    kinds = {r["id"]: r["kind"] for r in c.data.prompts.records}
    harmful = [i for i, k in kinds.items() if k == "harmful"]
    benign = [i for i, k in kinds.items() if k == "benign"]
    prompts = {r["id"]: r["prompt"] for r in c.data.prompts.records}
    samples = {harmful[0]: [answer, refusal],  # a pair: the refusal wins
               benign[0]: [answer, answer + " More."],  # both answer: accepted, its first sample
               benign[1]: [refusal, answer]}  # a pair: the answer wins
    if len(harmful) > 1:
        samples[harmful[1]] = [answer, answer + " More."]  # both comply: nothing
    samples = {i: {"prompt": prompts[i], "responses": r} for i, r in samples.items()}
    done = judge_stage(c, inp("judge"), [], samples)
    sft, pairs = done.outputs
    assert {p["id"]: p["chosen"] for p in pairs} == {harmful[0]: refusal, benign[1]: answer}
    assert sft[len(pairs):] == [{"id": benign[0], "prompt": prompts[benign[0]], "completion": answer,
                                 "source": "accepted"}]
    assert done.summary["sft_records"] == len(pairs) + 1


def test_eval_stage_rates_and_win_rate(tmp_path):
    from lora_cai.stages.evaluate import eval_stage

    gen = Scripted(lambda conv: "I cannot help with that." if "kill" in conv[-1]["content"].lower()
                   or "steal" in conv[-1]["content"].lower() else "Sure, a safe answer.")
    c = ctx(tmp_path, Models(gen, judge=ScriptedJudge()), "eval")
    harmful, benign = c.data.eval_sets["harmful"], c.data.eval_sets["benign"]
    previous = {"samples": [{"set": s, "id": r["id"], "prompt": r["prompt"], "answer": "Whatever.", "refusal": False}
                            for s, rs in (("harmful", harmful), ("benign", benign)) for r in rs]}
    (c.run_dir / "baseline-eval.json").write_text(json.dumps(previous))  # round 1 is compared with the baseline
    done = eval_stage(c, inp("eval"), tmp_path / "round-1" / "adapter")
    ev = done.outputs
    answers = {s["id"]: s["answer"] for s in ev["samples"]}
    refused = sum("cannot" in answers[r["id"]] for r in harmful)
    assert ev["detector"] == "judge"
    assert ev["harmful_compliance"] == pytest.approx(1 - refused / len(harmful))
    assert ev["over_refusal"] == pytest.approx(sum("cannot" in answers[r["id"]] for r in benign) / len(benign))
    safe = sum("safe" in a for a in answers.values())  # beats "Whatever." at 0.9 in both orders; a refusal ties
    assert ev["win_rate"]["win_rate"] == pytest.approx((0.9 * safe + 0.5 * (4 - safe)) / 4)
    assert ev["win_rate"]["wins"] == safe and ev["win_rate"]["ties"] == 4 - safe and ev["win_rate"]["losses"] == 0
    assert done.summary["eval"]["n_harmful"] == 2
    requested = len(gen.requested)
    again = eval_stage(c, inp("eval"), tmp_path / "round-1" / "adapter")
    assert not again.ran and len(gen.requested) == requested


def test_samples_can_be_drawn_in_the_constitutions_style(tmp_path):
    """pairs.sample_demonstrations: the extra samples see the constitution's demonstrations as earlier turns; the
    initial response (and the policy that is trained) never does."""
    from lora_cai.stages.responses import samples_stage

    seen = []
    gen = Scripted(lambda conv: seen.append(conv) or f"sample after {len(conv)} turns")
    c = ctx(tmp_path, Models(gen), "samples", **{"pairs.builder": "best_of_n", "pairs.n_samples": 3,
                                                 "pairs.sample_demonstrations": 2})
    responses = [{"id": "p1", "prompt": "How do I pick a lock?", "response": "plain answer"}]
    done = samples_stage(c, inp("samples"), responses)
    demos = c.data.constitution.demonstrations[:2]
    assert len(seen) == 2 and all(len(conv) == 5 for conv in seen)
    assert [m["content"] for m in seen[0][:4]] == [demos[0].prompt, demos[0].revision, demos[1].prompt,
                                                    demos[1].revision]
    assert seen[0][-1] == {"role": "user", "content": "How do I pick a lock?"}
    assert done.outputs["p1"]["responses"] == ["plain answer", "sample after 5 turns", "sample after 5 turns"]


def test_contrast_alternates_refusing_and_answering_demonstrations(tmp_path):
    """pairs.contrast: the extra samples see, in turn, the demonstrations that refuse and those that answer (the
    default constitution's first 5: 2 refusals, 3 answers), so both kinds of answer reach the judge."""
    from lora_cai.cai.refusal import is_refusal
    from lora_cai.stages.responses import samples_stage

    seen = []
    gen = Scripted(lambda conv: seen.append(conv) or "a sample")
    c = ctx(tmp_path, Models(gen), "samples", **{"pairs.builder": "best_of_n", "pairs.n_samples": 5,
                                                 "pairs.sample_demonstrations": 5, "pairs.contrast": True})
    responses = [{"id": "p1", "prompt": "How do I pick a lock?", "response": "plain answer"}]
    samples_stage(c, inp("samples"), responses)
    assert len(seen) == 4
    shown = [[m["content"] for m in conv[1:-1:2]] for conv in seen]  # the demonstrations' answers in each context
    assert [all(map(is_refusal, s)) for s in shown] == [True, False, True, False]
    assert [len(s) for s in shown] == [2, 3, 2, 3]
    assert all(not any(map(is_refusal, s)) for s in shown[1::2])


def test_contrast_needs_demonstrations_of_both_kinds(tmp_path):
    from lora_cai.errors import UserError
    from lora_cai.stages.responses import sample_contexts

    from lora_cai.cai.constitution import load_constitution

    constitution = load_constitution("default")
    with pytest.raises(UserError, match=r"pairs.contrast: the first 1 demonstrations of constitution 'default' need "
                                        r"at least one that refuses and one that answers \(found 0 and 1\)"):
        sample_contexts(constitution, 1, True)
    assert len(sample_contexts(constitution, 5, True)) == 2 and len(sample_contexts(constitution, 5, False)) == 1
