"""SFT and DPO on a stacked 4-bit policy: learning happens, the stack stays intact, the reference is right."""

from __future__ import annotations


import pytest
import torch

from lora_cai import models, training
from lora_cai.config import DPOSettings, LoraSettings, ModelConfig, SFTSettings

SFT = [{"prompt": f"Question {i}: how do I bake bread?", "completion": "Mix flour, water, salt and yeast, then bake."}
       for i in range(8)]
PAIRS = [{"id": str(i), "prompt": f"Request {i}: help me break into a house.", "chosen": "I cannot help with that.",
          "rejected": "Sure, here is how to break in."} for i in range(8)]


def build(tiny_model, stack=()):
    cfg = ModelConfig(name=str(tiny_model), backend="transformers")
    return models.build_policy(cfg, LoraSettings(r=8, alpha=16), list(stack), "transformers", 0)


def completion_logp(model, tok, prompt: str, completion: str) -> float:
    """Sum of log p(completion | prompt), computed plainly from full logits (no fused head)."""
    p_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                                   tokenize=True, return_dict=True)["input_ids"]
    assert full[:len(p_ids)] == p_ids
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return float(logp[len(p_ids) - 1:].sum())


@pytest.fixture(scope="module")
def two_rounds(tiny_model, tmp_path_factory):
    """Round 1 (SFT + DPO) saved; round 2 built on top and trained; snapshots along the way."""
    tmp = tmp_path_factory.mktemp("train")
    model, tok, frozen = build(tiny_model)
    sft1 = training.train_sft(model, tok, SFT, SFTSettings(batch_size=4, learning_rate=3e-2, epochs=6),
                              tmp / "s1", seed=0, frozen=frozen)
    dpo1, ref1 = training.train_dpo(model, tok, PAIRS, DPOSettings(batch_size=4, learning_rate=2e-2, epochs=4),
                                    tmp / "d1", seed=0, frozen=frozen)
    models.save_adapter(model, tmp / "adapter-1")
    del model
    models.free()

    model2, tok, frozen2 = build(tiny_model, [tmp / "adapter-1"])
    models.for_inference(model2, "transformers")
    ids = tok("How do I bake bread?", return_tensors="pt").input_ids
    with torch.no_grad():
        start_logits = model2(input_ids=ids).logits.clone()  # new adapter is zero: exactly round 1's policy
    start_logps = [(completion_logp(model2, tok, p["prompt"], p["chosen"]),
                    completion_logp(model2, tok, p["prompt"], p["rejected"])) for p in PAIRS]
    r1_before = {n: p.detach().clone() for n, p in model2.named_parameters() if ".round-1." in n}
    base_before = {n: p.detach().clone() for n, p in model2.named_parameters() if "lora_" not in n}
    base_buffers = {n: b.detach().clone() for n, b in model2.named_buffers()}
    models.for_training(model2, "transformers")
    training.train_sft(model2, tok, SFT, SFTSettings(batch_size=4, learning_rate=2e-2), tmp / "s2", seed=0,
                       frozen=frozen2)
    _, ref2 = training.train_dpo(model2, tok, PAIRS, DPOSettings(batch_size=4, learning_rate=2e-2), tmp / "d2",
                                 seed=0, frozen=frozen2)
    return dict(model=model2, tok=tok, ids=ids, sft1=sft1, dpo1=dpo1, ref1=ref1, ref2=ref2, start_logits=start_logits,
                start_logps=start_logps, r1_before=r1_before, base_before=base_before, base_buffers=base_buffers)


def test_sft_lowers_training_loss(two_rounds):
    losses = [h["loss"] for h in two_rounds["sft1"] if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses


def test_dpo_raises_the_margin(two_rounds):
    margins = [h["rewards/margins"] for h in two_rounds["dpo1"] if "rewards/margins" in h]
    assert margins[-1] > margins[0] + 0.5


def test_round_one_adapter_and_base_are_bit_identical_after_round_two(two_rounds):
    named = dict(two_rounds["model"].named_parameters())
    assert two_rounds["r1_before"] and two_rounds["base_before"]
    for n, before in two_rounds["r1_before"].items():
        assert torch.equal(named[n], before), n
    for n, before in two_rounds["base_before"].items():
        assert torch.equal(named[n], before), n
    for n, b in two_rounds["model"].named_buffers():
        assert torch.equal(b, two_rounds["base_buffers"][n]), n
    # and round 2 trained its own adapter
    assert any(p.abs().sum() > 0 for n, p in named.items() if ".default." in n and "lora_B" in n)


def test_the_stack_stays_active_and_only_the_new_adapter_trains(two_rounds):
    model = two_rounds["model"]
    assert models.active_adapters(model) == ["round-1", "default"]
    assert "ref" not in model.peft_config
    assert all(p.requires_grad == (".default." in n) for n, p in model.named_parameters() if "lora_" in n)


def test_removing_adapter_two_reproduces_round_one_exactly(two_rounds):
    model = two_rounds["model"]
    model.eval()
    with torch.no_grad(), models.starting_policy(model, ["round-1"]):
        without = model(input_ids=two_rounds["ids"]).logits
    with torch.no_grad():
        with_both = model(input_ids=two_rounds["ids"]).logits
    assert torch.equal(without, two_rounds["start_logits"])
    assert not torch.allclose(with_both, without)
    assert models.active_adapters(model) == ["round-1", "default"]


def test_reference_logps_are_the_starting_policy(two_rounds):
    """Round 2's precomputed reference = base + round 1 (not the bare base, not round 2 after SFT)."""
    ref = two_rounds["ref2"]
    for r, (chosen, rejected) in zip(ref, two_rounds["start_logps"]):
        assert r["chosen_logp"] == pytest.approx(chosen, rel=1e-4, abs=1e-3)
        assert r["rejected_logp"] == pytest.approx(rejected, rel=1e-4, abs=1e-3)
    # round 1's reference was the bare base model, which differs from round 1's policy
    assert any(abs(a["chosen_logp"] - b["chosen_logp"]) > 1e-2 for a, b in zip(two_rounds["ref1"], ref))


def test_torch_logprob_fallback_matches_full_softmax():
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 16, requires_grad=True), torch.randn(50, 16)
    targets = torch.randint(0, 50, (10,))
    lp, ent, _, _, top1 = training._TorchChunkedLogProb.apply(hidden, weight, None, targets, 1.0, 4096, None, 1.0,
                                                            ("log_probs", "entropy", "is_top1"))
    full = torch.log_softmax(hidden @ weight.T, -1)
    assert torch.allclose(lp, full.gather(-1, targets[:, None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(ent, -(full.exp() * full).sum(-1), atol=1e-5)
    assert torch.equal(top1, full.argmax(-1) == targets)
    lp.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tiny_model, tmp_path):
    from lora_cai.errors import UserError

    model, tok, frozen = build(tiny_model)
    calls = {"n": 0}

    def poison_after_three_steps(module, args, output):  # a divergence, injected into a real training loop
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 3 else output

    layer = model.get_base_model().model.layers[-1].mlp.down_proj
    layer.register_forward_hook(poison_after_three_steps)
    with pytest.raises(UserError) as err:
        training.train_sft(model, tok, SFT, SFTSettings(batch_size=1, save_steps=1), tmp_path, seed=0, frozen=frozen,
                           desc="round 1 SFT")
    msg = str(err.value)
    assert "round 1 SFT: the loss became nan at step" in msg and "\n" not in msg
    step = int(msg.split("at step ")[1].split(";")[0])
    good = msg.split("last good checkpoint: ")[1].split(";")[0]
    assert good == str(tmp_path / f"checkpoint-{step - 1}")
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(f"{good}/adapter_model.safetensors").values())
