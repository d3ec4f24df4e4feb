"""SFT and DPO on a stacked 4-bit policy: learning happens, the stack stays intact, the reference is right."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from lora_cai.engine import models
from lora_cai.trainers.common import _common_args, _last_checkpoint, _quiet, _report_to
from lora_cai.trainers.dpo import _stack_dpo_trainer_class
from lora_cai.trainers.logprob import _TorchChunkedLogProb, install_logprob_fallback
from lora_cai.trainers.losses import pair_rows, preference_losses, trl_objective
from lora_cai.trainers.sft import train_sft
from lora_cai.trainers import dpo
from lora_cai.config.schema import DPOSettings, LoraSettings, ModelConfig, SFTSettings

SFT = [{"prompt": f"Question {i}: how do I bake bread?", "completion": "Mix flour, water, salt and yeast, then bake."}
       for i in range(8)]
PAIRS = [{"id": str(i), "prompt": f"Request {i}: help me break into a house.", "chosen": "I cannot help with that.",
          "rejected": "Sure, here is how to break in."} for i in range(8)]


def build(tiny_model, stack=()):
    cfg = ModelConfig(name=str(tiny_model), backend="transformers")
    return models.build_policy(cfg, LoraSettings(r=8, alpha=16), list(stack), "transformers", 0)


def frozen_slices(model) -> dict[str, torch.Tensor]:
    """The earlier rounds' part of the policy's adapter (concatenated into `default`; `lora_cai.engine.concat`), copied."""
    from lora_cai.engine.concat import concat_of

    f = concat_of(model)
    assert f is not None and f.frozen_rank > 0
    return {n: (p[:f.frozen_rank] if ".lora_A." in n else p[:, :f.frozen_rank]).detach().clone()
            for n, p in model.named_parameters() if ".default." in n}


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
    sft1 = train_sft(model, tok, SFT, SFTSettings(batch_size=4, learning_rate=3e-2, epochs=6),
                              tmp / "s1", seed=0, frozen=frozen)
    dpo1, ref1 = dpo.train_dpo(model, tok, PAIRS, DPOSettings(batch_size=4, learning_rate=2e-2, epochs=4),
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
    r1_before = frozen_slices(model2)
    base_before = {n: p.detach().clone() for n, p in model2.named_parameters() if "lora_" not in n}
    base_buffers = {n: b.detach().clone() for n, b in model2.named_buffers()}
    models.for_training(model2, "transformers")
    train_sft(model2, tok, SFT, SFTSettings(batch_size=4, learning_rate=2e-2), tmp / "s2", seed=0,
                       frozen=frozen2)
    _, ref2 = dpo.train_dpo(model2, tok, PAIRS, DPOSettings(batch_size=4, learning_rate=2e-2), tmp / "d2",
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
    after = frozen_slices(two_rounds["model"])
    for n, before in two_rounds["r1_before"].items():
        assert torch.equal(after[n], before), n
    for n, before in two_rounds["base_before"].items():
        assert torch.equal(named[n], before), n
    for n, b in two_rounds["model"].named_buffers():
        assert torch.equal(b, two_rounds["base_buffers"][n]), n
    # and round 2 trained its own adapter
    assert any(p.abs().sum() > 0 for n, p in named.items() if ".default." in n and "lora_B" in n)


def test_the_stack_stays_active_and_only_the_new_adapter_trains(two_rounds):
    from lora_cai.engine.concat import concat_of

    model = two_rounds["model"]
    assert models.active_adapters(model) == ["default"] and list(model.peft_config) == ["default"]
    assert (concat_of(model).frozen_rank, concat_of(model).new_rank) == (8, 8)  # round 1 concatenated in front of round 2
    assert all(p.requires_grad == (".default." in n) for n, p in model.named_parameters() if "lora_" in n)


def test_removing_adapter_two_reproduces_round_one_exactly(two_rounds):
    model = two_rounds["model"]
    model.eval()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    with torch.no_grad(), models.starting_policy(model, []):  # the new slice off
        without = model(input_ids=two_rounds["ids"]).logits
    with torch.no_grad():
        with_both = model(input_ids=two_rounds["ids"]).logits
    assert torch.equal(without, two_rounds["start_logits"])
    assert not torch.allclose(with_both, without)
    assert models.active_adapters(model) == ["default"]
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)  # restored


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
    lp, ent, _, _, top1 = _TorchChunkedLogProb.apply(hidden, weight, None, targets, 1.0, 4096, None, 1.0,
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
        train_sft(model, tok, SFT, SFTSettings(batch_size=1, save_steps=1), tmp_path, seed=0, frozen=frozen,
                           desc="round 1 SFT")
    msg = str(err.value)
    assert "round 1 SFT: the loss became nan at step" in msg and "\n" not in msg
    step = int(msg.split("at step ")[1].split(";")[0])
    good = msg.split("last good checkpoint: ")[1].split(";")[0]
    assert good == str(tmp_path / f"checkpoint-{step - 1}")
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(f"{good}/adapter_model.safetensors").values())


# --------------------------------------------------------------------------------------------------
# Soft-label DPO (dpo.soft_labels) and logger pass-through
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def one_thread():
    """Tiny matrices: a second torch thread only adds contention on a shared 2-core machine (measured 2.5x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def soft_pairs(p: float | None) -> list[dict]:
    """PAIRS with a judged probability (None: no p_chosen key at all)."""
    return [dict(pair, **({} if p is None else {"p_chosen": p})) for pair in PAIRS]


def dpo_losses(tiny_model, out, pairs, *, trl_args: dict | None = None, stack=(), **settings):
    """Per-step losses of DPO on a fresh policy (round 1, or on `stack`; same seed, data, order every time) and
    the model.

    `trl_args` bypasses `train_dpo`: the same trainer built with extra DPOConfig arguments (TRL's own losses).
    """
    install_logprob_fallback()  # TRL's fused log-prob head needs Triton (train_dpo installs this too)
    model, tok, frozen = build(tiny_model, stack)
    settings = DPOSettings(**{"batch_size": 4, "learning_rate": 5e-3, "epochs": 2, **settings})
    if trl_args is None:
        history, _ = dpo.train_dpo(model, tok, pairs, settings, out, seed=0, frozen=frozen)
    else:
        from datasets import Dataset
        from trl import DPOConfig

        ds = Dataset.from_list(pair_rows(pairs))
        args = DPOConfig(**_common_args(settings, out, 0, model), **{"beta": settings.beta, **trl_args},
                         precompute_ref_log_probs=True, dataset_num_proc=None)
        trainer = _stack_dpo_trainer_class()(model=model, args=args, train_dataset=ds, processing_class=tok,
                                                      frozen_adapters=frozen)
        _quiet(trainer)
        trainer.train()
        history = trainer.state.log_history
    return [h["loss"] for h in history if "loss" in h], model


@pytest.fixture(scope="module")
def soft_runs(tiny_model, tmp_path_factory):
    """Per-step DPO losses of one fresh round-1 policy under each labelling, same seed, data and order."""
    tmp = tmp_path_factory.mktemp("soft")
    cdpo = dict(loss_type=["sigmoid", "robust"], loss_weights=[1.6, -0.6], label_smoothing=0.2)
    runs = {
        "target@0.8": dict(pairs=soft_pairs(0.8), soft_labels="target"),
        "trl cdpo 0.2": dict(pairs=PAIRS, trl_args=cdpo),
        "trl sigmoid ls 0.2": dict(pairs=PAIRS, trl_args=dict(label_smoothing=0.2)),
        "off@0.6": dict(pairs=soft_pairs(0.6)),
        "weight@missing": dict(pairs=soft_pairs(None), soft_labels="weight"),  # no p_chosen = 1.0
        "target@1": dict(pairs=soft_pairs(1.0), soft_labels="target"),
    }
    with one_thread():
        return {name: dpo_losses(tiny_model, tmp / str(i), **kw)[0] for i, (name, kw) in enumerate(runs.items())}


def test_soft_target_is_conservative_dpo_as_trl_computes_it(soft_runs):
    """`target` with every p = 0.8 = conservative DPO with eps = 0.2, step by step.

    TRL 1.15's `sigmoid` loss ignores `label_smoothing` (only robust/exo/aot read it), so the reference is
    TRL's own code on the identity cDPO = 2(1-eps) * sigmoid - (1-2eps) * robust, both with label_smoothing eps.
    """
    ours, trl = soft_runs["target@0.8"], soft_runs["trl cdpo 0.2"]
    assert len(ours) == len(trl) == 4
    assert ours == pytest.approx(trl, abs=1e-5)
    # TRL's label_smoothing alone changes nothing for the sigmoid loss ...
    assert soft_runs["trl sigmoid ls 0.2"] == pytest.approx(soft_runs["off@0.6"], abs=1e-6)
    # ... and the soft target really is a different objective from plain DPO
    assert abs(ours[-1] - soft_runs["off@0.6"][-1]) > 0.05


def test_soft_labels_off_ignores_p_and_soft_modes_at_p_one_are_trls_loss(soft_runs):
    """`off` is TRL's own sigmoid loss whatever p says; `weight`/`target` at p = 1 reproduce it step by step."""
    off = soft_runs["off@0.6"]
    assert len(off) == 4 and off[-1] < off[0] - 0.1
    assert soft_runs["weight@missing"] == pytest.approx(off, abs=1e-6)
    assert soft_runs["target@1"] == pytest.approx(off, abs=1e-6)


def test_soft_weight_half_confident_pairs_leave_the_adapter_unchanged(tiny_model, tmp_path):
    """`weight`: w = 2p - 1 = 0 at p = 0.5, so such pairs give exactly zero gradient; p = 0.75 pairs train."""
    with one_thread():
        losses, model = dpo_losses(tiny_model, tmp_path / "half", soft_pairs(0.5), soft_labels="weight",
                                   learning_rate=2e-2)
        _, trained = dpo_losses(tiny_model, tmp_path / "sure", soft_pairs(0.75), soft_labels="weight",
                                learning_rate=2e-2)
    fresh, _, _ = build(tiny_model)
    start = {n: p for n, p in fresh.named_parameters() if ".default." in n}
    after = {n: p for n, p in model.named_parameters() if ".default." in n}
    # TRL casts a quantized model's trainable LoRA weights to bfloat16 (QLoRA practice) when the trainer is built
    assert start and all(torch.equal(after[n], p.to(after[n].dtype)) for n, p in start.items())
    assert losses == [0.0] * 4
    moved = dict(trained.named_parameters())
    assert any(not torch.equal(moved[n], p.to(moved[n].dtype)) for n, p in start.items() if "lora_B" in n)


def soft_dpo_losses(margins, p, beta, mode):
    """Sigmoid DPO's per-pair losses for margins m (chosen log-ratio m, rejected 0)."""
    return preference_losses("sigmoid", margins, torch.zeros_like(margins), p, mode, beta=beta)


def test_soft_dpo_losses_per_pair():
    """The per-pair formulas: values, zero gradient at p = 0.5 for `weight`, cDPO's pull towards margin 0."""
    import torch.nn.functional as F

    m = torch.tensor([2.0, -1.0, 0.5, 3.0], requires_grad=True)
    p = torch.tensor([1.0, 0.5, 0.8, 0.9])
    beta = 0.5
    w = soft_dpo_losses(m, p, beta, "weight")
    assert torch.allclose(w, -(2 * p - 1) * F.logsigmoid(beta * m))
    w.sum().backward()
    assert m.grad[1] == 0 and (m.grad[[0, 2, 3]] < 0).all()
    t = soft_dpo_losses(m.detach(), p, beta, "target")
    eps = 1 - p
    assert torch.allclose(t, -(1 - eps) * F.logsigmoid(beta * m) - eps * F.logsigmoid(-beta * m))
    # cDPO's minimum is at sigmoid(beta m) = p: the loss there is the label's entropy
    m_star = torch.logit(torch.tensor(0.8)) / beta
    grid = m_star + torch.linspace(-1, 1, 21)
    vals = soft_dpo_losses(grid, torch.full_like(grid, 0.8), beta, "target")
    assert int(vals.argmin()) == 10
    assert torch.equal(soft_dpo_losses(m.detach(), p, beta, "off"), -F.logsigmoid(beta * m.detach()))


# --------------------------------------------------------------------------------------------------
# The DPO family's other objectives (dpo.loss)
# --------------------------------------------------------------------------------------------------
OBJECTIVES = {"ipo": dict(loss="ipo", ipo_tau=0.3), "robust": dict(loss="robust", flip_rate=0.2),
              "hinge": dict(loss="hinge", beta=0.5), "apo_zero": dict(loss="apo_zero")}


@pytest.fixture(scope="module")
def round_one(tiny_model, tmp_path_factory) -> Path:
    """A random, non-zero round-1 adapter: the objectives below train round 2 on top of it."""
    model, _, _ = build(tiny_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    path = tmp_path_factory.mktemp("r1") / "adapter"
    models.save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def objective_runs(tiny_model, round_one, tmp_path_factory):
    """Per objective, per-step losses of round 2's DPO: TRL's own trainer given the objective directly, ours through
    train_dpo (soft labels off), and ours with soft labels at p = 1 (our hand-written formula instead of TRL's)."""
    tmp = tmp_path_factory.mktemp("objectives")
    runs = {}
    with one_thread():
        for name, kw in OBJECTIVES.items():
            settings = DPOSettings(**kw)
            r = runs[name] = {"trl": dpo_losses(tiny_model, tmp / f"{name}-trl", PAIRS, stack=[round_one],
                                                trl_args=trl_objective(settings))[0]}
            start = build(tiny_model, [round_one])[0]
            r["ours"], model = dpo_losses(tiny_model, tmp / f"{name}-ours", PAIRS, stack=[round_one], **kw)
            r["model"], r["start"], r["start_slices"] = model, dict(start.named_parameters()), frozen_slices(start)
            r["weight@1"] = dpo_losses(tiny_model, tmp / f"{name}-w1", soft_pairs(1.0), stack=[round_one],
                                       soft_labels="weight", **kw)[0]
            r["weight@0.75"] = dpo_losses(tiny_model, tmp / f"{name}-w75", soft_pairs(0.75), stack=[round_one],
                                          soft_labels="weight", **kw)[0]
            if name == "ipo":
                r["target@1"] = dpo_losses(tiny_model, tmp / f"{name}-t1", soft_pairs(1.0), stack=[round_one],
                                           soft_labels="target", **kw)[0]
    return runs


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_is_trls_and_our_formula_matches_it(objective_runs, name):
    """dpo.loss reaches TRL as TRL's own loss_type (with the objective's own setting in TRL's one `beta`); our
    per-pair formula (the soft-label path) equals TRL's step by step at p = 1 (fp32, 1e-5), IPO's length
    normalisation included; weight at p = 0.75 is 0.5 x the loss of the same first step."""
    r = objective_runs[name]
    assert len(r["trl"]) == 4 and r["ours"] == pytest.approx(r["trl"], abs=1e-6)
    assert r["weight@1"] == pytest.approx(r["trl"], abs=1e-5)
    if name == "ipo":
        assert r["target@1"] == pytest.approx(r["trl"], abs=1e-5)
    assert r["weight@0.75"][0] == pytest.approx(0.5 * r["trl"][0], abs=1e-5)  # same model at step 1
    assert r["trl"][-1] < r["trl"][0]  # it learns


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_trains_only_the_new_adapter(objective_runs, name):
    r = objective_runs[name]
    after = dict(r["model"].named_parameters())
    slices = frozen_slices(r["model"])
    base = [n for n in r["start"] if "lora_" not in n]
    assert slices and all(torch.equal(slices[n], r["start_slices"][n]) for n in slices)  # round 1: bit-identical
    assert all(torch.equal(after[n], r["start"][n]) for n in base)
    assert any(float(after[n].detach().abs().sum()) > 0 for n in after if "lora_B" in n and ".default." in n)


def test_the_objectives_per_pair_formulas():
    """IPO's soft target moves the target margin to (2p - 1) / (2 tau): at p = 0.5 the loss is h^2; robust DPO at a
    flip rate e is unbiased: its expectation under flipped labels is plain DPO; target elsewhere is refused."""
    import torch.nn.functional as F

    c, r = torch.tensor([1.0, -2.0, 0.3]), torch.tensor([-1.0, 0.5, 0.1])
    lengths = (torch.tensor([2.0, 4.0, 1.0]), torch.tensor([1.0, 2.0, 3.0]))
    h = c / lengths[0] - r / lengths[1]
    half = torch.full((3,), 0.5)
    ipo = preference_losses("ipo", c, r, half, "target", beta=0.25, lengths=lengths)
    assert torch.allclose(ipo, h ** 2)
    e, beta = 0.2, 0.5
    rob = preference_losses("robust", c, r, None, "off", beta=beta, flip_rate=e)
    rob_flipped = preference_losses("robust", r, c, None, "off", beta=beta, flip_rate=e)
    assert torch.allclose((1 - e) * rob + e * rob_flipped, -F.logsigmoid(beta * (c - r)), atol=1e-6)
    with pytest.raises(ValueError, match="target is not defined for dpo.loss hinge"):
        preference_losses("hinge", c, r, half, "target", beta=beta)


@pytest.mark.parametrize("settings, message", [
    (dict(loss="robust", flip_rate=0.0), "dpo.loss robust with dpo.flip_rate 0 is plain DPO"),
    (dict(loss="hinge", soft_labels="target"), "dpo.soft_labels target has no per-pair meaning for dpo.loss hinge"),
    (dict(loss="robust", flip_rate=0.5), "less than 0.5"),
])
def test_objective_settings_are_checked(settings, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        DPOSettings(**settings)


def test_bad_p_chosen_is_a_one_line_user_error(tiny_model, tmp_path):
    from lora_cai.errors import UserError

    model, tok, frozen = build(tiny_model)
    bad = soft_pairs(0.8)
    bad[3]["p_chosen"] = 0.3
    with pytest.raises(UserError, match=r"pairs.jsonl: pair 3 has p_chosen=0.3, outside \[0.5, 1\]"):
        dpo.train_dpo(model, tok, bad, DPOSettings(soft_labels="weight"), tmp_path, seed=0, frozen=frozen)


def test_report_to_reaches_the_trainer_and_names_missing_loggers(tiny_model, tmp_path):
    import importlib.util

    from lora_cai.errors import UserError

    assert _common_args(SFTSettings(), tmp_path, 0, None)["report_to"] == "none"
    with pytest.raises(UserError, match="report_to: unknown logger 'comet'"):
        _report_to(["comet"])
    model, tok, frozen = build(tiny_model)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(UserError, match="report_to: tensorboard is not installed; pip install tensorboard"):
            train_sft(model, tok, SFT, SFTSettings(), tmp_path / "s", seed=0, frozen=frozen,
                               report_to=["tensorboard"], logging_dir=tmp_path / "logs")
        return
    train_sft(model, tok, SFT, SFTSettings(batch_size=4), tmp_path / "s", seed=0, frozen=frozen,
                       report_to=["tensorboard"], logging_dir=tmp_path / "logs")
    assert list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("stacked", [False, True])
def test_the_untrained_adapter_stays_out_of_inference_and_changes_no_number(two_rounds, tiny_model, tmp_path, stacked):
    """Before training, generation and judging run the starting policy without the new adapter's multiply-adds:
    bit-identical logits to the policy with it active (its B is zero), one active adapter fewer."""
    stack = [tmp_path / "r1"] if stacked else []
    if stacked:
        models.save_adapter(two_rounds["model"], tmp_path / "r1")  # any trained adapter will do as the stack
    model, tok, frozen = build(tiny_model, stack)
    ids = two_rounds["ids"]
    with torch.no_grad():
        with_new = model.eval()(input_ids=ids).logits
        models.use_starting_policy(model, frozen)
        assert models.active_adapters(model) == (frozen or [models.TRAINABLE])
        assert all(getattr(m, "disable_adapters", False) != bool(stack) for m in model.modules()
                   if hasattr(m, "lora_A"))  # round 1: the adapter layers are off altogether
        without = model(input_ids=ids).logits
    assert torch.equal(with_new, without)
    models.use_training_stack(model, frozen)
    assert models.active_adapters(model) == frozen + [models.TRAINABLE]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{models.TRAINABLE}." in n for n in trainable)


def test_a_checkpoint_cut_off_by_a_kill_is_skipped_and_removed(tmp_path):
    """kill -9 inside a save leaves checkpoint-N without its adapter: resume uses the last complete one."""
    for step, files in ((2, ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json")),
                        (4, ("adapter_config.json",)), (10, ())):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for f in files:
            (d / f).write_text("x")
    assert _last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert _last_checkpoint(tmp_path / "missing") is None
