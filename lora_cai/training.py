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

import contextlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError

from .models import TRAINABLE, active_adapters, barrier, rank, set_active, starting_policy, world_size


# --------------------------------------------------------------------------------------------------
# TRL 1.15 computes log-probs through a fused LM head whose kernel is Triton-only: it is None where
# Triton is missing and fails without a GPU where Triton is installed. Unsloth's CPU path swaps in its
# own twin; the transformers backend on CPU needs this one. Nothing in TRL/transformers offers a
# non-Triton version, so it is written here (plain autograd, one row chunk of logits at a time).
# --------------------------------------------------------------------------------------------------
class _TorchChunkedLogProb:
    """Pure-PyTorch stand-in for `trl.kernels.ChunkedLogProbFunction` (same inputs, same outputs)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        import torch

        rows = max(1, (1 << 22) // max(1, weight.shape[0]))  # about 16 MB of fp32 logits per chunk
        cols = {k: [] for k in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")}
        for start in range(0, max(hidden.shape[0], 1), rows):
            h = hidden[start:start + rows]
            logits = torch.nn.functional.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype))
            # Half precision is upcast as TRL's kernel does; float64 (the equivalence tests) stays float64.
            logits = (logits.float() if logits.element_size() < 4 else logits) * logit_scale
            if final_logit_softcapping:
                logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
            logits = logits / temperature
            log_z = torch.logsumexp(logits, dim=-1)
            t = targets[start:start + rows]
            target_logit = logits.gather(-1, t.unsqueeze(-1)).squeeze(-1)
            cols["log_probs"].append(target_logit - log_z)
            if "entropy" in outputs:
                cols["entropy"].append(log_z - (logits.softmax(-1) * logits).sum(-1))
            with torch.no_grad():
                if "log_sum_sq_probs" in outputs:
                    cols["log_sum_sq_probs"].append(torch.logsumexp(2 * (logits - log_z.unsqueeze(-1)), dim=-1))
                if "mean_logits" in outputs:
                    cols["mean_logits"].append(logits.mean(-1))
                if "is_top1" in outputs:
                    cols["is_top1"].append(logits.argmax(-1) == t)
        result = []
        for name in cols:
            if name == "log_probs" or name in outputs:
                result.append(torch.cat(cols[name]) if cols[name] else hidden.new_zeros(0, dtype=torch.float32))
            else:
                result.append(None)
        return tuple(result)


def install_logprob_fallback() -> None:
    """Route TRL's fused LM head to the PyTorch version wherever its Triton kernel cannot run."""
    from trl.trainer import utils as trl_utils

    kernel = getattr(trl_utils, "_ChunkedLogProbFunction", "absent")
    if kernel == "absent" or getattr(kernel, "_unsloth_cpu_dispatch", False) or getattr(kernel, "_lora_cai", False):
        return  # no fused head in this TRL, or Unsloth's CPU twin / ours already routes it

    class _Dispatch:
        _lora_cai = True

        @staticmethod
        def apply(hidden, *args, **kwargs):
            if kernel is not None and hidden.device.type in ("cuda", "xpu"):
                return kernel.apply(hidden, *args, **kwargs)
            return _TorchChunkedLogProb.apply(hidden, *args, **kwargs)

    trl_utils._ChunkedLogProbFunction = _Dispatch


def _precision_args(model) -> dict:
    """The trainers' mixed precision follows the dtype the model was loaded in (`models.pick_dtype`, the one rule):
    bf16 for bfloat16, fp16 (with its gradient scaler) for float16, neither for float32; none on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return {"bf16": False, "fp16": False, "use_cpu": True}
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


# Loggers TRL/Transformers can report to: the package that must be importable, and the environment
# variable (with its value under `logging_dir`) that points the logger's files there. Transformers 5 has no
# `logging_dir` argument any more; each integration reads its own variable instead.
_LOGGERS = {
    "tensorboard": ("tensorboard", "TENSORBOARD_LOGGING_DIR", "{dir}/tensorboard"),
    "wandb": ("wandb", "WANDB_DIR", "{dir}"),
    "mlflow": ("mlflow", "MLFLOW_TRACKING_URI", "file:{dir}/mlruns"),
    "trackio": ("trackio", "TRACKIO_DIR", "{dir}/trackio"),
}


def _report_to(report_to: str | Sequence[str]) -> list[str]:
    """`report_to` as TRL wants it (`[]` = none), after checking each logger is known and installed."""
    import importlib.util

    names = [] if report_to in ("none", None) else [report_to] if isinstance(report_to, str) else list(report_to)
    for name in names:
        if name not in _LOGGERS:
            raise UserError(f"report_to: unknown logger '{name}'; use any of {sorted(_LOGGERS)}")
        package = _LOGGERS[name][0]
        if importlib.util.find_spec(package) is None:
            raise UserError(f"report_to: {name} is not installed; pip install {package}, or remove it from report_to")
    return names


@contextlib.contextmanager
def _logging_dir(report_to: list[str], logging_dir: Path | None):
    """Point the chosen loggers' files under `logging_dir` while a trainer is built and runs.

    Variables the user set already win; the environment is restored afterwards.
    """
    added = []  # trackio reads TRACKIO_DIR once, when first imported: Transformers imports it while the trainer is built
    if logging_dir is not None:
        for name in report_to:
            _, var, value = _LOGGERS[name]
            if var not in os.environ:
                added.append(var)
                os.environ[var] = value.format(dir=Path(logging_dir).resolve())
    try:
        yield
    finally:
        for var in added:
            os.environ.pop(var, None)


def _common_args(settings, out_dir: Path, seed: int, model, report_to: str | Sequence[str] = "none") -> dict:
    import torch

    report_to = _report_to(report_to)
    return dict(
        output_dir=str(out_dir), learning_rate=settings.learning_rate, num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length, logging_steps=1, logging_nan_inf_filter=False,  # NaN must show, to stop
        save_strategy="steps", save_steps=settings.save_steps,
        save_total_limit=1, save_only_model=False, report_to=report_to or "none", seed=seed,
        data_seed=seed, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        gradient_checkpointing=torch.cuda.is_available(), disable_tqdm=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # frozen adapters do not require grad, so DDP never waits on them
        **_precision_args(model),
    )


def _last_checkpoint(out_dir: Path) -> str | None:
    """The newest complete checkpoint under `out_dir`, or None.

    Transformers' `get_last_checkpoint` takes the highest-numbered folder, complete or not; a kill -9 inside a save
    leaves one without its adapter, and resuming from it fails. The Trainer writes `trainer_state.json` last, so a
    folder without it was cut off: it is removed (by the main process) and the one before it is used. The older
    complete one is still there then, since the Trainer deletes old checkpoints only after a save finished.
    """
    import re
    import shutil

    out = Path(out_dir)
    if not out.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in out.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, path in reversed(steps):
        if (path / "trainer_state.json").is_file():
            return str(path)
        if rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
    return None


def _resumable(trainer_cls):
    """`trainer_cls` whose checkpoint resume restores the new adapter only, and the stack around it.

    Transformers' own resume loads every adapter folder of the checkpoint and re-activates the first
    active adapter alone, which for a stack is round 1's; here `default` is loaded from the checkpoint
    (the earlier adapters never change) and the stack re-activated.
    """

    class Resumable(trainer_cls):
        def __init__(self, *args, frozen_adapters: list[str], **kwargs):
            from .concat import concat_of

            self._frozen = list(frozen_adapters)
            with _adapter_stays_float32(kwargs["model"]):
                super().__init__(*args, **kwargs)
            if concat_of(self.accelerator.unwrap_model(self.model)) is not None and self.args.weight_decay:
                # The concatenation's gradient hook keeps Adam from moving the frozen slices; decoupled decay would shrink them.
                raise ValueError("weight decay would move the concatenated stack's frozen slices; keep weight_decay 0")

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            peft_model = self.accelerator.unwrap_model(model or self.model)
            weights = load_file(str(Path(resume_from_checkpoint) / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(peft_model, weights, adapter_name=TRAINABLE)
            missing = [k for k in result.unexpected_keys if "lora_" in k]
            if missing:
                raise RuntimeError(f"checkpoint {resume_from_checkpoint} does not match the adapter: {missing[:3]}")
            set_active(peft_model, self._frozen + [TRAINABLE], trainable=TRAINABLE)

    Resumable.__name__ = f"Resumable{trainer_cls.__name__}"
    return Resumable


@contextlib.contextmanager
def _adapter_stays_float32(model):
    """Keep TRL's trainers from casting the adapter to bfloat16 while they are built.

    TRL 1.15's SFT and DPO trainers cast every trainable parameter of a 4-bit model to bfloat16 (the QLoRA paper's
    choice), keyed on `requires_grad`. Here the adapter keeps the dtype PEFT gave it (float32; on a GPU the
    trainer's autocast computes in half precision): the cast would round a concatenated stack's frozen slices (they share
    the tensor with the trainable slice), so the stack would change from round to round; it would make the CPU
    compute the LoRA branch in bfloat16 under a float32 model; and a T4 has no bfloat16.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _quiet(trainer) -> None:
    """Our progress bar replaces the Trainer's log printer (it prints every step's dict to stdout)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def _check_stack(model, frozen: list[str], where: str) -> None:
    want = frozen + [TRAINABLE]
    if active_adapters(model) != want:
        raise RuntimeError(f"{where}: active adapters {active_adapters(model)} != {want}")
    for name, p in model.named_parameters():
        if "lora_" in name and p.requires_grad != (f".{TRAINABLE}." in name):
            raise RuntimeError(f"{where}: {name} requires_grad={p.requires_grad}")


def _progress_callback(console, desc: str):
    """A TrainerCallback drawing one rich progress bar (steps, loss, ETA) on the run's console."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import TrainerCallback

    class _RichSteps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=console, transient=False,
                                     disable=console is None)
            self.progress.start()
            self.task = self.progress.add_task(desc, total=state.max_steps, loss="-")

        def on_step_end(self, args, state, control, **kw):
            self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                loss = float(logs["loss"])
                if not math.isfinite(loss):
                    # Raised before this step's checkpoint is written: the last one on disk is still good.
                    self.progress.stop()
                    good = _last_checkpoint(Path(args.output_dir))
                    raise UserError(f"{desc}: the loss became {loss} at step {state.global_step}; last good checkpoint: "
                                    f"{good or 'none (diverged before the first save)'}; lower the learning rate "
                                    f"and rerun")
                self.progress.update(self.task, loss=f"{loss:.4f}")

        def on_train_end(self, args, state, control, **kw):
            self.progress.stop()

    return _RichSteps()


def summarize(history: list[dict]) -> dict:
    """First and last value of each logged training metric, plus the step count."""
    out: dict = {"steps": 0}
    for h in history:
        if "loss" not in h:
            continue
        out["steps"] = int(h.get("step", out["steps"] + 1))
        for key in ("loss", "rewards/margins", "rewards/accuracies"):
            if key in h:
                out.setdefault(f"first_{key}", float(h[key]))
                out[f"last_{key}"] = float(h[key])
    return out


def train_sft(model, tokenizer, records: list[dict], settings, out_dir: Path, *, seed: int, frozen: list[str],
              report_to: Sequence[str] = (), logging_dir: Path | None = None, console=None,
              desc: str = "SFT") -> list[dict]:
    """SFT of the `default` adapter on (prompt, revision) records; loss on the completion only.

    `report_to` names extra loggers (TRL's `report_to`; empty = none), whose files go under `logging_dir`.
    Returns TRL's log history (one dict per logged step).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    install_logprob_fallback()
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "completion": [{"role": "assistant", "content": r["completion"]}]} for r in records])
    args = SFTConfig(**_common_args(settings, out_dir, seed, model, report_to), completion_only_loss=True,
                     dataset_num_proc=None)
    with _logging_dir(args.report_to, logging_dir):
        trainer = _resumable(SFTTrainer)(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                                         callbacks=[_progress_callback(console, desc)], frozen_adapters=frozen)
        _quiet(trainer)
        _check_stack(model, frozen, "SFT")
        trainer.train(resume_from_checkpoint=_last_checkpoint(out_dir))
    _check_stack(model, frozen, "after SFT")
    return [dict(h) for h in trainer.state.log_history]


SOFT_LABELS = ("off", "weight", "target")
OBJECTIVE_NAMES = {"sigmoid": "DPO", "ipo": "IPO", "robust": "robust DPO", "hinge": "SLiC", "apo_zero": "APO",
                   "kto": "KTO", "simpo": "SimPO", "orpo": "ORPO"}


def trl_objective(settings) -> dict:
    """DPOConfig's arguments for `dpo.loss`: TRL reads one `beta` for every loss of the family, so each objective's
    own setting goes there (IPO's tau), and robust DPO's flip rate is TRL's `label_smoothing`."""
    loss = getattr(settings, "loss", "sigmoid")
    return {"loss_type": [loss], "beta": settings.ipo_tau if loss == "ipo" else settings.beta,
            "label_smoothing": settings.flip_rate if loss == "robust" else 0.0}


def preference_losses(loss: str, chosen_logratios, rejected_logratios, p_chosen, mode: str, *, beta: float,
                      lengths=None, flip_rate: float = 0.0):
    """Per-pair losses of the DPO-family objective `loss` with soft labels `mode`, as TRL 1.15 computes them at p = 1.

    With m = chosen - rejected log-ratio and p the pair's judged probability:
    sigmoid -logsigmoid(beta m); ipo (h - 1/(2 tau))^2 with h the log-ratio margin per completion token
    (`lengths`: chosen and rejected completion token counts) and tau passed as `beta`; robust
    [-(1-e) logsigmoid(beta m) + e logsigmoid(-beta m)] / (1 - 2e); hinge relu(1 - beta m); apo_zero
    (1 - sigmoid(beta c)) + sigmoid(beta r). `weight` multiplies any of them by 2p - 1; `target` replaces the
    label by p: sigmoid -p logsigmoid(beta m) - (1-p) logsigmoid(-beta m), ipo (h - (2p-1)/(2 tau))^2.
    """
    import torch
    import torch.nn.functional as F

    m = chosen_logratios - rejected_logratios
    p = p_chosen.to(m.dtype) if p_chosen is not None else torch.ones_like(m)
    target = mode == "target"
    if loss == "sigmoid":
        z = beta * m
        per = -p * F.logsigmoid(z) - (1 - p) * F.logsigmoid(-z) if target else -F.logsigmoid(z)
    elif loss == "ipo":
        chosen_len, rejected_len = lengths
        h = chosen_logratios / chosen_len.clamp(min=1.0) - rejected_logratios / rejected_len.clamp(min=1.0)
        per = (h - ((2 * p - 1) if target else 1.0) / (2 * beta)) ** 2
    elif loss == "robust":
        per = (-(1 - flip_rate) * F.logsigmoid(beta * m) + flip_rate * F.logsigmoid(-beta * m)) / (1 - 2 * flip_rate)
    elif loss == "hinge":
        per = torch.relu(1 - beta * m)
    elif loss == "apo_zero":
        per = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    else:
        raise ValueError(f"dpo.loss {loss!r} is not one of sigmoid, ipo, robust, hinge, apo_zero")
    if target and loss not in ("sigmoid", "ipo"):
        raise ValueError(f"soft_labels target is not defined for dpo.loss {loss}")
    return (2 * p - 1) * per if mode == "weight" else per


class _WithPChosen:
    """A preference collator that also hands each batch's `p_chosen` (one float per pair) to the loss."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        import torch

        batch = self.inner(examples)
        batch["p_chosen"] = torch.tensor([float(e["p_chosen"]) for e in examples], dtype=torch.float32)
        return batch


class _PChosenColumn:
    """Mixin for a TRL trainer (before it in the bases) that, with soft labels, keeps the dataset's `p_chosen` column:
    Trainer drops columns outside its signature and TRL's collators the ones they do not know, and the loss needs it."""

    _soft_labels = "off"

    def _keep_p_chosen(self):
        if self._soft_labels != "off":
            self.data_collator = _WithPChosen(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._soft_labels != "off" and "p_chosen" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "p_chosen"]


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


def pair_rows(pairs: list[dict], soft_labels: str = "off") -> list[dict]:
    """Pairs as TRL's conversational preference rows: prompt, chosen and rejected as chat turns, and with soft labels
    each pair's checked `p_chosen`."""
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    if soft_labels != "off":
        for row, p in zip(rows, pairs):
            row["p_chosen"] = _pair_probability(p)
    return rows


def _soft_weights(p, mode: str):
    """Per-pair loss weights for soft labels `mode`: 2p - 1 under `weight`, else None (no weighting)."""
    return 2 * p - 1 if mode == "weight" else None


def _pair_probability(pair: dict) -> float:
    p = float(pair.get("p_chosen", 1.0))
    if not 0.5 <= p <= 1.0:  # NaN fails this too
        raise UserError(f"pairs.jsonl: pair {pair.get('id')} has p_chosen={p}, outside [0.5, 1]; rebuild the pairs "
                        f"(delete the round's pairs.jsonl and rerun) or set dpo.soft_labels: off")
    return p


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


def _shared_dataset(ds, out_dir: Path):
    """`ds` itself, or under several processes a copy on disk all of them open.

    TRL caches the reference log-probs in a file beside the dataset's own, which for an in-memory dataset is a
    per-process temp dir: the other processes then cannot open the main one's file. On disk it is shared."""
    world = world_size()
    if world == 1:
        return ds
    import shutil

    from datasets import load_from_disk

    data_dir = Path(out_dir) / "data"
    if rank() == 0:
        shutil.rmtree(data_dir, ignore_errors=True)
        ds.save_to_disk(str(data_dir))
    barrier(world)
    return load_from_disk(str(data_dir))


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


def sft_records(objective: str, records: list[dict], pairs: list[dict]) -> list[dict]:
    """What the round's SFT trains on: every record, except under ORPO, whose own likelihood term already trains
    each pair's winner: there SFT keeps the records no pair covers (helpful data, revisions left unpaired), so
    ORPO does not silently drop what keeps the policy helpful."""
    if objective != "orpo":
        return records
    won = {(p["prompt"], p["chosen"]) for p in pairs}
    return [r for r in records if (r["prompt"], r["completion"]) not in won]


def kto_examples(pairs: list[dict]) -> list[dict]:
    """Each pair's winner as a desirable answer and its loser as an undesirable one (KTO needs no pairing), both
    carrying the pair's `p_chosen` (1.0 when it has none); an answer met twice with the same label is kept once,
    with its first pair's p."""
    seen, out = set(), []
    for p in pairs:
        for completion, label in ((p["chosen"], True), (p["rejected"], False)):
            if (p["prompt"], completion, label) in seen:
                continue
            seen.add((p["prompt"], completion, label))
            out.append({"id": p.get("id"), "prompt": p["prompt"], "completion": completion, "label": label,
                        "p_chosen": float(p.get("p_chosen", 1.0))})
    return out


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) from the counts, as the KTO paper and TRL advise: the weighted
    desirable mass over the undesirable one kept within [1, 4/3] (undesirable weight 1)."""
    if not n_desirable or not n_undesirable:
        return 1.0, 1.0
    ratio = min(max(n_desirable / n_undesirable, 1.0), 4 / 3)
    return ratio * n_undesirable / n_desirable, 1.0


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
    from trl.experimental.cpo import CPOConfig, CPOTrainer

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


def write_log(path: Path, history: list[dict]) -> None:
    from .store import write_jsonl_atomic

    write_jsonl_atomic(path, [json.loads(json.dumps(h, default=float)) for h in history])


# --------------------------------------------------------------------------------------------------
# The round's training stage
# --------------------------------------------------------------------------------------------------

class StopBeforeTrain(Exception):
    """Raised where a round's training would start under --stop-before train."""


def per_process(settings, world: int):
    """The recipe's effective batch split over `world` processes (grad_accum divided where it divides)."""
    if world > 1 and settings.grad_accum % world == 0:
        return settings.model_copy(update={"grad_accum": settings.grad_accum // world})
    return settings


def fit_to_gpu(cfg, settings, stage: str, console=None, *, earlier_rounds: int = 0, objective: str = "sigmoid"):
    """On a GPU, the recipe's batch for `stage` shrunk (accumulation raised) to fit vram_gb by the planner, for a
    round with `earlier_rounds` adapters in memory."""
    import torch

    from . import inputs
    from .offline_models import resolve_model_path
    from .planner import fit_batch, load_model_config

    if not torch.cuda.is_available():
        return settings  # no VRAM budget to fit on a CPU
    try:
        name = resolve_model_path(cfg.model.name)
        # Reads the model, lora, the stage's batch and length, and vram_gb through the stage's view: all declared
        # by the train stage, and recorded like every other read.
        fitted = fit_batch(cfg, settings, stage, load_model_config(name), earlier_rounds=earlier_rounds,
                           objective=objective)
    except UserError as e:
        if console is not None:
            console.log(f"planner: {e}; keeping the recipe's {stage} batch")
        return settings
    if fitted is None:
        return settings
    if console is not None:
        console.log(f"planner: {stage} batch {settings.batch_size} x accumulation {settings.grad_accum} -> "
                    f"{fitted[0]} x {fitted[1]} to fit vram_gb={cfg.vram_gb:g}")
    # A copy with the new split, read through the stage's view like the recipe's own settings: copying through the
    # view would count as reading every key of the section.
    copy = inputs.unwrap(settings).model_copy(update={"batch_size": fitted[0], "grad_accum": fitted[1]})
    return inputs.View(copy, settings.stage, f"{stage}.") if isinstance(settings, inputs.View) else copy


def train_stage(ctx, inp, *, stop_before: bool = False):
    """SFT then the preference objective (dpo.loss; skipped at dpo.epochs 0) of round k's new adapter on sft.jsonl
    and pairs.jsonl (under ORPO, SFT keeps the records no pair covers: `sft_records`); resumes from checkpoints.

    Under `accelerate launch -m lora_cai.train` every process trains its shard of each batch and only the main
    one writes; the effective batch of the recipe is kept where grad_accum divides by the number of processes
    (the input hash is the recipe's, so a later single-process rerun of the recipe finds this training done).
    `stop_before` (--stop-before train) raises `StopBeforeTrain` where training would start.
    """
    import shutil
    import time

    from . import inputs, models
    from .data import mix_helpful
    from .layout import round_dir
    from .stage import Done, peak_memory
    from .store import atomic_write_json, read_json, read_jsonl, write_jsonl_atomic

    cfg, k, rd, done = ctx.cfg, ctx.k, ctx.dir, Done()
    adapter, record = rd / "adapter", rd / "train.json"
    main, world = rank() == 0, world_size()
    if not (record.exists() and read_json(record).get("inputs") == inp.hash
            and (adapter / "adapter_model.safetensors").exists()):
        if stop_before:
            raise StopBeforeTrain(k)
        done.ran = True
        t0 = time.perf_counter()
        pairs = read_jsonl(rd / "pairs.jsonl")
        # dpo.loss is declared with its default left out of the hash (inputs.py: a sigmoid run's hash is what it
        # was before the key existed), so its read here is covered at every value; read past the recorder.
        objective = inputs.unwrap(cfg).dpo.loss
        sft = sft_records(objective, mix_helpful(read_jsonl(rd / "sft.jsonl"), ctx.data.helpful,
                                                    cfg.sft.helpful_fraction, cfg.seed + k), pairs)
        fit = dict(earlier_rounds=len(ctx.stack), objective=objective)
        sft_cfg = per_process(fit_to_gpu(cfg, cfg.sft, "sft", ctx.console, **fit), world)
        dpo_cfg = per_process(fit_to_gpu(cfg, cfg.dpo, "dpo", ctx.console, **fit), world)
        ckpt = rd / "checkpoints"
        if main:
            if (ckpt / "inputs.json").exists() and read_json(ckpt / "inputs.json").get("inputs") != inp.hash:
                shutil.rmtree(ckpt)  # checkpoints of other inputs: stale
            atomic_write_json(ckpt / "inputs.json", {"inputs": inp.hash})
        barrier(world)
        model, tokenizer = ctx.models.for_training(cfg, k, ctx.stack)
        frozen = ctx.models.frozen
        log_kw = {"report_to": list(cfg.report_to), "logging_dir": ctx.run_dir / "logs" / round_dir(k)}
        sft_done = ckpt / "sft-adapter"
        # SFT is off when switched off or when ORPO's likelihood term covers every record; the preference stage
        # when switched off (dpo.epochs 0: SFT alone) or when the round has no pairs.
        run_sft, run_prefs = cfg.sft.epochs > 0 and bool(sft), cfg.dpo.epochs > 0 and bool(pairs)
        if not (run_sft or run_prefs):
            raise UserError(f"round {k}: sft.epochs is 0 (or ORPO left SFT nothing) and the round has no preference "
                            f"pairs to train on, so nothing would train its adapter; set sft.epochs above 0 or make "
                            f"pairs (pairs.builder)")
        with peak_memory(done.summary, "train"):
            if not run_sft:
                sft_log = []
            elif (sft_done / "adapter_model.safetensors").exists():  # SFT finished before a crash: keep it
                models.load_trainable_weights(model, sft_done, frozen)
                sft_log = read_jsonl(ckpt / "sft_log.jsonl")
            else:
                sft_log = train_sft(model, tokenizer, sft, sft_cfg, ckpt / "sft", seed=cfg.seed + k, frozen=frozen,
                                    console=ctx.console, desc=f"round {k} SFT", **log_kw)
                if main:
                    write_log(ckpt / "sft_log.jsonl", sft_log)
                    models.save_adapter(model, sft_done)
                barrier(world)
            dpo_log, ref = [], []
            if run_prefs:
                dpo_log, ref = train_preferences(model, tokenizer, pairs, dpo_cfg, ckpt / "dpo", seed=cfg.seed + k,
                                                 frozen=frozen, console=ctx.console,
                                                 desc=f"round {k} {OBJECTIVE_NAMES[objective]}", **log_kw)
        if main:
            write_jsonl_atomic(rd / "ref_logps.jsonl", ref)
            write_log(rd / "sft_log.jsonl", sft_log)
            write_log(rd / "dpo_log.jsonl", dpo_log)
            models.save_adapter(model, adapter)
            atomic_write_json(record, {"inputs": inp.hash, "sft": summarize(sft_log), "dpo": summarize(dpo_log),
                                       "objective": objective})
        barrier(world)
        done.timing = _training_timing(time.perf_counter() - t0, sft_log, dpo_log)
    summary = read_json(record)
    if main:
        shutil.rmtree(rd / "checkpoints", ignore_errors=True)  # the adapter and train.json are committed
    done.summary.update(sft=summary["sft"], dpo=summary["dpo"], objective=summary.get("objective", "sigmoid"))
    done.outputs = adapter
    return done


def _training_timing(seconds: float, sft_log: list[dict], dpo_log: list[dict]) -> dict:
    """The stage's wall seconds and each trainer's optimizer steps per second (its own runtime, this process)."""
    out: dict = {"seconds": round(seconds, 1)}
    for name, log in (("sft", sft_log), ("dpo", dpo_log)):
        end = next((h for h in reversed(log) if "train_runtime" in h), None)
        steps = max((int(h["step"]) for h in log if "step" in h), default=0)
        if end and end["train_runtime"] > 0 and steps:
            out[f"{name}_steps_per_s"] = round(steps / end["train_runtime"], 3)
    return out
