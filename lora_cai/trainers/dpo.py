"""LoRA SFT and DPO through TRL on a stacked policy: the new adapter trains, earlier ones stay frozen.

DPO's reference is the round's starting policy (base + frozen earlier adapters, the new adapter off),
computed once before training by TRL's own precompute pass with our adapter context, so it is exactly
what the policy computes and needs no second model copy.

Soft labels (`dpo.soft_labels`): each pair carries `p_chosen`, the judge's probability that `chosen`
is the better answer (1.0 for unjudged revision pairs). With m = (log pi(c) - log ref(c)) -
(log pi(r) - log ref(r)) and z = beta * m, a pair's loss is

- `off`:    -logsigmoid(z)                                  (TRL's sigmoid loss, p ignored)
- `weight`: -(2p - 1) * logsigmoid(z)                       (confidence-weighted DPO)
- `target`: -p * logsigmoid(z) - (1 - p) * logsigmoid(-z)   (conservative DPO with eps = 1 - p, per pair)

and the step's loss is the plain mean over the batch's pairs. `weight` is deliberately *not*
renormalised by the batch's mean weight: a pair at p = 0.5 then contributes exactly zero gradient, and a
batch of unsure pairs takes a proportionally smaller step instead of being scaled back up to full
strength (renormalising would also divide by zero on a batch of p = 0.5 pairs and make the effective
learning rate depend on which pairs share a batch).

The other objectives of TRL's DPO family (`dpo.loss`: ipo, robust, hinge, apo_zero; `preference_losses`) take
`weight` the same way, and IPO takes `target` as its target margin scaled by 2p - 1; with soft labels off every
objective is TRL's own code. Beside them (`train_preferences` picks): KTO through `trl.KTOTrainer`, whose reference
is the starting policy as DPO's is, SimPO through trl.experimental's `CPOTrainer` and ORPO through its
`ORPOTrainer`, which have no reference. Soft labels there: `weight` for all three (KTO: both answers of a pair; ORPO:
the odds-ratio term and the winner's token losses), `target` for SimPO as TRL's label smoothing eps = 1 - p per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lora_cai.engine.models import TRAINABLE, set_active, starting_policy
from lora_cai.trainers.common import (
    _check_stack,
    _common_args,
    _last_checkpoint,
    _logging_dir,
    _PChosenColumn,
    _progress_callback,
    _quiet,
    _resumable,
    _shared_dataset,
)
from lora_cai.trainers.logprob import install_logprob_fallback
from lora_cai.trainers.losses import SOFT_LABELS, pair_rows, preference_losses, trl_objective
from lora_cai.trainers.reference_free import train_kto, train_orpo, train_simpo


def _stack_dpo_trainer_class():
    from trl import DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing

    class StackDPOTrainer(_PChosenColumn, _resumable(DPOTrainer)):
        """TRL's DPOTrainer, made correct for a stack of adapters.

        Handed a PeftModel, TRL adds a `ref` copy of `default` and re-activates `default` alone (the
        earlier rounds drop out of the forward pass). Here the reference is computed under the round's
        starting policy instead, then the stack is restored and the unused copy removed.
        """

        def __init__(self, *args, frozen_adapters: list[str], soft_labels: str = "off", objective: str = "sigmoid",
                     **kwargs):
            if soft_labels not in SOFT_LABELS:
                raise ValueError(f"soft_labels: {soft_labels!r} is not one of {SOFT_LABELS}")
            self._soft_labels = soft_labels
            self._objective = objective
            super().__init__(*args, frozen_adapters=frozen_adapters, **kwargs)
            peft_model = self.accelerator.unwrap_model(self.model)
            if "ref" in peft_model.peft_config:
                peft_model.delete_adapter("ref")
            set_active(peft_model, self._frozen + [TRAINABLE], trainable=TRAINABLE)
            if soft_labels != "off":
                if (list(self.loss_types) != [objective] or self.f_divergence_type != "reverse_kl" or self.ld_alpha
                        is not None or self.use_weighting or self.aux_loss_enabled or not self.precompute_ref_logps):
                    raise ValueError("soft labels need one DPO-family loss (dpo.loss) with precomputed reference "
                                     "log-probs and none of TRL's loss variants")
                self._keep_p_chosen()

        def _compute_loss(self, model, inputs, return_outputs):
            if self._soft_labels == "off":
                return super()._compute_loss(model, inputs, return_outputs)
            return self._soft_label_loss(model, inputs, return_outputs)

        def _soft_label_loss(self, model, inputs, return_outputs=False):
            """TRL's loss of the objective (precomputed reference) with each pair's own label; TRL's main metrics."""
            mode = "train" if self.model.training else "eval"
            completion_mask = inputs["completion_mask"]
            model_kwargs = {k: v for k, v in inputs.items()
                            if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "p_chosen"}}
            model_kwargs["use_cache"] = False
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            seq_len = completion_mask.size(1) - 1
            logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
            chosen_logps, rejected_logps = logps.chunk(2, dim=0)
            chosen_logratios = chosen_logps - inputs["ref_chosen_logps"]
            rejected_logratios = rejected_logps - inputs["ref_rejected_logps"]
            chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)  # IPO's per-token normalisation, as TRL's
            per_pair = preference_losses(self._objective, chosen_logratios, rejected_logratios, inputs["p_chosen"],
                                         self._soft_labels, beta=self.beta, flip_rate=self.label_smoothing,
                                         lengths=(chosen_mask.sum(dim=1), rejected_mask.sum(dim=1)))
            loss = per_pair.mean()

            gather = self.accelerator.gather
            if mode == "train":
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += tokens // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            chosen_rewards = self.beta * chosen_logratios.detach()
            rejected_rewards = self.beta * rejected_logratios.detach()
            self._metrics[mode]["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            self._metrics[mode]["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            self._metrics[mode]["rewards/accuracies"].append(
                gather((chosen_rewards > rejected_rewards).float()).mean().item())
            self._metrics[mode]["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
            self._metrics[mode]["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
            self._metrics[mode]["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
            self._metrics[mode]["p_chosen"].append(gather(inputs["p_chosen"]).mean().item())
            return (loss, outputs) if return_outputs else loss

        def compute_ref_log_probs(self, model, inputs):
            import torch

            model_kwargs = {k: v for k, v in inputs.items()
                            if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "p_chosen"}}
            model_kwargs["use_cache"] = False
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            peft_model = self.accelerator.unwrap_model(self.model)
            with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                  starting_policy(peft_model, self._frozen), self.accelerator.autocast()):
                per_token = model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs
            shift_mask = inputs["completion_mask"][..., 1:]
            per_token = per_token[:, -shift_mask.size(1):]
            return per_token.sum(dim=1).chunk(2, dim=0)

    return StackDPOTrainer


def train_dpo(model, tokenizer, pairs: list[dict], settings, out_dir: Path, *, seed: int, frozen: list[str],
              report_to: Sequence[str] = (), logging_dir: Path | None = None, console=None,
              desc: str = "DPO") -> tuple[list[dict], list[dict]]:
    """DPO of the `default` adapter on (prompt, chosen, rejected) pairs against the round's starting policy.

    With `settings.soft_labels` other than `off`, each pair's `p_chosen` (default 1.0) sets its loss (module
    docstring). `report_to`/`logging_dir` as for `train_sft`.
    Returns (TRL's log history, reference log-probs per pair `{id, chosen_logp, rejected_logp}`).
    """
    from datasets import Dataset
    from trl import DPOConfig

    install_logprob_fallback()
    soft = getattr(settings, "soft_labels", "off")
    ds = _shared_dataset(Dataset.from_list(pair_rows(pairs, soft)), out_dir)
    loss = getattr(settings, "loss", "sigmoid")
    args = DPOConfig(**_common_args(settings, out_dir, seed, model, report_to), **trl_objective(settings),
                     precompute_ref_log_probs=True, dataset_num_proc=None)
    with _logging_dir(args.report_to, logging_dir):
        trainer = _stack_dpo_trainer_class()(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                                             frozen_adapters=frozen, soft_labels=soft, objective=loss,
                                             callbacks=[_progress_callback(console, desc)])
        _quiet(trainer)
        _check_stack(model, frozen, "DPO")
        ref = [{"id": p["id"], "chosen_logp": float(c), "rejected_logp": float(r)}
               for p, c, r in zip(pairs, trainer.train_dataset["ref_chosen_logps"],
                                  trainer.train_dataset["ref_rejected_logps"])]
        trainer.train(resume_from_checkpoint=_last_checkpoint(out_dir))
    _check_stack(model, frozen, "after DPO")
    return [dict(h) for h in trainer.state.log_history], ref


def train_preferences(model, tokenizer, pairs: list[dict], settings, out_dir: Path, **kw) -> tuple[list[dict], list[dict]]:
    """The round's preference stage for `dpo.loss`: DPO's family, KTO or SimPO. Returns (log history, reference
    log-probs: one record per pair, or per KTO example; none for SimPO, which has no reference)."""
    loss = getattr(settings, "loss", "sigmoid")
    if loss == "kto":
        return train_kto(model, tokenizer, pairs, settings, out_dir, **kw)
    if loss == "simpo":
        return train_simpo(model, tokenizer, pairs, settings, out_dir, **kw), []
    if loss == "orpo":
        return train_orpo(model, tokenizer, pairs, settings, out_dir, **kw), []
    return train_dpo(model, tokenizer, pairs, settings, out_dir, **kw)
