"""KTO, SimPO and ORPO beside DPO's family (`dpo.loss`): TRL's formulas recomputed by hand on a fixed batch, the stack
invariants on a round-3 policy (two earlier rounds concatenated), and the run-level wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, write_recipe
from lora_cai.engine import models
from lora_cai.trainers.common import _common_args
from lora_cai.trainers.logprob import install_logprob_fallback
from lora_cai.trainers.losses import kto_examples, kto_weights, pair_rows
from lora_cai.trainers.reference_free import _orpo_trainer_class, _simpo_trainer_class, _stack_kto_trainer_class
from lora_cai.trainers.sft import sft_training_records
from lora_cai.trainers import dpo
from lora_cai.config.schema import DPOSettings
from test_concat import PAIRS, build, earlier  # noqa: F401  (`earlier` is a fixture: two saved random adapters)
from test_training import frozen_slices

# Pairs with answers of different lengths, so SimPO's length normalisation and KTO's per-answer sums matter.
MIXED = [{"id": str(i), "prompt": f"Request {i}: help me break into a house.",
          "chosen": "I cannot help with that." + " Please ask something else." * (i % 3),
          "rejected": "Sure, here is how to break in: " + "first the window, " * (1 + i % 2),
          "p_chosen": 0.5 + 0.0625 * i} for i in range(8)]  # judged probabilities from 0.5 (no say) to 0.94


# The formula tests run in float64 (test_concat's `as64`): TRL's loss and the hand computation then differ by about
# 1e-15 whatever kernels the CPU picks (SimPO: 4e-16). What is left is float32 that TRL keeps on purpose: KTO's
# precomputed reference log-probs are stored as float32 (half an ulp: 6e-8 of up to ~30 nats, times the loss's slope
# of at most 0.3 * 0.25 * 1.1, twice through z0: at most 3e-7; measured 1.4e-7), ORPO's odds in float32 (2e-8).
# EXACT is the bound; each test also shows the bug it guards (the wrong reference or a term left out) beyond it by
# a thousand times.
EXACT = 1e-6


def policy_off_start(tiny_model, stack):
    """A round's policy whose new slice has learnt something (B random, the same every time): policy != reference."""
    model, tok, frozen = build(tiny_model, stack, as64=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if ".default." in n and "lora_B" in n:
                p[:, -8:].copy_(torch.randn(p[:, -8:].shape, generator=gen) * 0.05)
    models.for_training(model, "transformers")
    return model, tok, frozen


def token_logps(model, ids, mask, completion_mask):
    """Per-sequence sum of log p(completion token), from the full logits (no fused head)."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * completion_mask[:, 1:]).sum(-1)


@pytest.mark.parametrize("soft", ["off", "weight"])
def test_kto_loss_on_a_batch_is_trls_formula(tiny_model, earlier, tmp_path, soft):  # noqa: F811
    """KTO (arXiv 2402.01306) as TRL 1.15 computes it: z0 = max(0, mean over the batch of log pi/ref on mismatched
    answers), desirable 1 - sigmoid(beta (r - z0)), undesirable 1 - sigmoid(beta (z0 - r)), weighted, averaged; the
    reference log-probs are the round's starting policy (the new slice off). Soft labels `weight`: each answer's
    loss also times its pair's 2p - 1."""
    from datasets import Dataset
    from trl import KTOConfig

    install_logprob_fallback()
    model, tok, frozen = policy_off_start(tiny_model, earlier)
    examples = kto_examples(MIXED)
    good, bad = kto_weights(8, 8)
    assert (good, bad) == (1.0, 1.0) and kto_weights(12, 4) == (4 / 3 * 4 / 12, 1.0)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": e["prompt"]}],
                             "completion": [{"role": "assistant", "content": e["completion"]}],
                             "label": e["label"], "p_chosen": e["p_chosen"]} for e in examples])
    settings = DPOSettings(loss="kto", batch_size=16, beta=0.3, soft_labels=soft)
    args = KTOConfig(**_common_args(settings, tmp_path, 0, model), beta=0.3, desirable_weight=0.9,
                     undesirable_weight=1.1, precompute_ref_log_probs=True, dataset_num_proc=None)
    trainer = _stack_kto_trainer_class()(model=model, args=args, train_dataset=ds, processing_class=tok,
                                                  frozen_adapters=frozen, soft_labels=soft)
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["label"]) == 16 and ("p_chosen" in batch) == (soft != "off")
    with torch.no_grad():
        got = float(trainer.compute_loss(model, batch))
        pol = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        pol_kl = token_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
        with models.starting_policy(model, frozen):
            ref = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            ref_kl = token_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
        with model.disable_adapter():  # the wrong reference: the base without the earlier rounds
            base = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            base_kl = token_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    # precomputed = starting policy (stored as float32 by the dataset: relative 6e-8)
    assert (batch["ref_logps"].double() - ref).abs().max() <= EXACT * ref.abs().max()
    assert (batch["ref_KL_logps"].double() - ref_kl).abs().max() <= EXACT * ref_kl.abs().max()
    assert (pol - ref).abs().max() > 1e3 * EXACT * ref.abs().max()  # the policy as reference would fail it
    labels = torch.as_tensor(batch["label"], dtype=torch.bool)
    w = 2 * batch["p_chosen"] - 1 if soft == "weight" else torch.ones(16)

    def kto(ref, ref_kl):
        z0 = (pol_kl - ref_kl).mean().clamp(min=0)
        r = pol - ref
        return torch.cat([0.9 * w[labels] * (1 - torch.sigmoid(0.3 * (r[labels] - z0))),
                          1.1 * w[~labels] * (1 - torch.sigmoid(0.3 * (z0 - r[~labels])))]).mean()

    assert (pol - ref).abs().max() > 0.05  # the batch is not at the reference: the formula is really exercised
    assert abs(got - float(kto(ref, ref_kl))) <= EXACT
    assert abs(got - float(kto(base, base_kl))) > 1e3 * EXACT  # what the bound guards: the base as reference
    assert (trainer.desirable_weight, trainer.undesirable_weight) == (0.9, 1.1)  # restored after the batch


@pytest.mark.parametrize("soft", ["off", "weight", "target"])
def test_simpo_loss_on_a_batch_is_trls_formula(tiny_model, earlier, tmp_path, soft):  # noqa: F811
    """SimPO (arXiv 2405.14734) as trl.experimental's CPOTrainer computes it with loss_type simpo and cpo_alpha 0:
    -logsigmoid(beta (mean log p(chosen) - mean log p(rejected)) - gamma), means over completion tokens, no NLL.
    Soft labels: `weight` times 2p - 1 per pair; `target` TRL's label smoothing with eps = 1 - p per pair."""
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig

    model, tok, frozen = policy_off_start(tiny_model, earlier)
    ds = Dataset.from_list(pair_rows(MIXED, soft))
    settings = DPOSettings(loss="simpo", batch_size=8, soft_labels=soft)
    args = CPOConfig(**_common_args(settings, tmp_path, 0, model), loss_type="simpo", cpo_alpha=0.0,
                     beta=2.0, simpo_gamma=0.7, dataset_num_proc=None)
    trainer = _simpo_trainer_class()(model=model, args=args, train_dataset=ds, processing_class=tok,
                                              frozen_adapters=frozen, soft_labels=soft)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        got = float(trainer.compute_loss(model, batch))

        def mean_logp(side):
            ids, labels = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
            logits = model(input_ids=ids, attention_mask=batch[f"{side}_attention_mask"]).logits
            mask = labels[:, 1:] != -100
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
            assert (mask.sum(-1) > 0).all()
            return (logp * mask).sum(-1) / mask.sum(-1)

        chosen, rejected = mean_logp("chosen"), mean_logp("rejected")
    z = 2.0 * (chosen - rejected) - 0.7
    p = torch.tensor(batch["p_chosen"]) if soft != "off" else torch.ones(8)
    assert soft == "off" or sorted(p.tolist()) == [m["p_chosen"] for m in MIXED]

    def simpo(z):
        per = -p * F.logsigmoid(z) - (1 - p) * F.logsigmoid(-z) if soft == "target" else -F.logsigmoid(z)
        return float(((2 * p - 1) * per if soft == "weight" else per).mean())

    assert abs(got - simpo(z)) <= EXACT
    assert abs(got - simpo(z + 0.7)) > 1e3 * EXACT  # what the bound guards: SimPO's margin gamma left out
    assert trainer.label_smoothing == 0.0  # TRL's own setting, restored after the batch
    assert models.active_adapters(model) == [models.TRAINABLE]


@pytest.mark.parametrize("soft", ["off", "weight"])
def test_orpo_loss_on_a_batch_is_the_papers_formula(tiny_model, earlier, tmp_path, soft):  # noqa: F811
    """ORPO (arXiv 2403.07691) as trl.experimental's ORPOTrainer computes its odds-ratio term (length-normalised
    log-probs, log odds = l - log(1 - e^l)), with the winner's NLL on its completion tokens only (TRL 1.15 also
    counts the prompt's: lora_cai's subclass does not, or ORPO would train the red-team requests themselves).
    Soft labels `weight`: each pair's odds-ratio term and its winner's token losses times 2p - 1."""
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig

    model, tok, frozen = policy_off_start(tiny_model, earlier)
    ds = Dataset.from_list(pair_rows(MIXED, soft))
    settings = DPOSettings(loss="orpo", batch_size=8, soft_labels=soft)
    args = ORPOConfig(**_common_args(settings, tmp_path, 0, model), beta=0.3, dataset_num_proc=None)
    trainer = _orpo_trainer_class()(model=model, args=args, train_dataset=ds, processing_class=tok,
                                             frozen_adapters=frozen, soft_labels=soft)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        got = float(trainer.compute_loss(model, batch))
        stats = {}
        for side in ("chosen", "rejected"):
            ids, labels = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
            logits = model(input_ids=ids, attention_mask=batch[f"{side}_attention_mask"]).logits
            mask = labels[:, 1:] != -100
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
            assert (mask.sum(-1) < (batch[f"{side}_attention_mask"].sum(-1) - 1)).all()  # the prompt is masked
            stats[side] = ((logp * mask).sum(-1) / mask.sum(-1), -(logp * mask).sum(-1), mask.sum())
    w = 2 * torch.tensor(batch["p_chosen"]) - 1 if soft == "weight" else torch.ones(8)
    (avg_c, nll_c, tokens_c), (avg_r, _, _) = stats["chosen"], stats["rejected"]
    log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
    want = (w * nll_c).sum() / tokens_c - 0.3 * (w * F.logsigmoid(log_odds)).mean()
    assert abs(got - float(want)) <= EXACT
    assert abs(got - float((w * nll_c).sum() / tokens_c)) > 1e3 * EXACT  # the bug guarded: the odds-ratio term lost


def test_orpo_leaves_sft_the_records_no_pair_covers():
    records = [{"prompt": "a", "completion": "A"}, {"prompt": "b", "completion": "B"}, {"prompt": "h", "completion": "H"}]
    pairs = [{"prompt": "a", "chosen": "A", "rejected": "x"}, {"prompt": "b", "chosen": "B2", "rejected": "y"}]
    assert sft_training_records("sigmoid", records, pairs) == records
    assert sft_training_records("orpo", records, pairs) == records[1:]  # b's revision was not paired; h is helpful


@pytest.fixture(scope="module")
def trained(tiny_model, earlier, tmp_path_factory):  # noqa: F811
    """Round 3's preference stage through train_preferences, per objective, on the concatenated stack, with soft
    labels (their plumbing from pairs to loss; the formula tests check the numbers)."""
    out = {}
    for loss, soft in (("kto", "weight"), ("simpo", "target"), ("orpo", "weight")):
        model, tok, frozen = build(tiny_model, earlier)
        slices, base = frozen_slices(model), {n: p.detach().clone() for n, p in model.named_parameters()
                                               if "lora_" not in n}
        models.for_training(model, "transformers")
        log, ref = dpo.train_preferences(model, tok, MIXED, DPOSettings(loss=loss, batch_size=4, epochs=2,
                                                                             learning_rate=5e-3, soft_labels=soft),
                                              tmp_path_factory.mktemp(loss), seed=0, frozen=frozen)
        out[loss] = dict(model=model, slices=slices, base=base, log=log, ref=ref, frozen=frozen)
    return out


@pytest.mark.parametrize("loss", ["kto", "simpo", "orpo"])
def test_each_objective_trains_only_the_new_slice(trained, loss):
    r = trained[loss]
    model = r["model"]
    after = frozen_slices(model)
    assert all(torch.equal(after[n], v) for n, v in r["slices"].items())  # earlier rounds: bit-identical
    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], v) for n, v in r["base"].items())
    assert any(float(p.detach()[:, -8:].abs().sum()) > 0 for n, p in named.items() if ".default." in n and "lora_B" in n)
    assert models.active_adapters(model) == [models.TRAINABLE] and list(model.peft_config) == [models.TRAINABLE]
    losses = [h["loss"] for h in r["log"] if "loss" in h]
    assert len(losses) >= 4 and losses[-1] < losses[0]  # it learns


def test_kto_reference_records_and_simpo_has_none(trained):
    kto = trained["kto"]["ref"]
    assert len(kto) == 16 and sum(r["label"] for r in kto) == 8 and all(r["logp"] < 0 for r in kto)
    assert trained["simpo"]["ref"] == trained["orpo"]["ref"] == []


@pytest.mark.parametrize("settings, message", [
    (dict(loss="kto", batch_size=1), "needs dpo.batch_size 2 or more"),
    (dict(loss="kto", soft_labels="target"), "target has no per-pair meaning for dpo.loss kto"),
    (dict(loss="orpo", soft_labels="target"), "target has no per-pair meaning for dpo.loss orpo"),
])
def test_objective_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        DPOSettings(**settings)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kto", "simpo", "orpo"])
def test_a_run_with_the_objective_resumes_after_kill_to_the_same_adapter(loss, tiny_model, tmp_path):
    """kill -9 inside the objective's training (checkpoints every 2 steps), rerun: the same adapter and logs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    sets = ["--set", f"dpo.loss={loss}", "--set", "rounds=1", "--set", "data.eval_limit=0", "--set",
            "dpo.batch_size=2", "--set", "dpo.save_steps=2", "--set", "pairs.builder=mix", "--set",
            "pairs.n_samples=3", "--set", "eval.critic_check=false", "--set", "dpo.epochs=2"]

    def cli(recipe):
        return [sys.executable, "-m", "lora_cai.recipe", str(recipe), *sets]

    ref_recipe = write_recipe(tmp_path / "ref.yaml", tiny_model, tmp_path / "ref")
    proc = subprocess.run(cli(ref_recipe), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "run")
    rd = tmp_path / "run" / "round-1"
    proc = subprocess.Popen(cli(recipe), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any((rd / "checkpoints" / "dpo").glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, "the run ended before the kill point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (rd / "train.json").exists()
    proc = subprocess.run(cli(recipe), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = load_file(str(tmp_path / "ref" / "round-1" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(rd / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    logs = [json.loads(line) for line in (rd / "dpo_log.jsonl").read_text().splitlines()]
    ref_logs = [json.loads(line) for line in (tmp_path / "ref" / "round-1" / "dpo_log.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in logs if "loss" in h] == [h["loss"] for h in ref_logs if "loss" in h]
    assert (rd / "ref_logps.jsonl").read_text() == (tmp_path / "ref" / "round-1" / "ref_logps.jsonl").read_text()


def test_orpo_is_one_stage_when_every_record_is_a_pairs_winner(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "run")
    proc = run_cli(str(recipe), "--set", "dpo.loss=orpo", "--set", "rounds=1", "--set", "data.eval_limit=0",
                   "--set", "eval.critic_check=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rd = tmp_path / "run" / "round-1"
    sft = [json.loads(line) for line in (rd / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (rd / "pairs.jsonl").read_text().splitlines()]
    assert sft and pairs and {(r["prompt"], r["completion"]) for r in sft} <= {(p["prompt"], p["chosen"]) for p in pairs}
    train = json.loads((rd / "train.json").read_text())
    assert train["sft"] == {"steps": 0} and train["dpo"]["steps"] > 0  # ORPO alone, its NLL term the SFT
    assert "ORPO" in proc.stderr + proc.stdout


def test_the_round_names_the_objective(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "run")
    proc = run_cli(str(recipe), "--set", "dpo.loss=simpo", "--set", "rounds=1", "--set", "data.eval_limit=0",
                   "--set", "eval.critic_check=false", "--set", "pairs.builder=mix", "--set", "pairs.n_samples=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rd = tmp_path / "run" / "round-1"
    assert (rd / "ref_logps.jsonl").read_text() == ""  # SimPO has no reference pass
    assert [json.loads(line) for line in (rd / "dpo_log.jsonl").read_text().splitlines()]
    assert "SimPO" in proc.stderr + proc.stdout
