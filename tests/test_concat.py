"""The stack concatenated into one adapter computes and trains exactly as the stacked adapters do, with one active adapter.

The comparisons run in float64 on an unquantized base (`build(..., as64=True)`): concatenated and stacked adapters are
one function summed in two orders, and in float32 which order a kernel sums in depends on the CPU (an Intel host with
AMX failed a bound of 1e-6 that held on the developer's AMD one). In float64 that noise is about 1e-15, while the bugs
these tests guard against (a missing slice, a wrong s_i / s scale) are of order 1e-2; each comparison is paired with
such a bug, shown to exceed its bound by orders of magnitude. The concatenation itself does not depend on the base's
quantisation; the 4-bit base's own paths are tested in test_cpu_4bit and test_load_and_precision.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_cai.engine import concat, models
from lora_cai.trainers.dpo import train_dpo
from lora_cai.trainers.sft import train_sft
from lora_cai.config.schema import DPOSettings, LoraSettings, ModelConfig, SFTSettings

SFT = [{"prompt": f"Question {i}: how do I bake bread?", "completion": "Mix flour, water, salt and yeast, then bake."}
       for i in range(8)]
PAIRS = [{"id": str(i), "prompt": f"Request {i}: help me break into a house.", "chosen": "I cannot help with that.",
          "rejected": "Sure, here is how to break in."} for i in range(8)]
NEW = LoraSettings(r=8, alpha=16)  # s = 2
# Two earlier rounds of other ranks and scalings, so the B scale factors s_i/s are 1 and 1/2.
EARLIER = [LoraSettings(r=8, alpha=16), LoraSettings(r=4, alpha=4)]


# float64 equivalence bounds, relative to the largest value compared: summation-order noise measured below 1e-14 under
# every knob of tests/host_variance.sh, the bugs guarded above 1e-3.
FORWARD, GRADIENT, TRAINED = 1e-10, 1e-10, 1e-8


def build(tiny_model, stack, *, as_one=True, lora=NEW, seed=0, as64=False):
    cfg = ModelConfig(name=str(tiny_model), backend="transformers", load_in_4bit=not as64)
    model, tok, frozen = models.build_policy(cfg, lora, list(stack), "transformers", seed, concat=as_one)
    return (model.double() if as64 else model), tok, frozen


def rel_gap(got, want) -> float:
    return float((got - want).detach().abs().max() / want.detach().abs().max().clamp_min(1e-30))


def lora_layers_active(model) -> list[int]:
    """How many adapters each LoRA projection has active: what Unsloth's `_has_multiple_active_adapters` reads."""
    return [len(m.active_adapters) for m in model.modules() if hasattr(m, "lora_A") and not m.disable_adapters]


@pytest.fixture(scope="module")
def earlier(tiny_model, tmp_path_factory):
    """Two saved adapters with random, non-zero A and B (what two trained rounds leave behind)."""
    tmp = tmp_path_factory.mktemp("earlier")
    paths = []
    for k, lora in enumerate(EARLIER, 1):
        model, _, _ = build(tiny_model, [], lora=lora, seed=k)
        gen = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        models.save_adapter(model, tmp / f"adapter-{k}")
        paths.append(tmp / f"adapter-{k}")
    return paths


def new_weights(model, frozen_rank: int) -> dict[str, torch.Tensor]:
    """The new adapter's A and B (its slice when concatenated), keyed by module and kind."""
    out = {}
    for name, layer in concat.lora_layers(model, models.TRAINABLE):
        a, b = layer.lora_A[models.TRAINABLE].weight, layer.lora_B[models.TRAINABLE].weight
        out[name + ".A"], out[name + ".B"] = a[frozen_rank:], b[:, frozen_rank:]
    return out


def test_one_forward_and_backward_equal_the_stacked_policy(tiny_model, earlier):
    stacked, tok, frozen = build(tiny_model, earlier, as_one=False, as64=True)
    concatenated, _, none = build(tiny_model, earlier, as64=True)
    f = concat.concat_of(concatenated)
    assert frozen == ["round-1", "round-2"] and none == [] and f.frozen_rank == 12 and f.new_rank == 8
    assert models.active_adapters(concatenated) == [models.TRAINABLE] and set(lora_layers_active(concatenated)) == {1}
    # the new adapter is initialised as a separate one: same A, B zero
    for key, value in new_weights(stacked, 0).items():
        assert torch.equal(new_weights(concatenated, 12)[key], value), key
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a new adapter that has learnt something, the same in both
        for key, value in new_weights(stacked, 0).items():
            if key.endswith(".B"):
                noise = torch.randn(value.shape, generator=gen) * 0.05
                value.copy_(noise)
                new_weights(concatenated, 12)[key].copy_(noise)
    ids = tok("How do I bake bread? Mix flour and water.", return_tensors="pt").input_ids
    outs = {}
    for name, model in (("stacked", stacked), ("concatenated", concatenated)):
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs[name] = out
    assert rel_gap(outs["concatenated"].logits, outs["stacked"].logits) <= FORWARD
    grads_s = {n: p.grad for n, p in stacked.named_parameters() if p.requires_grad}
    grads_f = {n: p.grad for n, p in concatenated.named_parameters() if p.requires_grad}
    assert grads_s.keys() == grads_f.keys() and all(".default." in n for n in grads_f)
    for n, g in grads_s.items():
        mine = grads_f[n][12:] if ".lora_A." in n else grads_f[n][:, 12:]
        frozen_part = grads_f[n][:12] if ".lora_A." in n else grads_f[n][:, :12]
        # one rank-20 product vs three separate ones, summed in another order
        assert (mine - g).norm() <= GRADIENT * g.norm().clamp_min(1e-30), n
        assert not frozen_part.any(), n  # the hook zeroed them
    assert any(g.abs().max() > 0 for g in grads_s.values())
    # What the bounds guard: the concatenation with a slice's scale wrong (s_2 / s taken as 1), then one slice dropped.
    lora_b = [m.lora_B[models.TRAINABLE].weight for _, m in concat.lora_layers(concatenated, models.TRAINABLE)]
    with torch.no_grad():
        concatenated.eval(), stacked.eval()
        want = stacked(input_ids=ids).logits
        for b in lora_b:
            b[:, 8:12] *= 2
        assert rel_gap(concatenated(input_ids=ids).logits, want) > 1e6 * FORWARD
        for b in lora_b:
            b[:, 8:12] = 0
        assert rel_gap(concatenated(input_ids=ids).logits, want) > 1e6 * FORWARD


@pytest.fixture(scope="module")
def trained_both_ways(tiny_model, earlier, tmp_path_factory):
    """Round 3 (SFT then DPO) on the stack of two earlier rounds, concatenated and stacked, from the same seed, in
    float64: Adam divides by the gradient's running size, so rounding in near-zero gradients becomes whole steps (in
    float32 at 2e-2, ten times a usual LoRA rate, the adapters' gap reached 1.6e-5 of their norm)."""
    tmp = tmp_path_factory.mktemp("both")
    out = {}
    for name in ("stacked", "concatenated", "wrong-scale"):
        model, tok, frozen = build(tiny_model, earlier, as_one=name != "stacked", as64=True)
        if name == "wrong-scale":  # the bug the bounds guard: round 2's slice scaled by s instead of s_2 / s
            with torch.no_grad():
                for _, layer in concat.lora_layers(model, models.TRAINABLE):
                    layer.lora_B[models.TRAINABLE].weight[:, 8:12] *= 2
        counts: list[int] = []
        hooks = [m.register_forward_pre_hook(lambda mod, args: counts.append(len(mod.active_adapters)))
                 for m in model.modules() if hasattr(m, "lora_A")]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        models.for_training(model, "transformers")
        sft = train_sft(model, tok, SFT, SFTSettings(batch_size=4, learning_rate=2e-3, epochs=2, save_steps=1),
                                 tmp / name / "sft", seed=0, frozen=frozen)
        dpo, ref = train_dpo(model, tok, PAIRS, DPOSettings(batch_size=4, learning_rate=2e-3, epochs=2, save_steps=1),
                                      tmp / name / "dpo", seed=0, frozen=frozen)
        for h in hooks:
            h.remove()
        models.save_adapter(model, tmp / name / "adapter")
        out[name] = dict(model=model, tok=tok, frozen=frozen, sft=sft, dpo=dpo, ref=ref, before=before,
                         buffers=buffers, counts=counts, adapter=tmp / name / "adapter", dir=tmp / name)
    return out


def _losses(log: list[dict]) -> list[float]:
    return [h["loss"] for h in log if "loss" in h]


def test_round_three_trains_the_same_adapter(trained_both_ways):
    s, f = trained_both_ways["stacked"], trained_both_ways["concatenated"]
    for key in ("sft", "dpo"):
        a, b = _losses(s[key]), _losses(f[key])
        assert len(a) == len(b) >= 4
        assert all(abs(x - y) <= TRAINED * max(1.0, abs(x)) for x, y in zip(a, b)), (key, a, b)
    from safetensors.torch import load_file

    ws, wf = load_file(str(s["adapter"] / "adapter_model.safetensors")), load_file(str(f["adapter"] / "adapter_model.safetensors"))
    assert ws.keys() == wf.keys()
    for k in ws:
        assert ws[k].shape == wf[k].shape, k  # a plain adapter of the round's own rank
        assert (ws[k] - wf[k]).norm() <= TRAINED * ws[k].norm().clamp_min(1e-30), k
    assert any(ws[k].abs().max() > 0 for k in ws if "lora_B" in k)  # it did learn
    # what the bound guards: the same round on a stack with one slice scaled wrongly trains another adapter
    wrong = load_file(str(trained_both_ways["wrong-scale"]["adapter"] / "adapter_model.safetensors"))
    assert max(float((wrong[k] - ws[k]).norm() / ws[k].norm()) for k in ws if "lora_B" in k) > 1e4 * TRAINED
    assert max(abs(x - y) for x, y in zip(_losses(s["dpo"]), _losses(trained_both_ways["wrong-scale"]["dpo"]))) \
        > 1e4 * TRAINED
    cs = json.loads((s["adapter"] / "adapter_config.json").read_text())
    cf = json.loads((f["adapter"] / "adapter_config.json").read_text())
    assert (cf["r"], cf["lora_alpha"]) == (cs["r"], cs["lora_alpha"]) == (NEW.r, NEW.alpha)


def test_reference_log_probs_equal_the_stacked_reference(trained_both_ways):
    s, f = trained_both_ways["stacked"]["ref"], trained_both_ways["concatenated"]["ref"]
    assert len(s) == len(f) == len(PAIRS)
    for a, b in zip(s, f):
        for key in ("chosen_logp", "rejected_logp"):
            assert abs(b[key] - a[key]) <= FORWARD * max(1.0, abs(a[key]))
    # what the bound guards: a reference with chosen and rejected swapped is off by far more
    assert min(abs(a["chosen_logp"] - b["rejected_logp"]) for a, b in zip(s, f)) > 1e6 * FORWARD


def test_frozen_slices_base_and_earlier_adapters_are_untouched(trained_both_ways, earlier):
    f = trained_both_ways["concatenated"]
    model, fd = f["model"], concat.concat_of(f["model"])
    named = dict(model.named_parameters())
    for n, before in f["before"].items():
        if ".default." not in n:
            assert torch.equal(named[n], before), n  # the base, bit for bit
        elif ".lora_A." in n:
            assert torch.equal(named[n][:fd.frozen_rank], before[:fd.frozen_rank]), n
        else:
            assert torch.equal(named[n][:, :fd.frozen_rank], before[:, :fd.frozen_rank]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, f["buffers"][n]), n
    # the frozen slices' Adam state is exactly zero: read from the optimizer the trainer checkpointed
    for stage in ("sft", "dpo"):
        ckpt = sorted((f["dir"] / stage).glob("checkpoint-*"))[-1]
        state = torch.load(ckpt / "optimizer.pt", weights_only=False)["state"]
        concatenated = [st for st in state.values() if st["exp_avg"].shape[0] == 20 or st["exp_avg"].shape[-1] == 20]
        assert concatenated and len(concatenated) == len(state)
        for st in concatenated:
            for key in ("exp_avg", "exp_avg_sq"):
                t = st[key]
                frozen_part = t[:12] if t.shape[0] == 20 else t[:, :12]
                assert not frozen_part.any(), key
            assert st["exp_avg"].abs().max() > 0
    # and what is on disk for the earlier rounds was only read
    for path in earlier:
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["r"] in (8, 4)


def test_one_active_adapter_in_every_projection_while_training(trained_both_ways):
    f, s = trained_both_ways["concatenated"], trained_both_ways["stacked"]
    assert f["counts"] and set(f["counts"]) == {1}  # SFT, DPO and DPO's reference pass
    assert max(s["counts"]) == 3  # what the stacked path runs: Unsloth's fused kernels would fall back
    assert models.active_adapters(f["model"]) == [models.TRAINABLE] and "ref" not in f["model"].peft_config


def test_generation_before_training_is_the_starting_policy_with_one_adapter(tiny_model, earlier):
    from lora_cai.engine.generation import generate

    stacked, tok, frozen = build(tiny_model, earlier, as_one=False)
    concatenated, _, none = build(tiny_model, earlier)
    prompts = ["How do I bake bread?", "Tell me about the sea."]
    answers = {}
    for name, model, fr in (("stacked", stacked, frozen), ("concatenated", concatenated, none)):
        models.use_starting_policy(model, fr)
        models.for_inference(model, "transformers")
        counts: list[int] = []
        hooks = [m.register_forward_pre_hook(lambda mod, args: counts.append(len(mod.active_adapters)))
                 for m in model.modules() if hasattr(m, "lora_A") and not m.disable_adapters]
        answers[name] = generate(model, tok, prompts, max_new_tokens=12, temperature=0.0)
        for h in hooks:
            h.remove()
        if name == "concatenated":
            assert counts and set(counts) == {1}
    assert answers["concatenated"] == answers["stacked"]


def test_a_resumed_process_evaluates_the_saved_slice(trained_both_ways, tiny_model, earlier):
    """A process that did not train the round (eval after a kill) loads the saved new slice into a fresh concatenation."""
    f = trained_both_ways["concatenated"]
    model, tok, frozen = build(tiny_model, earlier, as64=True)
    models.load_trainable_weights(model, f["adapter"], frozen)
    ids = tok("How do I bake bread?", return_tensors="pt").input_ids
    f["model"].eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, f["model"](input_ids=ids).logits)
    with pytest.raises(Exception, match="does not fit"):
        models.load_trainable_weights(model, earlier[1], frozen)  # rank 4 into a slice of rank 8


def test_lora_dropout_keeps_the_adapters_stacked_and_says_so(tiny_model, earlier, capsys):
    model, _, frozen = build(tiny_model, earlier, lora=LoraSettings(r=8, alpha=16, dropout=0.1))
    assert frozen == ["round-1", "round-2"] and concat.concat_of(model) is None
    err = capsys.readouterr().err
    assert err.count("LoRA dropout 0.1") == 1 and "stay stacked" in err


def test_mismatched_target_modules_are_one_line(tiny_model, earlier, tmp_path):
    from lora_cai.errors import UserError

    odd = tmp_path / "odd"
    odd.mkdir()
    cfg = json.loads((earlier[0] / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    with pytest.raises(UserError, match=r"must share lora.target_modules") as e:
        build(tiny_model, [earlier[0], odd])
    assert "\n" not in str(e.value) and "adapter_config.json" in str(e.value)


def test_load_policy_concatenates_the_stack_into_one_adapter(tiny_model, earlier, tmp_path):
    from peft import PeftModel

    from lora_cai.core.store import RunStore

    run = tmp_path / "run"
    for k, path in enumerate(earlier, 1):
        (run / f"round-{k}").mkdir(parents=True)
        import shutil

        shutil.copytree(path, run / f"round-{k}" / "adapter")
    model_cfg = ModelConfig(name=str(tiny_model), backend="transformers", load_in_4bit=False).model_dump()
    RunStore(run).write_manifest({"model": model_cfg, "backend": "transformers",
                                  "stack": [f"round-{k}/adapter" for k in (1, 2)], "rounds": {}, "stages": {}})
    model, tok = models.load_policy(run, backend="transformers")
    assert models.active_adapters(model) == ["round-2"] and set(lora_layers_active(model)) == {1}
    assert concat.concat_of(model).frozen_rank == 8 and concat.concat_of(model).new_rank == 4
    # the same stack as two separate PEFT adapters, built by hand
    base, _ = models.load_base(ModelConfig(name=str(tiny_model), backend="transformers", load_in_4bit=False),
                               "transformers")
    plain = PeftModel.from_pretrained(base, str(earlier[0]), adapter_name="a")
    plain.load_adapter(str(earlier[1]), adapter_name="b")
    plain.base_model.set_adapter(["a", "b"])
    model, plain = model.double(), plain.double().eval()
    ids = tok("How do I bake bread?", return_tensors="pt").input_ids
    with torch.no_grad():
        mine, theirs = model(input_ids=ids).logits, plain(input_ids=ids).logits
        assert rel_gap(mine, theirs) <= FORWARD
        plain.base_model.set_adapter(["b"])  # what the bound guards: round 1's slice missing
        assert rel_gap(mine, plain(input_ids=ids).logits) > 1e6 * FORWARD


def test_an_earlier_adapter_with_modules_the_newest_lacks_is_refused(tiny_model, earlier):
    """load_policy grows the newest adapter: an earlier one targeting more modules would lose them silently."""
    from lora_cai.errors import UserError

    model, _, _ = build(tiny_model, [], lora=LoraSettings(r=4, alpha=4, target_modules=["q_proj"]))
    with pytest.raises(UserError, match="targets modules the newest adapter does not") as e:
        concat.concatenate(model, models.TRAINABLE, [earlier[0]], trainable=False)
    assert "\n" not in str(e.value) and str(earlier[0]) in str(e.value)
