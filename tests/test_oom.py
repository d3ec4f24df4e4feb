"""CUDA out-of-memory: the judge retries smaller batches; training stops with one line and the planner's advice."""

from __future__ import annotations

import pytest

from lora_cai.engine.judges import LogprobJudge, judge_messages


class _OOMAbove:
    """The tiny model, except that a forward pass over more than `limit` rows raises CUDA OOM (the error
    PyTorch raises when a GPU runs out of memory; no GPU here)."""

    def __init__(self, model, limit: int):
        self.model, self.limit, self.sizes = model, limit, []
        self.config = model.config

    def parameters(self):
        return self.model.parameters()

    def __call__(self, *, input_ids, **kw):
        import torch

        self.sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return self.model(input_ids=input_ids, **kw)


def test_judge_halves_its_batch_on_oom_and_gets_the_same_labels(tiny):
    model, tok = tiny
    convs = [judge_messages("Which is better?", f"question {i}", f"answer {i}", f"reply {i * 3}") for i in range(12)]
    expected = LogprobJudge(model, tok, kind="self").score(convs)
    flaky = _OOMAbove(model, limit=3)
    got = LogprobJudge(flaky, tok, kind="self", max_batch_size=12).score(convs)
    assert got == pytest.approx(expected, abs=1e-6)
    assert max(flaky.sizes) == 12 and any(s <= 3 for s in flaky.sizes)


def test_training_oom_is_one_line_with_the_planners_advice(tiny_model, tmp_path, monkeypatch, capsys):
    import torch

    from conftest import write_recipe
    from lora_cai import recipe
    from lora_cai.stages import train as training

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    monkeypatch.setattr(training, "train_sft", oom)
    path = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "run", rounds="1",
                        eval="{capability_limit: 0, critic_check: false}")
    rc = recipe.main([str(path), "--set", "data.eval_limit=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: the GPU ran out of memory") and "--dry-run" in err[-1]
    assert "committed work is kept" in err[-1] and "Traceback" not in "\n".join(err)
    assert (tmp_path / "run" / "round-1" / "responses.jsonl.meta.json").exists()  # the work before it is kept
