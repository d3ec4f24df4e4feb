"""The refusal detector's version follows its decisions: a change of verdicts on a fixed corpus needs a version bump.

A run directory keeps the detector's verdicts (refusal labels, evaluation rates), and `REFUSAL_DETECTOR_VERSION` is a
declared input of the stages that use them, so a resumed run re-judges when the detector changed. That only works if
the version changes whenever a verdict does: 1ad963e and 8b4fc5a both changed verdicts as version 2. Here the
verdicts on tests/data/refusal_corpus.jsonl (the detector's test cases and answers the shipped recipes gave, with
their prompts) are written down per version; a change of verdicts without a new version fails.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_cai.cai.refusal import REFUSAL_DETECTOR_VERSION, is_refusal

CORPUS = Path(__file__).parent / "data" / "refusal_corpus.jsonl"
# One letter per corpus line, in order: R refusal, C compliance. A new detector version adds its line here.
VERDICTS = {
    2: "CCCCCCCCCRRRRRRRCCCCCCCCCCCRRRRRRRRRRCCRRCRRRR",
}


def verdicts() -> str:
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
    return "".join("R" if is_refusal(r["text"], r["prompt"]) else "C" for r in rows)


def test_verdicts_on_the_corpus_are_the_versions_own():
    got = verdicts()
    want = VERDICTS.get(REFUSAL_DETECTOR_VERSION)
    assert want is not None, (f"REFUSAL_DETECTOR_VERSION {REFUSAL_DETECTOR_VERSION} has no verdicts here: add "
                              f"{REFUSAL_DETECTOR_VERSION}: {got!r} to VERDICTS")
    rows = CORPUS.read_text().splitlines()
    changed = [f"line {i + 1}: {w}->{g} {json.loads(rows[i])['text'][:60]!r}"
               for i, (w, g) in enumerate(zip(want, got)) if w != g]
    assert got == want, ("the refusal detector's verdicts changed without a version bump: raise "
                         "evaluation.REFUSAL_DETECTOR_VERSION and add its verdicts here; changed: " + "; ".join(changed))


def test_versions_differ_in_what_they_decide_and_the_corpus_has_both_verdicts():
    assert len(set(VERDICTS.values())) == len(VERDICTS)  # a bump without a changed verdict would re-judge for nothing
    assert {"R", "C"} <= set(verdicts())
    kinds = {json.loads(line)["kind"] for line in CORPUS.read_text().splitlines()}
    assert kinds == {"refuse_then_comply", "refusal", "not_refusal", "pivot_back", "redirect", "recipe_answer"}


def test_a_changed_verdict_is_caught(monkeypatch):
    """What the test guards: a detector that decides one corpus line otherwise, at the same version, fails it."""
    import lora_cai.cai.refusal as ev
    import pytest

    first = json.loads(CORPUS.read_text().splitlines()[0])["text"]
    plain = ev.is_refusal
    monkeypatch.setattr(f"{__name__}.is_refusal", lambda text, prompt=None: (not plain(text, prompt))
                        if text == first else plain(text, prompt))
    with pytest.raises(AssertionError, match="line 1: C->R"):
        test_verdicts_on_the_corpus_are_the_versions_own()
