"""KTO, SimPO and ORPO through TRL on a stacked policy."""

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
from lora_cai.trainers.losses import _pair_probability, _soft_weights, kto_examples, kto_weights, pair_rows


def _stack_kto_trainer_class():
    from trl import KTOTrainer
    from trl.models.utils import disable_gradient_checkpointing

    class StackKTOTrainer(_PChosenColumn, _resumable(KTOTrainer)):
        """TRL's KTOTrainer, made correct for a stack as StackDPOTrainer is: TRL adds a `ref` copy of `default`;
        here the reference (its KL term's too) is computed under the round's starting policy and the copy removed."""

        def __init__(self, *args, frozen_adapters: list[str], soft_labels: str = "off", **kwargs):
            if soft_labels not in ("off", "weight"):
                raise ValueError(f"KTO takes soft_labels off or weight, not {soft_labels!r}")
            self._soft_labels = soft_labels
            super().__init__(*args, frozen_adapters=frozen_adapters, **kwargs)
            peft_model = self.accelerator.unwrap_model(self.model)
            if "ref" in peft_model.peft_config:
                peft_model.delete_adapter("ref")
            set_active(peft_model, self._frozen + [TRAINABLE], trainable=TRAINABLE)
            self._keep_p_chosen()

        def _compute_loss(self, model, inputs, return_outputs):
            inputs = dict(inputs)
            p = inputs.pop("p_chosen", None)
            if self._soft_labels == "off" or p is None:
                return super()._compute_loss(model, inputs, return_outputs)
            # TRL multiplies the desirable and the undesirable losses by its two class weights, scalars, in
            # `_compute_loss` (chosen and rejected each in batch order); a tensor of one weight per example in
            # their place scales each example's loss by its pair's 2p - 1, and TRL's own code does the rest.
            import torch

            labels = torch.as_tensor(inputs["label"], dtype=torch.bool, device=self.accelerator.device)
            w = _soft_weights(p.to(self.accelerator.device), self._soft_labels)
            good, bad = self.desirable_weight, self.undesirable_weight
            self.desirable_weight, self.undesirable_weight = good * w[labels], bad * w[~labels]
            try:
                return super()._compute_loss(model, inputs, return_outputs)
            finally:
                self.desirable_weight, self.undesirable_weight = good, bad

        def compute_ref_log_probs(self, model, inputs):
            import torch

            peft_model = self.accelerator.unwrap_model(self.model)
            with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                  starting_policy(peft_model, self._frozen), self.accelerator.autocast()):
                def logps(ids, mask, completion_mask):
                    labels = ids.masked_fill(completion_mask == 0, -100)
                    per_token = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
                    return per_token[:, -(ids.size(1) - 1):].sum(-1)

                completion = logps(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
                kl = (logps(inputs["KL_input_ids"], inputs["KL_attention_mask"], inputs["KL_completion_mask"])
                      if self.calculate_KL else None)
            return completion, kl

    return StackKTOTrainer


def train_kto(model, tokenizer, pairs: list[dict], settings, out_dir: Path, *, seed: int, frozen: list[str],
              report_to: Sequence[str] = (), logging_dir: Path | None = None, console=None,
              desc: str = "KTO") -> tuple[list[dict], list[dict]]:
    """KTO of the `default` adapter on the pairs' answers, unpaired (`kto_examples`), reference = starting policy."""
    from datasets import Dataset
    from trl import KTOConfig

    install_logprob_fallback()
    soft = getattr(settings, "soft_labels", "off")
    if soft != "off":
        for p in pairs:
            _pair_probability(p)
    examples = kto_examples(pairs)
    n_good = sum(e["label"] for e in examples)
    good_w, bad_w = kto_weights(n_good, len(examples) - n_good)
    ds = _shared_dataset(Dataset.from_list([
        {"prompt": [{"role": "user", "content": e["prompt"]}],
         "completion": [{"role": "assistant", "content": e["completion"]}], "label": e["label"],
         **({"p_chosen": e["p_chosen"]} if soft != "off" else {})} for e in examples]), out_dir)
    args = KTOConfig(**_common_args(settings, out_dir, seed, model, report_to), beta=settings.beta,
                     desirable_weight=good_w, undesirable_weight=bad_w, precompute_ref_log_probs=True,
                     dataset_num_proc=None)
    with _logging_dir(args.report_to, logging_dir):
        trainer = _stack_kto_trainer_class()(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                                             frozen_adapters=frozen, soft_labels=soft,
                                             callbacks=[_progress_callback(console, desc)])
        _quiet(trainer)
        _check_stack(model, frozen, "KTO")
        ref = [{"id": e["id"], "label": e["label"], "logp": float(r)}
               for e, r in zip(examples, trainer.train_dataset["ref_logps"])]
        trainer.train(resume_from_checkpoint=_last_checkpoint(out_dir))
    _check_stack(model, frozen, "after KTO")
    return [dict(h) for h in trainer.state.log_history], ref


def train_simpo(model, tokenizer, pairs: list[dict], settings, out_dir: Path, *, seed: int, frozen: list[str],
                report_to: Sequence[str] = (), logging_dir: Path | None = None, console=None,
                desc: str = "SimPO") -> list[dict]:
    """SimPO of the `default` adapter on the pairs: trl.experimental's CPOTrainer with loss_type simpo and no NLL term
    (cpo_alpha 0; otherwise it is CPO-SimPO). Reference-free: no reference pass at all."""
    from trl.experimental.cpo import CPOConfig

    args = CPOConfig(**_common_args(settings, out_dir, seed, model, report_to), loss_type="simpo", cpo_alpha=0.0,
                     beta=settings.simpo_beta, simpo_gamma=settings.simpo_gamma, dataset_num_proc=None)
    return _train_reference_free(_simpo_trainer_class(), "SimPO", model, tokenizer, pairs, args, frozen=frozen,
                                 soft_labels=getattr(settings, "soft_labels", "off"), logging_dir=logging_dir,
                                 console=console, desc=desc)


def _soft_label_batches(trainer_cls):
    """`trainer_cls` (trl.experimental's CPO or ORPO trainer) that keeps each batch's `p_chosen` in `self._p` while
    the batch's loss is computed (its collator hands the column over as a list), for the loss to read."""

    class SoftLabels(trainer_cls):
        def __init__(self, *args, soft_labels: str = "off", **kwargs):
            self._soft_labels, self._p = soft_labels, None
            super().__init__(*args, **kwargs)

        def get_batch_loss_metrics(self, model, batch, train_eval="train"):
            import torch

            if self._soft_labels != "off":
                self._p = torch.as_tensor(batch["p_chosen"], dtype=torch.float32, device=self.accelerator.device)
            try:
                return super().get_batch_loss_metrics(model, batch, train_eval)
            finally:
                self._p = None

    SoftLabels.__name__ = trainer_cls.__name__
    return SoftLabels


def _simpo_trainer_class():
    from trl.experimental.cpo import CPOTrainer

    class SoftLabelCPOTrainer(_soft_label_batches(_resumable(CPOTrainer))):
        """trl.experimental's CPOTrainer with per-pair soft labels: `weight` scales each pair's SimPO loss by 2p - 1;
        `target` is TRL's own label smoothing with eps = 1 - p per pair (its conservative form of the same loss)."""

        def cpo_loss(self, policy_chosen_logps, policy_rejected_logps):
            if self._p is None:
                return super().cpo_loss(policy_chosen_logps, policy_rejected_logps)
            if self._soft_labels == "target":
                smoothing, self.label_smoothing = self.label_smoothing, 1 - self._p
                try:
                    return super().cpo_loss(policy_chosen_logps, policy_rejected_logps)
                finally:
                    self.label_smoothing = smoothing
            losses, chosen, rejected = super().cpo_loss(policy_chosen_logps, policy_rejected_logps)
            return _soft_weights(self._p, self._soft_labels) * losses, chosen, rejected

    return SoftLabelCPOTrainer


def _train_reference_free(trainer_cls, name: str, model, tokenizer, pairs: list[dict], args, *, frozen: list[str],
                          soft_labels: str, logging_dir: Path | None, console, desc: str) -> list[dict]:
    """Train the `default` adapter on the pairs with a stack-aware trainer that has no reference pass (SimPO, ORPO);
    returns TRL's log history."""
    from datasets import Dataset

    with _logging_dir(args.report_to, logging_dir):
        trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(pair_rows(pairs, soft_labels)),
                              processing_class=tokenizer, frozen_adapters=frozen, soft_labels=soft_labels,
                              callbacks=[_progress_callback(console, desc)])
        _quiet(trainer)
        _check_stack(model, frozen, name)
        trainer.train(resume_from_checkpoint=_last_checkpoint(args.output_dir))
    _check_stack(model, frozen, f"after {name}")
    return [dict(h) for h in trainer.state.log_history]


def _orpo_trainer_class():
    import torch
    from trl.experimental.orpo import ORPOTrainer

    class CompletionORPOTrainer(_soft_label_batches(_resumable(ORPOTrainer))):
        """trl.experimental's ORPOTrainer with the winner's NLL on its completion tokens only, as the ORPO paper and
        SFT have it: TRL 1.15 takes it over prompt and completion, which here would raise the likelihood of the
        red-team requests themselves. Soft labels `weight` scale each pair's odds-ratio term and its winner's
        token losses by 2p - 1 (the NLL stays a mean over all the batch's winner tokens)."""

        def concatenated_forward(self, model, batch):
            out = super().concatenated_forward(model, batch)
            # out[2]: the winners' logits, already cut to predict tokens 1.. (TRL drops the last position)
            chosen_logits, labels = out[2], batch["chosen_labels"].to(out[2].device)
            width = chosen_logits.shape[1] + 1  # chosen and rejected are padded alike for the one forward
            if labels.shape[1] < width:
                labels = torch.nn.functional.pad(labels, (0, width - labels.shape[1]), value=-100)
            labels = labels[:, 1:width]
            per_token = torch.nn.functional.cross_entropy(chosen_logits.reshape(-1, chosen_logits.shape[-1]),
                                                          labels.reshape(-1), ignore_index=-100,
                                                          reduction="none").view(labels.shape)
            w = _soft_weights(self._p, self._soft_labels) if self._p is not None else None
            if w is not None:
                per_token = per_token * w[:, None].to(per_token.dtype)
            nll = per_token.sum() / (labels != -100).sum().clamp(min=1)
            return (*out[:4], nll, *out[5:])

        def odds_ratio_loss(self, policy_chosen_logps, policy_rejected_logps):
            losses, *rest = super().odds_ratio_loss(policy_chosen_logps, policy_rejected_logps)
            w = _soft_weights(self._p, self._soft_labels) if self._p is not None else None
            return (losses if w is None else w * losses), *rest

    return CompletionORPOTrainer


def train_orpo(model, tokenizer, pairs: list[dict], settings, out_dir: Path, *, seed: int, frozen: list[str],
               report_to: Sequence[str] = (), logging_dir: Path | None = None, console=None,
               desc: str = "ORPO") -> list[dict]:
    """ORPO of the `default` adapter on the pairs: -log p(winner) per completion token, minus lambda x
    logsigmoid(log odds(winner) - log odds(loser)) with length-normalised log-probs. Reference-free."""
    from trl.experimental.orpo import ORPOConfig

    args = ORPOConfig(**_common_args(settings, out_dir, seed, model, report_to), beta=settings.orpo_lambda,
                      dataset_num_proc=None)
    return _train_reference_free(_orpo_trainer_class(), "ORPO", model, tokenizer, pairs, args, frozen=frozen,
                                 soft_labels=getattr(settings, "soft_labels", "off"), logging_dir=logging_dir,
                                 console=console, desc=desc)
