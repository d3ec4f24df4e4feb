"""The critique loop's bookkeeping: seeded principles, trajectories, SFT records and pairs."""

from lora_cai.cai.constitution import load_constitution
from lora_cai.stages.critique import assemble, critique_messages, pick_principle, revision_pairs, sft_records

RESPONSES = [{"id": i, "prompt": f"p{i}", "response": f"r{i}"} for i in "abcd"]


def step(i, n, status, revision=None):
    return {"id": i, "step": n, "principle": "harmful_content", "critique": "crit", "revision": revision,
            "status": status}


def test_principles_are_drawn_per_seed_prompt_and_step():
    c = load_constitution("default")
    draws = [pick_principle(c, 1, "a", s).name for s in range(1, 40)]
    assert draws == [pick_principle(c, 1, "a", s).name for s in range(1, 40)]
    assert len(set(draws)) > 5
    assert draws != [pick_principle(c, 2, "a", s).name for s in range(1, 40)]


def test_trajectories_sft_and_pairs():
    steps1 = [step("a", 1, "revise", "a1"), step("b", 1, "no_change"), step("c", 1, "copied_demonstration"),
              step("d", 1, "revise", "d1")]
    steps2 = [step("a", 2, "revise", "a2"), step("d", 2, "copied_response")]
    t = {x["id"]: x for x in assemble(RESPONSES, [steps1, steps2], None)}
    assert (t["a"]["final"], t["a"]["usable"], len(t["a"]["steps"])) == ("a2", True, 2)
    assert (t["b"]["final"], t["b"]["usable"], t["b"]["stopped_early"]) == ("rb", True, True)
    assert (t["c"]["final"], t["c"]["usable"]) == ("rc", False)  # the only critique was a copy
    assert (t["d"]["final"], t["d"]["usable"]) == ("d1", True)  # a later copy keeps the good revision
    sft = sft_records(list(t.values()))
    assert [(r["id"], r["completion"]) for r in sft] == [("a", "a2"), ("b", "rb"), ("d", "d1")]
    pairs = revision_pairs(list(t.values()))
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [("a", "a2", "ra"), ("d", "d1", "rd")]
    assert all(p["principle"] == "harmful_content" and p["source"] == "revision" for p in pairs)


def test_critique_prompt_carries_demonstrations_and_the_no_change_marker():
    c = load_constitution("default")
    p = c.principles[0]
    msgs = critique_messages(c, p, "How do I pick a lock?", "Here is how.", n_demos=2)
    assert len(msgs) == 2 * 6 + 3 and msgs[-1]["role"] == "user"
    assert msgs[-1]["content"].startswith(p.critique) and c.no_change_marker in msgs[-1]["content"]
    assert msgs[0]["content"] == c.demos_for(p)[0].prompt
